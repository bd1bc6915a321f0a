"""A peer that vanishes without a FIN or RST (root only: ip netns, veth, iptables DROP).

The client runs in a network namespace of its own, joined to this one by a veth
pair on a private /30 (10.213.0.1 here, 10.213.0.2 there); no other address is
ever used. Once it is connected, an iptables DROP inside the namespace swallows
everything between the two and the client process is killed: to the server the
peer is simply gone. The scenario needs root, iproute2 and iptables; it skips
without them, except under ``CI=true``, where it must run and so fails instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

import connserver
from connserver.apps.echo import EchoHandler
from tests.conftest import unavailable, wait_closed

from .support import PipeLines, assert_no_leftovers, assert_shutdown_clean, leak_snapshot

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked

HOST_ADDRESS, PEER_ADDRESS, PREFIX = "10.213.0.1", "10.213.0.2", 30
DROP_RULES = (["INPUT", "-s", HOST_ADDRESS, "-j", "DROP"],
              ["OUTPUT", "-d", HOST_ADDRESS, "-j", "DROP"])

# Runs in the namespace: connect, one round trip, say so, then hold the socket open.
CLIENT = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(b"ping")
assert sock.recv(4) == b"ping"
print("ready", flush=True)
sys.stdin.read()
"""


def _unavailable(reason: str) -> None:
    unavailable(f"vanished-peer scenario needs {reason}")


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30.0)


class Namespace:
    """A network namespace with a veth pair to this one, torn down by ``close()``."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.name = f"cshostile{tag}"
        self.host_link, self.peer_link = f"csh{tag}a", f"csh{tag}b"   # at most 15 characters
        self.dropping = False

    def exec(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def setup(self) -> None:
        taken = _run("ip", "-o", "-4", "addr", "show")
        if HOST_ADDRESS in taken.stdout or PEER_ADDRESS in taken.stdout:
            _unavailable(f"{HOST_ADDRESS}/{PREFIX} free on this host (it is in use)")
        for command in (
                ["ip", "netns", "add", self.name],
                ["ip", "link", "add", self.host_link, "type", "veth",
                 "peer", "name", self.peer_link],
                ["ip", "link", "set", self.peer_link, "netns", self.name],
                ["ip", "addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", self.host_link],
                ["ip", "link", "set", self.host_link, "up"],
                self.exec("ip", "addr", "add", f"{PEER_ADDRESS}/{PREFIX}", "dev", self.peer_link),
                self.exec("ip", "link", "set", self.peer_link, "up"),
                self.exec("ip", "link", "set", "lo", "up")):
            result = _run(*command)
            if result.returncode != 0:
                _unavailable(f"`{' '.join(command)}` to work: {result.stderr.strip()}")

    def drop(self) -> None:
        """Swallow all traffic between the namespace and the server, both ways."""
        self.dropping = True
        for rule in DROP_RULES:
            result = _run(*self.exec("iptables", "-A", *rule))
            if result.returncode != 0:
                _unavailable(f"iptables to work in a namespace: {result.stderr.strip()}")

    def close(self) -> None:
        if self.dropping:
            for rule in DROP_RULES:
                _run(*self.exec("iptables", "-D", *rule))
        _run("ip", "link", "del", self.host_link)   # takes its peer with it
        _run("ip", "netns", "del", self.name)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        _unavailable("root")
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{' and '.join(missing)} (apt packages iproute2, iptables)")
    ns = Namespace()
    try:
        ns.setup()
        yield ns
    finally:
        ns.close()
    assert ns.name not in _run("ip", "netns", "list").stdout, "namespace left behind"


class ShortKeepalive(EchoHandler):
    """Echo with TCP keepalive probing after 1 s idle, every 1 s, giving up after 2."""

    def setup(self):
        sock = self.conn.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


@pytest.mark.parametrize("detection", ["idle_deadline", "keepalive"])
def test_vanished_peer_is_closed_by_the_idle_deadline_or_keepalive(serve, namespace, detection):
    """A peer gone without FIN/RST is closed at idle_timeout (idle), or by keepalive (reset)."""
    closing: list[tuple[float, connserver.CloseReason]] = []
    closed = threading.Event()
    handler_class = EchoHandler if detection == "idle_deadline" else ShortKeepalive

    class Recorded(handler_class):
        def connection_closed(self, reason):
            closing.append((time.monotonic(), reason))
            closed.set()

    idle_timeout = 1.5 if detection == "idle_deadline" else 30.0
    before = leak_snapshot()
    server = serve(Recorded, address=(HOST_ADDRESS, 0), idle_timeout=idle_timeout)
    baseline = leak_snapshot()
    client = subprocess.Popen(
        namespace.exec(sys.executable, "-c", CLIENT, HOST_ADDRESS, str(server.server_address[1])),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if not PipeLines(client.stdout).wait_for(lambda line: line == "ready", 20.0):
            client.kill()
            pytest.fail(f"the client did not connect: {client.communicate(timeout=10.0)[1]!r}")
        last_activity = time.monotonic()
        namespace.drop()
        client.kill()   # its FIN (or RST) is dropped: the server hears nothing
        client.wait(10.0)
        assert closed.wait(idle_timeout + 10.0), "the vanished peer was never closed"
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(10.0)
        for pipe in (client.stdin, client.stdout, client.stderr):
            pipe.close()
    (closed_at, reason), = closing
    elapsed = closed_at - last_activity
    print(f"vanished peer ({detection}): closed {elapsed:.3f} s after its last activity, "
          f"reason {reason.value} (idle_timeout {idle_timeout} s)")
    stats = wait_closed(server, 1)
    if detection == "idle_deadline":
        assert reason is connserver.CloseReason.IDLE
        # The idle wait began as the echo left, a little before we heard "ready".
        assert idle_timeout - 0.2 <= elapsed < idle_timeout + 0.5
        assert stats.close_reasons == {"idle": 1}
    else:
        # Keepalive: 1 s idle, then 2 unanswered probes 1 s apart: about 3 s, long
        # before idle_timeout. The peer is gone, not idle: reason reset.
        assert 2.0 <= elapsed < 6.0
        assert reason is connserver.CloseReason.RESET, \
            f"a connection keepalive found dead was recorded as {reason.value}"
        assert stats.close_reasons == {"reset": 1} and "idle" not in stats.deadline_hits
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)
