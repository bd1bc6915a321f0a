"""Shutting down under a crowd: idle peers and peers caught mid-frame."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from connserver.apps.echo import FramedEchoHandler
from connserver.testing import find_leaks, wait_for
from tests.conftest import connect

from .support import frame, leak_snapshot, read_exactly

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked


def test_graceful_shutdown_with_a_thousand_idle_and_ten_mid_frame(serve, fd_budget):
    """1,000 idle + 10 mid-frame peers: listener shut at once, drained in grace, no thread left."""
    fd_budget(2560)
    grace = 5.0
    before = leak_snapshot()
    server = serve(FramedEchoHandler, idle_timeout=60.0, read_timeout=60.0)
    address = server.server_address
    idle: list[socket.socket] = []
    mid_frame: list[socket.socket] = []
    reports = []
    try:
        idle.extend(connect(server) for _ in range(1000))
        mid_frame.extend(connect(server) for _ in range(10))
        for client in mid_frame:
            client.sendall(frame(b"ok"))
            assert read_exactly(client, 6) == frame(b"ok")
            client.sendall(struct.pack("!I", 100) + b"x" * 10)
        assert wait_for(lambda: server.stats().connections_active == 1010, 30.0)
        # The ten have their partial frame in (parked or blocked reading the rest).
        assert wait_for(lambda: [i.bytes_in for i in server.connections()].count(6 + 14) == 10)

        stopper = threading.Thread(target=lambda: reports.append(server.shutdown(grace=grace)),
                                   name="test-shutdown")
        started = time.monotonic()
        stopper.start()
        assert wait_for(lambda: server.socket.fileno() == -1, 5.0)
        listener_closed = time.monotonic() - started
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5.0).close()
        stopper.join(grace + 10.0)
        assert not stopper.is_alive(), "shutdown() did not return"
        # Every peer sees its connection end.
        for client in idle + mid_frame:
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for client in idle + mid_frame:
            client.close()
    report, = reports
    print(f"graceful shutdown: listener closed after {listener_closed * 1000:.1f} ms; "
          f"{report.connections_at_start} connections, {report.drained} drained, "
          f"{report.forced} forced, in {report.duration:.3f} s (grace {grace} s)")
    assert listener_closed < 0.5
    assert report.connections_at_start == 1010
    assert report.drained + report.forced == 1010 and report.clean
    assert report.duration < grace + 1.5
    stats = server.stats()
    assert stats.close_reasons == {"shutdown": 1010}
    assert stats.connections_active == 0 and server.connections() == []
    assert server.limiter.addresses_tracked() == 0 and server.buffer_pool.statistics().leased == 0
    alive = [t.name for t in threading.enumerate() if t.name.startswith("connserver-")]
    assert not alive, alive
    server.server_close()
    problems = find_leaks(before)
    assert not problems, "\n".join(problems)
