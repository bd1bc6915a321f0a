"""Hub: fan-out that a stalled subscriber cannot stall, with one writer thread per hub."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

import connserver
from connserver import CloseReason, Hub
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.tls_support import ca, certs, tls_client  # noqa: F401 (fixtures)

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked


class Subscriber(connserver.Handler):
    """Subscribes to the test hub and waits for the peer to leave.

    A client that says "S" is the stalled one: it gets a 64 KiB queue; the others
    get the hub's 2 MiB, enough to absorb the whole burst.
    """

    policy = "disconnect"

    def handle(self):
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        hub = self.server.hub("test")
        kind = self.conn.recv(1)
        with hub.subscribe(self.conn, policy=self.policy,
                           max_queue_bytes=64 * 1024 if kind == b"S" else None):
            while self.conn.recv():
                pass


def read_all(clients: list[socket.socket], expected: int, timeout: float = 30.0) -> dict:
    """Read from every client until each has `expected` bytes (bounded in time)."""
    received = {client: bytearray() for client in clients}
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.setblocking(False)
            selector.register(client, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                chunk = key.fileobj.recv(65536)
                received[key.fileobj] += chunk
                if not chunk or len(received[key.fileobj]) >= expected:
                    selector.unregister(key.fileobj)
    return received


def publish_and_read(hub: connserver.Hub, readers: list[socket.socket], messages: list[bytes],
                     timeout: float = 40.0) -> float:
    """Publish every message while a thread reads them all from every reader; check that
    each got all of them in order; return the slowest publish() in seconds."""
    expected = b"".join(messages)
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(read_all(readers, len(expected), timeout)),
                              name="test-readers")
    reader.start()
    slowest = 0.0
    try:
        for message in messages:
            started = time.monotonic()
            hub.publish(message)
            slowest = max(slowest, time.monotonic() - started)
    finally:
        reader.join(timeout + 10.0)
    assert not reader.is_alive(), "the readers did not finish"
    for client in readers:
        assert result[client] == expected
    return slowest


def test_stalled_subscriber_cannot_stall_the_others(serve):
    """50 readers get all 10,000 messages in order; the stalled one is disconnected."""
    server = serve(Subscriber, idle_timeout=60.0)
    hub = server.hub("test", max_queue_bytes=2 * 1024 * 1024, max_queue_items=16384)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(server.server_address)
    stalled.sendall(b"S")
    readers = [connect(server) for _ in range(50)]
    for client in readers:
        client.sendall(b"N")
    try:
        assert wait_for(lambda: hub.statistics().subscribers == 51)
        messages = [b"%06d:" % i + b"m" * 93 + b"\n" for i in range(10_000)]
        slowest = publish_and_read(hub, readers, messages)
        assert slowest < 0.5, f"publish took {slowest:.3f} s"
        stats = wait_for(lambda: server.stats() if server.stats().close_reasons.get("slow_consumer")
                         else None)
        assert stats.close_reasons == {"slow_consumer": 1}
        assert hub.statistics().slow_consumers == 1
    finally:
        stalled.close()
        for client in readers:
            client.close()
    wait_closed(server, 51)
    assert hub.statistics().subscribers == 0 and hub.statistics().queued_bytes == 0


def test_drop_oldest_keeps_the_subscriber_and_bounds_its_queue(serve):
    """drop_oldest keeps a stalled subscriber connected with a bounded queue."""
    class Dropper(Subscriber):
        policy = "drop_oldest"

    server = serve(Dropper, idle_timeout=60.0)
    hub = server.hub("test", max_queue_bytes=64 * 1024)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(server.server_address)
    stalled.sendall(b"S")
    try:
        assert wait_for(lambda: hub.statistics().subscribers == 1)
        for i in range(5000):
            hub.publish(b"x" * 100)
        stats = hub.statistics()
        assert stats.queued_bytes <= 64 * 1024 and stats.dropped > 0
        assert server.stats().connections_active == 1
    finally:
        stalled.close()
    wait_closed(server, 1)


def test_own_writes_are_queued_in_order_with_broadcasts(serve):
    """While subscribed, conn.sendall goes through the hub, in order with publishes."""
    class Announcer(connserver.Handler):
        def handle(self):
            hub = self.server.hub("order")
            with hub.subscribe(self.conn):
                hub.publish(b"one\n")
                self.conn.sendall(b"two\n")
                hub.publish(b"three\n")
                self.conn.recv()

    server = serve(Announcer)
    with connect(server) as client:
        received = b""
        while received.count(b"\n") < 3:
            received += client.recv(100)
        assert received == b"one\ntwo\nthree\n"
    wait_closed(server, 1)


def test_subscriber_blocked_on_a_full_socket_meets_the_write_deadline():
    """A subscriber whose socket takes nothing for write_timeout is cancelled."""
    server_side, client = socket.socketpair()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn = connserver.Connection(server_side, "peer", id=1, config=connserver.Config(),
                                 pool=connserver.BufferPool(4096, 1))
    hub = Hub(name="deadline", max_queue_bytes=1 << 20, write_timeout=0.2)
    try:
        with hub.subscribe(conn):
            for _ in range(200):
                hub.publish(b"x" * 1000)
            assert conn.cancel_token.wait_cancelled(10)
            assert conn.cancel_token.reason is CloseReason.WRITE_DEADLINE
        assert hub.statistics().write_deadlines == 1
    finally:
        assert hub.close()
        conn.close()
        client.close()


def test_hub_refuses_a_blocking_policy():
    """publish() must never block, so the block policy is not allowed."""
    with pytest.raises(ValueError):
        Hub(policy="block")


# --- over TLS: the writer encrypts per subscriber, and never blocks --------------------


def read_tls(client, expected: int, timeout: float = 30.0) -> bytes:
    """Read from a TLS client socket until ``expected`` bytes came (bounded in time)."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def test_a_large_broadcast_reaches_a_tls_subscriber_intact_and_in_order(serve, ca, certs):
    """1 MiB of broadcasts, interleaved with the handler's own sends, arrives over TLS in order."""
    chunks = [b"%05d:" % i + bytes([65 + i % 26]) * 4090 for i in range(256)]   # 1 MiB

    class Broadcaster(connserver.Handler):
        def handle(self):
            # A small send buffer: the writer fills it and resumes half-way through records.
            self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            hub = self.server.hub("big", max_queue_bytes=8 << 20)
            with hub.subscribe(self.conn):
                assert self.conn.recv(5) == b"start"
                for index, chunk in enumerate(chunks):
                    hub.publish(chunk)
                    self.conn.sendall(b"direct %d\n" % index)
                while self.conn.recv() == b"ping":   # read while subscribed; reply through the hub
                    self.conn.sendall(b"pong\n")

    server = serve(Broadcaster, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    expected = b"".join(chunk + b"direct %d\n" % index for index, chunk in enumerate(chunks))
    with tls_client(server, ca) as client:
        client.sendall(b"start")
        assert read_tls(client, len(expected)) == expected
        client.sendall(b"ping")
        assert read_tls(client, 5) == b"pong\n"
    assert wait_closed(server, 1).close_reasons == {"eof": 1}
    stats = server.hub("big").statistics()
    assert stats.subscribers == 0 and stats.slow_consumers == 0


def test_a_stalled_tls_subscriber_meets_the_hub_policy(serve, ca, certs):
    """Over TLS too, a subscriber that stops reading is disconnected; a reader gets everything."""
    server = serve(Subscriber, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"], idle_timeout=60.0)
    hub = server.hub("test", max_queue_bytes=4 << 20)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled = tls_client(server, ca, raw=raw)
    try:
        reader = tls_client(server, ca)
    except BaseException:
        stalled.close()
        raise
    try:
        stalled.sendall(b"S")
        reader.sendall(b"N")
        assert wait_for(lambda: hub.statistics().subscribers == 2)
        messages = [b"%06d:" % i + b"m" * 993 + b"\n" for i in range(2000)]   # 2 MB
        expected = b"".join(messages)
        result: list = []
        thread = threading.Thread(target=lambda: result.append(read_tls(reader, len(expected))),
                                  name="test-tls-reader")
        thread.start()
        try:
            for message in messages:
                hub.publish(message)
        finally:
            thread.join(40.0)
        assert not thread.is_alive(), "the reader did not finish"
        assert result == [expected]
        assert wait_for(lambda: hub.statistics().slow_consumers == 1)
    finally:
        stalled.close()
        reader.close()
    reasons = wait_closed(server, 2).close_reasons
    assert reasons.get("slow_consumer") == 1 and sum(reasons.values()) == 2


def test_tls_bytes_made_by_the_reading_thread_go_out_behind_the_writers(serve, ca, certs):
    """Ciphertext the handler thread makes while subscribed follows the writer's unsent records."""
    messages = [b"%05d:" % i + b"x" * 1000 + b"\n" for i in range(512)]
    ready = threading.Event()

    class Injector(connserver.Handler):
        def handle(self):
            conn = self.conn
            conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            hub = self.server.hub("inject", max_queue_bytes=8 << 20)
            with hub.subscribe(conn) as subscription:
                for message in messages[:256]:
                    hub.publish(message)
                # The writer now holds records the socket did not take (the client waits).
                assert wait_for(lambda: subscription.blocked_since is not None)
                # As reading makes ciphertext (a TLS 1.3 key update): made on this thread.
                with conn.tls.lock:
                    conn.tls._ssl.write(b"<made while reading>\n")
                conn._tls_flush_output()
                for message in messages[256:]:
                    hub.publish(message)
                ready.set()
                while conn.recv():
                    pass

    server = serve(Injector, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with tls_client(server, ca, raw=raw) as client:
        assert ready.wait(10.0)
        expected = b"".join(messages)
        received = read_tls(client, len(expected) + len(b"<made while reading>\n"))
    assert received.count(b"<made while reading>\n") == 1
    assert received.replace(b"<made while reading>\n", b"") == expected
    wait_closed(server, 1)
