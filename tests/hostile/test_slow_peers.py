"""Peers that are slow on purpose: trickling, silent, never reading, stalling mid-frame."""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

import pytest

import connserver
from connserver.apps.echo import EchoHandler, FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed

from .support import (assert_no_leftovers, assert_shutdown_clean, frame, leak_snapshot,
                      read_exactly)

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked


class ClosingTimes:
    """Server-side close times and reasons, recorded from connection_closed()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[float, connserver.CloseReason]] = []
        self.event = threading.Event()

    def add(self, reason: connserver.CloseReason) -> None:
        with self.lock:
            self.items.append((time.monotonic(), reason))
        self.event.set()


def test_slowloris_is_cut_at_the_read_deadline_not_later(serve):
    """One byte every 0.2 s inside a frame ends with read_deadline at read_timeout."""
    read_timeout = 1.0
    closing = ClosingTimes()

    class Echo(FramedEchoHandler):
        def connection_closed(self, reason):
            closing.add(reason)

    before = leak_snapshot()
    server = serve(Echo, idle_timeout=10.0, read_timeout=read_timeout)
    baseline = leak_snapshot()
    data = frame(b"x" * 100)
    with connect(server) as client:
        assert wait_for(lambda: [i for i in server.connections() if i.operation in ("idle", "parked")])
        started = time.monotonic()
        sent = 0
        # At most 10 s of trickling; the deadline should end it after 1 s. The wait
        # on the close event paces the bytes and notices the close at once.
        for sent in range(1, 51):
            try:
                client.sendall(data[sent - 1:sent])
            except OSError:
                break
            if closing.event.wait(0.2):
                break
        assert closing.event.is_set(), "the trickling peer was never cut off"
        assert client.recv(1) == b""
    (closed_at, reason), = closing.items
    elapsed = closed_at - started
    print(f"slowloris: cut {elapsed:.3f} s after the frame's first byte "
          f"(read_timeout {read_timeout} s), after {sent} bytes")
    assert reason is connserver.CloseReason.READ_DEADLINE
    # A deadline stretched by each byte (or a per-recv timeout) would never fire here.
    assert read_timeout - 0.02 <= elapsed <= read_timeout + 0.5
    assert 4 <= sent <= 8   # it really trickled, and was not let run past the deadline
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"read_deadline": 1}
    assert stats.deadline_hits == {"read": 1}
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


def test_silent_peers_meet_the_idle_deadline_while_an_honest_client_is_served(serve, fd_budget):
    """200 silent peers (one per address, under a per-IP cap) end with idle; echo serves on."""
    fd_budget(600)
    idle_timeout = 1.0
    before = leak_snapshot()
    server = serve(EchoHandler, idle_timeout=idle_timeout, max_connections_per_ip=1)
    baseline = leak_snapshot()
    honest = connect(server)
    silent: dict[socket.socket, float] = {}
    closed_after: list[float] = []
    latencies: list[float] = []

    def honest_roundtrip() -> None:
        started = time.monotonic()
        honest.sendall(b"ping")
        assert read_exactly(honest, 4) == b"ping"
        latencies.append(time.monotonic() - started)

    try:
        with selectors.DefaultSelector() as selector:
            for i in range(2, 202):
                sock = connect(server, source=f"127.0.0.{i}")
                silent[sock] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ)
                if i % 10 == 0:
                    honest_roundtrip()
            # Waiting for a first byte holds no pooled buffer, however many wait.
            assert wait_for(lambda: server.stats().connections_active == 201)
            assert server.buffer_pool.statistics().leased == 0
            deadline = time.monotonic() + idle_timeout + 10.0
            # Round trips on the honest connection until every silent one is closed.
            while selector.get_map() and time.monotonic() < deadline:
                honest_roundtrip()
                for key, _ in selector.select(0.01):
                    assert key.fileobj.recv(1) == b""
                    closed_after.append(time.monotonic() - silent[key.fileobj])
                    selector.unregister(key.fileobj)
            assert not selector.get_map(), f"{len(selector.get_map())} silent peers still open"
        honest.sendall(b"still here")
        assert read_exactly(honest, 10) == b"still here"
        # A handler finishes its books just after its peer saw the close.
        assert wait_for(lambda: server.stats().connections_active == 1)
    finally:
        honest.close()
        for sock in silent:
            sock.close()
    print(f"silent peers: 200 closed {min(closed_after):.3f}-{max(closed_after):.3f} s after "
          f"connecting (idle_timeout {idle_timeout} s); honest client: {len(latencies)} round "
          f"trips meanwhile, slowest {max(latencies) * 1000:.1f} ms")
    assert len(closed_after) == 200
    assert min(closed_after) >= idle_timeout - 0.02
    assert max(closed_after) < idle_timeout + 2.0
    assert len(latencies) > 20 and max(latencies) < 0.5
    stats = wait_closed(server, 201)
    assert stats.close_reasons == {"idle": 200, "eof": 1}
    assert stats.connections_rejected == 0   # the per-IP cap is not what stopped them
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


class Downloads(connserver.Handler):
    """Answers an 8-digit size with that many bytes, in 1 MiB writes; small send buffer."""

    # The healthy clients' downloads fit in their receive buffers, so their writes
    # complete at once: how fast this test reads them cannot meet a deadline.
    healthy_size = 64 << 10

    def setup(self):
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

    def handle(self):
        while request := self.conn.recv_exactly(8):
            remaining = int(request)
            while remaining:
                chunk = min(remaining, 1 << 20)
                self.conn.sendall(b"d" * chunk)
                remaining -= chunk


def test_zero_window_reader_meets_the_write_deadline_while_others_are_served(serve):
    """A peer that never reads a 64 MiB answer ends with write_deadline; 20 others download on."""
    write_timeout = 0.5
    closing = ClosingTimes()

    class Recorded(Downloads):
        def connection_closed(self, reason):
            closing.add(reason)

    before = leak_snapshot()
    server = serve(Recorded, write_timeout=write_timeout, idle_timeout=10.0)
    baseline = leak_snapshot()
    stalled = socket.socket()
    healthy: list[socket.socket] = []
    rounds = rounds_after = 0
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: the window
        stalled.settimeout(10.0)
        stalled.connect(server.server_address)
        healthy = [connect(server) for _ in range(20)]
        stalled.sendall(b"%08d" % (64 << 20))
        requested = time.monotonic()
        # Each healthy client downloads 64 KiB per round, one after another, until
        # the stalled peer was cut off and three more rounds went through after it.
        size = Downloads.healthy_size
        for rounds in range(1, 1001):
            for client in healthy:
                client.sendall(b"%08d" % size)
                assert len(read_exactly(client, size)) == size
            if closing.event.is_set():
                rounds_after += 1
                if rounds_after == 3:
                    break
        assert closing.event.is_set(), "the zero-window reader was never cut off"
        assert wait_for(lambda: server.stats().connections_active == 20)
    finally:
        stalled.close()
        for client in healthy:
            client.close()
    (closed_at, reason), = closing.items[:1]
    print(f"zero-window reader: cut {closed_at - requested:.3f} s after asking for 64 MiB "
          f"(write_timeout {write_timeout} s); 20 healthy clients did {rounds} rounds of "
          f"64 KiB downloads meanwhile")
    assert reason is connserver.CloseReason.WRITE_DEADLINE
    assert write_timeout - 0.02 <= closed_at - requested < write_timeout + 1.0
    stats = wait_closed(server, 21)
    assert stats.close_reasons == {"write_deadline": 1, "eof": 20}
    assert stats.deadline_hits == {"write": 1}
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


class ExactFrames(connserver.Handler):
    """Reads frames with recv_exactly: the body is read into a pooled buffer (a lease)."""

    def handle(self):
        while header := self.conn.recv_exactly(4):
            (size,) = struct.unpack("!I", header)
            body = self.conn.recv_exactly(size)
            self.conn.sendall(header + body)


@pytest.mark.parametrize("handler", [FramedEchoHandler, ExactFrames], ids=["codec", "recv_exactly"])
def test_stalled_frame_meets_the_read_deadline_and_returns_its_buffer(serve, handler):
    """A prefix declaring 1,000 bytes, 10 sent, then silence: read_deadline, no lease kept."""
    read_timeout = 0.5
    before = leak_snapshot()
    server = serve(handler, idle_timeout=10.0, read_timeout=read_timeout)
    baseline = leak_snapshot()
    with connect(server) as client:
        client.sendall(frame(b"ok"))
        assert read_exactly(client, 6) == frame(b"ok")
        started = time.monotonic()
        client.sendall(struct.pack("!I", 1000) + b"x" * 10)
        # Blocked in the body's read once the 14 bytes are counted (the operation is
        # set just before each recv returns and counts, so wait for both).
        reading = wait_for(lambda: [i for i in server.connections()
                                    if i.operation in ("read", "parked") and i.bytes_in == 6 + 14])
        assert reading, server.connections()
        # The codec buffers the partial frame itself; recv_exactly holds a pooled buffer.
        held = server.buffer_pool.statistics().leased
        assert held == (0 if handler is FramedEchoHandler else 1)
        assert client.recv(1) == b""
        elapsed = time.monotonic() - started
    print(f"stalled frame ({handler.__name__}): cut {elapsed:.3f} s after the 14 bytes "
          f"(read_timeout {read_timeout} s); pooled buffers held while stalled: {held}")
    assert read_timeout - 0.02 <= elapsed < read_timeout + 1.0   # and far from idle_timeout
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"read_deadline": 1}
    assert server.buffer_pool.statistics().leaks_detected == 0
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)
