"""A broadcast that one stalled subscriber must not hold back."""

from __future__ import annotations

import socket

import pytest

import connserver
from connserver.testing import wait_for
from tests.loopback.test_hub import publish_and_read
from tests.conftest import connect, wait_closed

from .support import assert_no_leftovers, assert_shutdown_clean, leak_snapshot

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked

HUB_THREADS = ("connserver-spare-", "connserver-hub")   # the hub's writer is the server's


class Subscriber(connserver.Handler):
    """Subscribes to the "news" hub; a client that says "S" gets a 64 KiB queue."""

    def handle(self):
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        kind = self.conn.recv(1)
        hub = self.server.hub("news")
        with hub.subscribe(self.conn, max_queue_bytes=64 * 1024 if kind == b"S" else None):
            while self.conn.recv():
                pass


def test_stalled_subscriber_meets_its_policy_and_healthy_ones_get_everything(serve):
    """50 healthy subscribers get all 5,000 messages in order; the stalled one is slow_consumer."""
    before = leak_snapshot()
    server = serve(Subscriber, idle_timeout=30.0, write_timeout=30.0)
    hub = server.hub("news", max_queue_bytes=4 << 20, max_queue_items=8192)
    # One subscriber comes and goes first, so the hub's writer thread and epoll
    # exist in the baseline: they belong to the server, not to a connection.
    with connect(server) as warmup:
        warmup.sendall(b"N")
        assert wait_for(lambda: hub.statistics().subscribers == 1)
    wait_closed(server, 1)
    baseline = leak_snapshot()

    stalled = socket.socket()
    healthy: list[socket.socket] = []
    messages = [b"%06d:" % i + b"m" * 93 + b"\n" for i in range(5000)]
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(10.0)
        stalled.connect(server.server_address)
        stalled.sendall(b"S")
        healthy.extend(connect(server) for _ in range(50))
        for client in healthy:
            client.sendall(b"N")
        assert wait_for(lambda: hub.statistics().subscribers == 51)
        slowest = publish_and_read(hub, healthy, messages, timeout=30.0)
        stats = wait_for(lambda: server.stats() if server.stats().close_reasons.get(
            "slow_consumer") else None)
        assert stats, "the stalled subscriber was not disconnected"
        # The stalled peer finds what fitted in the buffers, then the end of the stream.
        leftover = 0
        for _ in range(1000):
            chunk = stalled.recv(1 << 20)
            if not chunk:
                break
            leftover += len(chunk)
        else:
            pytest.fail("the stalled subscriber's stream did not end")
    finally:
        stalled.close()
        for client in healthy:
            client.close()
    hub_stats = hub.statistics()
    print(f"broadcast: 5,000 messages to 50 healthy subscribers, slowest publish "
          f"{slowest * 1000:.2f} ms; slow consumers {hub_stats.slow_consumers}")
    assert slowest < 0.5
    assert hub_stats.slow_consumers == 1 and hub_stats.write_deadlines == 0
    stats = wait_closed(server, 52)
    assert stats.close_reasons == {"eof": 51, "slow_consumer": 1}
    assert hub.statistics().subscribers == 0 and hub.statistics().queued_bytes == 0
    assert_no_leftovers(server, baseline, allowed_threads=HUB_THREADS)
    assert_shutdown_clean(server, before)
