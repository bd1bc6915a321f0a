"""Three chat instances behind a real HAProxy, set up from examples/haproxy (issue 15).

Shared by the scale-out tests: :func:`start_instance` starts ``connserver serve
chat`` with the example's TOML; the ``balancer`` fixture runs HAProxy on the
example's own configuration, with only its ports and check timing replaced, so
the example that the how-to gives is the one under test; :class:`ChatClient`
is an ``nc`` user, connecting from 127.0.0.2 so that the client's address is
told apart from the balancer's (127.0.0.1).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import pathlib
import select
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from connserver.testing import wait_for
from tests.conftest import Daemon, unavailable

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "haproxy"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
CLIENT_SOURCE = "127.0.0.2"
# Fast checks for tests: a drain is noticed within a second. fall 2 keeps a
# drained instance in rotation for at least one interval after its listener
# closed, so that window, which redispatch covers, is always exercised.
TEST_CHECKS = "inter 300ms fall 2 rise 1"


@dataclass
class Instance:
    """One ``connserver serve chat`` process: its traffic and admin ports."""

    name: str
    process: Daemon
    port: int
    admin_port: int

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the instance's admin endpoint: (status, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def peers(self) -> set[str]:
        """The peer address of every live connection (GET /connections)."""
        status, body = self.admin_get("/connections")
        assert status == 200, body
        return {info["peer"] for info in json.loads(body)}


def start_instance(daemon: Callable[..., Daemon], name: str, *extra: str,
                   app: str = "chat") -> Instance:
    """``connserver serve APP --config examples/haproxy/connserver.toml`` on free ports."""
    process = daemon(app, "--config", str(EXAMPLE / "connserver.toml"),
                     "--bind", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                     "--graceful-timeout", "10", *extra)
    # The admin endpoint starts first; its own "accepting on" line comes before.
    admin_port = int(process.read_until(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
    port = int(process.read_until(r"accepting on 127\.0\.0\.1:(\d+)").group(1))
    return Instance(name, process, port, admin_port)


class Balancer:
    """HAProxy on examples/haproxy/haproxy.cfg, in front of the given instances."""

    def __init__(self, binary: str, instances: list[Instance], directory: pathlib.Path,
                 checks: str = TEST_CHECKS) -> None:
        self.port, self.stats_port = _free_port(), _free_port()
        self.config_path = directory / "haproxy.cfg"
        self.log_path = directory / "haproxy.log"
        self.config_path.write_text(example_config(instances, self.port, self.stats_port, checks))
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT)
        names = [instance.name for instance in instances]
        if not wait_for(lambda: self.proc.poll() is not None or
                        all(self.servers().get(name, {}).get("check_status") == "L7OK"
                            for name in names), 10) or self.proc.poll() is not None:
            raise AssertionError(f"HAProxy did not check every instance healthy: "
                                 f"{self.servers() if self.proc.poll() is None else ''}\n{self.log()}")

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers from HAProxy's stats CSV: status, check_status, wredis, ..."""
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=10)
            try:
                connection.request("GET", "/;csv")
                text = connection.getresponse().read().decode()
            finally:
                connection.close()
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows
                if row["pxname"] == "connserver" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def example_config(instances: list[Instance], port: int, stats_port: int, checks: str) -> str:
    """examples/haproxy/haproxy.cfg with these ports and check timing, and nothing else changed."""
    text = (EXAMPLE / "haproxy.cfg").read_text()
    replacements = [("bind 127.0.0.1:7070", f"bind 127.0.0.1:{port}"),
                    ("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats_port}"),
                    ("inter 2s fall 1 rise 2", checks)]
    assert len(instances) == 3, "the example has three servers"
    for number, instance in enumerate(instances, 1):
        assert instance.name == f"app{number}"
        replacements.append((f"127.0.0.1:{7070 + number} port {8070 + number}",
                             f"127.0.0.1:{instance.port} port {instance.admin_port}"))
    for old, new in replacements:
        assert text.count(old) == 1, f"examples/haproxy/haproxy.cfg no longer has {old!r} once"
        text = text.replace(old, new)
    return text


@pytest.fixture
def haproxy_binary() -> str:
    if HAPROXY is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    return HAPROXY


@pytest.fixture
def balancer(haproxy_binary, tmp_path) -> Iterator[Callable[..., Balancer]]:
    """Factory: balancer(instances, checks=...) -> a running HAProxy, stopped at teardown."""
    started: list[Balancer] = []

    def start(instances: list[Instance], checks: str = TEST_CHECKS) -> Balancer:
        proxy = Balancer(haproxy_binary, instances, tmp_path, checks)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.close()


class LineClient:
    """A line-based client through the balancer (from 127.0.0.2), as ``nc`` would be."""

    def __init__(self, port: int, name: str, timeout: float = 10.0) -> None:
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(CLIENT_SOURCE, 0))
        self.address = "%s:%d" % self.sock.getsockname()[:2]
        self.lines: list[str] = []
        self._partial = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def expect(self, text: str, timeout: float = 10.0) -> str:
        """Read lines until one contains ``text``; return it (fail on EOF or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._partial:
                raw, self._partial = self._partial.split(b"\n", 1)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if text in line:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise AssertionError(f"{self.name} never got {text!r}; it got {self.lines}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"{self.name}: connection closed before {text!r}; "
                                     f"it got {self.lines}")
            self._partial += chunk

    def expect_eof(self, timeout: float = 10.0) -> None:
        """The server ended the connection: end of stream (after any last lines)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise AssertionError(f"{self.name}: no end of stream; it got {self.lines}")
            if not self.sock.recv(65536):
                return

    def close(self) -> None:
        self.sock.close()


class ChatClient(LineClient):
    """A chat user: greeted, named ``nick``, then chatting."""

    def __init__(self, port: int, nick: str, timeout: float = 10.0) -> None:
        super().__init__(port, nick, timeout)
        self.nick = nick
        try:
            self.expect("Choose a nickname:")
            self.send(nick)
            self.expect(f"* You are {nick};")
        except BaseException:
            self.close()
            raise


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:``port`` (from /proc/net/tcp, without
    connecting: a probe would be a connection of its own to the instance)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1] == wanted and fields[3] == "0A"   # 0A: LISTEN
                   for fields in (line.split() for line in table.readlines()[1:]))
