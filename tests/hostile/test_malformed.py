"""Peers that lie about sizes or vanish with a reset."""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
import tracemalloc

import pytest

import connserver
from connserver.apps.echo import FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed

from .support import assert_no_leftovers, assert_shutdown_clean, frame, leak_snapshot, read_exactly

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked


def test_huge_length_prefixes_are_refused_at_once_without_allocating(serve, caplog):
    """A 0xFFFFFFFF or max_frame_size + 1 prefix: frame_too_large at once, no body, no big alloc."""
    max_frame_size = 16 << 20
    caplog.set_level(logging.INFO, logger="connserver.access")
    before = leak_snapshot()
    server = serve(FramedEchoHandler, max_frame_size=max_frame_size,
                   idle_timeout=10.0, read_timeout=10.0)
    baseline = leak_snapshot()
    with connect(server) as client:   # warm up: the pool has a buffer, a thread is spare
        client.sendall(frame(b"hello"))
        assert read_exactly(client, 9) == frame(b"hello")
    wait_closed(server, 1)
    elapsed = {}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for size in (0xFFFFFFFF, max_frame_size + 1):
            with connect(server) as client:
                started = time.monotonic()
                client.sendall(struct.pack("!I", size))   # the header only: no body ever comes
                assert client.recv(1) == b""
                elapsed[size] = time.monotonic() - started
        stats = wait_closed(server, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"huge prefixes: refused in {', '.join(f'{t * 1000:.1f} ms' for t in elapsed.values())}"
          f"; tracemalloc peak {peak / 1024:.0f} KiB for announced sizes of 4 GiB and 16 MiB + 1")
    assert stats.close_reasons == {"eof": 1, "frame_too_large": 2}
    assert all(t < 0.5 for t in elapsed.values())   # not at a deadline (10 s)
    assert peak < 1 << 20, f"peak {peak} bytes while refusing a {max_frame_size + 1}-byte frame"

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "connserver.access"
                and "frame_too_large" in r.getMessage()]

    # The access line is written just after the close is counted: wait for it.
    wait_for(lambda: len(access_lines()) == 2)
    access = access_lines()
    assert len(access) == 2, access
    assert all(re.search(r"\bbytes_in=4\b", line) for line in access), access   # the header only
    assert server.buffer_pool.statistics().leaks_detected == 0
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


def test_reset_in_the_middle_of_an_8_mib_write_is_an_ordinary_close(serve, caplog):
    """SO_LINGER 0 then close while the server sends 8 MiB: reset, and no traceback at ERROR."""
    writing = threading.Event()

    class Sender(connserver.Handler):
        def handle(self):
            while self.conn.recv():
                writing.set()
                self.conn.sendall(b"z" * (8 << 20))

    caplog.set_level(logging.DEBUG, logger="connserver")
    before = leak_snapshot()
    server = serve(Sender, idle_timeout=10.0, write_timeout=10.0)
    baseline = leak_snapshot()
    client = connect(server)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sendall(b"go")
        assert writing.wait(10.0)
        assert len(read_exactly(client, 1 << 20)) == 1 << 20   # mid-write, for sure
        assert wait_for(lambda: [i for i in server.connections() if i.operation == "write"])
    finally:
        client.close()   # with SO_LINGER (1, 0): a reset, not a FIN
    stats = wait_closed(server, 1)
    info = [r for r in caplog.records if r.name == "connserver.conn"]
    print(f"reset mid-write: close reasons {stats.close_reasons}; connserver.conn said "
          f"{[(r.levelname, r.getMessage()) for r in info]}")
    assert stats.close_reasons in ({"reset": 1}, {"eof": 1})
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)
