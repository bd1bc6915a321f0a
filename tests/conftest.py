"""Shared fixtures. Every test in this suite runs under the leak check."""

from __future__ import annotations

import gc
import os
import socket
import threading
from typing import Iterator

import pytest

import connserver
from connserver.testing import wait_for

# A real redis-server per test, for the backplane's tests anywhere in the suite.
from tests.redis_support import redis_cluster, redis_server  # noqa: F401  (fixtures, registered by import)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # connserver's own suite holds itself to the plugin's leak check, every test.
    for item in items:
        item.add_marker(pytest.mark.connserver_leakcheck)


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The session's objects out of the garbage collector's sight while the test runs.

    For tests of heap walks and of assert_no_leaks, which runs gc.collect() after
    every cycle: a full collection walks every object the session made so far, 70 ms
    each late in a full run, seconds for 20 cycles, none of it what they check.
    Frozen (gc.freeze), those objects are neither collected nor walked (nor listed
    by gc.get_objects); what the test makes still is.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def socketpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests marked both_modes run twice: with message handlers on their own threads
    # and parked (Config.park), through the same serve() fixture.
    if "serve" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_modes"):
        metafunc.parametrize("serving_mode", ["threads", "parked"])


@pytest.fixture
def serving_mode() -> str:
    """How serve() runs message handlers: "threads", or "parked" (both_modes tests)."""
    return "threads"


@pytest.fixture
def serve(connserver_server, serving_mode):
    """serve(HandlerClass, **config) -> started Server on 127.0.0.1:0 (the plugin's fixture);
    parked in the "parked" serving mode."""
    if serving_mode == "threads":
        return connserver_server

    def serve_parked(handler, *args, **config):
        config.setdefault("park", True)
        return connserver_server(handler, *args, **config)
    return serve_parked


def unavailable(reason: str) -> None:
    """Skip for a missing service or feature, except under CI=true, where it must fail."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: this test must run, so .ci/run must provide it)")
    pytest.skip(reason)


def connect(server: connserver.Server, source: str | None = None, timeout: float = 10.0) -> socket.socket:
    """A client socket to ``server`` with a safety-net timeout."""
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    return sock


def wait_closed(server: connserver.Server, total: int, timeout: float = 10.0) -> connserver.ServerStatistics:
    """Wait until ``total`` connections have ended; return the stats."""
    def done():
        stats = server.stats()
        return stats if sum(stats.close_reasons.values()) >= total and \
            stats.connections_active == 0 else None
    stats = wait_for(done, timeout)
    assert stats, f"connections did not end: {server.stats()}"
    return stats


class Recorder:
    """Collects what handlers report, from their threads, for assertions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list = []
        self.event = threading.Event()

    def add(self, item) -> None:
        with self.lock:
            self.items.append(item)
        self.event.set()


class Daemon:
    """A `python -m connserver serve ...` subprocess, always killed at the end."""

    def __init__(self, cwd, *args: str, env: dict | None = None, pass_fds=(),
                 start_new_session: bool = False) -> None:
        import os
        import subprocess
        import sys

        full_env = dict(os.environ, PYTHONPATH=str(cwd), PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "connserver", "serve", *args],
                                     cwd=cwd, env=full_env, stderr=subprocess.PIPE, bufsize=0,
                                     pass_fds=tuple(pass_fds), start_new_session=start_new_session)
        self.args = args
        self.lines: list[str] = []
        self._partial = b""

    def read_until(self, pattern: str, timeout: float = 20.0):
        """Read stderr lines until one matches ``pattern`` (regex); return the match.

        Unbuffered reads split into lines here, so select() never misses a line
        sitting in a reader's buffer.
        """
        import os
        import re
        import select
        import time

        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        while True:
            while b"\n" in self._partial:
                raw, self._partial = self._partial.split(b"\n", 1)
                line = raw.decode(errors="replace") + "\n"
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._partial += chunk
        raise AssertionError(f"daemon never logged {pattern!r}; it said:\n{''.join(self.lines)}")

    def port(self) -> int:
        """The first listener's port, from the server's "accepting on" line.

        An admin endpoint's own server starts first and logs that line for its port
        too, then "admin endpoint on": with --admin, read past it.
        """
        if {"--admin", "--admin-address"} & set(self.args):
            self.read_until(r"admin endpoint on")
        return int(self.read_until(r"accepting on 127\.0\.0\.1:(\d+)").group(1))

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        rest = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        return "".join(self.lines) + self._partial.decode(errors="replace") + rest

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def daemon(tmp_path):
    """Factory: daemon(*args, env=...) -> a started Daemon, killed at teardown.

    ``start_new_session=True`` gives it a process group of its own, to signal
    like a terminal does (``os.killpg``).
    """
    started: list[Daemon] = []

    def start(*args: str, env: dict | None = None, pass_fds=(),
              start_new_session: bool = False) -> Daemon:
        process = Daemon(tmp_path, *args, env=env, pass_fds=pass_fds,
                         start_new_session=start_new_session)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


class Stubborn:
    """A handler class that ignores cancellation until released (stuck-thread tests).

    ``handler`` enters ``handle()``, sets ``entered`` and waits on ``release``
    (up to 10 s), which nothing the server does can wake.
    """

    def __init__(self) -> None:
        entered = self.entered = threading.Event()
        release = self.release = threading.Event()

        class StubbornHandler(connserver.Handler):
            def handle(self) -> None:
                entered.set()
                release.wait(10)   # not cancel-aware: nothing can wake it

        self.handler = StubbornHandler


@pytest.fixture
def stubborn() -> Iterator[Stubborn]:
    """A :class:`Stubborn` handler, released (and its threads gone) at the end of the test."""
    stuck = Stubborn()
    yield stuck
    stuck.release.set()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("connserver-conn-")])


# A handler module that ignores the drain: once cancelled it blocks writing to a
# client that never reads, on the raw socket, until the shutdown is forced.
LINGERING_HANDLER = """
import connserver
class Lingering(connserver.Handler):
    def handle(self):
        try:
            self.conn.sendall(self.conn.recv())
            self.conn.recv()
        except connserver.Cancelled:
            self.conn.socket.sendall(b"x" * (64 << 20))
"""
