"""BufferPool: bounded free list, bytes copies, leak and pinned-view detection."""

from __future__ import annotations

import logging

import pytest

from connserver import BufferPool
from connserver.apps.echo import EchoHandler
from connserver.buffers import LeaseAccount
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed


def test_free_list_is_bounded_however_large_the_burst():
    """Buffers returned beyond max_free are dropped, not kept."""
    pool = BufferPool(1024, max_free=4)
    buffers = [pool.acquire() for _ in range(100)]
    for buffer in buffers:
        pool.release(buffer)
    stats = pool.statistics()
    assert stats.free == 4 and stats.dropped == 96 and stats.leased == 0
    assert stats.allocated == 4 and stats.misses == 100
    pool.release(pool.acquire())
    assert pool.statistics().hits == 1


def test_a_buffer_still_viewed_is_not_reused(caplog):
    """Returning a buffer while a memoryview exports it is reported; it is dropped."""
    pool = BufferPool(1024, max_free=4)
    buffer = pool.acquire()
    view = memoryview(buffer)[:10]
    pool.release(buffer)
    assert pool.statistics().pinned == 1 and pool.statistics().free == 0
    assert "memoryview" in caplog.text
    view.release()


def test_paranoid_mode_records_the_whole_stack(caplog):
    """CONNSERVER_LEAK_DETECTION=paranoid reports leaks with their acquisition stack."""
    pool = BufferPool(1024, 4, leak_detection="paranoid")
    account = LeaseAccount()

    def take_a_lease():
        return pool.lease(account)

    lease = take_a_lease()
    with caplog.at_level(logging.ERROR):
        assert pool.check_account(account, "connection #9") == 1
    assert "take_a_lease" in caplog.text and "test_paranoid_mode" in caplog.text
    lease.release()
    lease.release()   # idempotent
    assert account.outstanding == 0
    with pytest.raises(ValueError):
        BufferPool(1024, 4, leak_detection="sometimes")


def test_idle_connections_hold_no_pooled_buffer(serve):
    """1,000 idle connections cost no pool memory: no buffer is leased while waiting."""
    server = serve(EchoHandler, idle_timeout=60.0, pool_max_free=8)
    clients = [connect(server) for _ in range(1000)]
    try:
        for client in clients[:50]:
            client.sendall(b"warm")
            assert client.recv(10) == b"warm"
        assert wait_for(lambda: server.stats().connections_active == 1000, 30)
        assert wait_for(lambda: all(info.operation == "idle" for info in server.connections()), 30)
        stats = server.buffer_pool.statistics()
        assert stats.leased == 0 and stats.allocated <= 8
    finally:
        for client in clients:
            client.close()
    wait_closed(server, 1000, timeout=60)
