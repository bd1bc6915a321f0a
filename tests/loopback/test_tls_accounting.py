"""TLS byte accounting: ``bytes_sent`` is the plaintext of the records the kernel took.

Sealed is not sent: a reply's ciphertext may wait (parked, in the session; a hub
subscriber's, in its writer) and die with the connection. Each test ends the
connection, then lets the client read all the kernel still delivers, and holds
the server's count to what the client could decrypt: equal, to the byte (the
plaintext of a record cut short by the end counts on neither side). Where the
server's kernel drops what the client had not acknowledged (a reset), what the
client decrypts is ``bytes_sent - bytes_unacked``, the access log's ``bytes_out``.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl

import pytest

import connserver
from connserver.testing import wait_for
from tests.conftest import wait_closed
from tests.loopback.test_parking import frame, read_frame
from tests.tls_support import ca, certs, tls_client  # noqa: F401 (fixtures)

pytestmark = pytest.mark.both_modes

_SNDBUF = 64 * 1024   # the server's send buffer: far less than the replies below
_TCP_CLOSE = 7   # tcpi_state once a reset came (linux/tcp_states.h)


def stalled_client(server: connserver.Server, ca, rcvbuf: int = 4096) -> ssl.SSLSocket:
    """A TLS client with a small receive buffer, that reads only when told."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return tls_client(server, ca, raw=raw)


def read_to_end(client: ssl.SSLSocket) -> int:
    """Plaintext bytes the client reads until the server's end of stream (or a reset)."""
    total = 0
    while True:
        try:
            chunk = client.recv(1 << 16)
        except (ssl.SSLEOFError, ConnectionResetError):
            return total   # a record cut short by the end: its plaintext never arrives
        if not chunk:
            return total
        total += len(chunk)


class BigReply(connserver.FramedHandler):
    """Answers any frame with a 4 MiB one, through a small send buffer."""

    def handle_frame(self, payload: bytes) -> bytes:
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        return b"r" * (4 << 20)


def test_a_reply_that_dies_unsent_is_not_counted_as_sent(serve, ca, certs):
    """A 4 MiB reply to a client that stops reading meets the write deadline; bytes_sent
    is what the client then decrypts, not the 4 MiB sealed (parked, most of it waited
    as ciphertext in the session when the connection ended)."""
    server = serve(BigReply, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   write_timeout=0.5, max_write_buffer=64 << 20)
    with stalled_client(server, ca) as client:
        client.sendall(frame(b"go"))
        stats = wait_closed(server, 1)
        received = read_to_end(client)
    assert stats.close_reasons == {"write_deadline": 1}
    assert 0 < received < 4 << 20
    assert stats.bytes_sent == received


def test_unacknowledged_ciphertext_counts_as_the_plaintext_it_carries(serve, ca, certs, caplog):
    """A 4 MiB reply to a client that stops reading meets the write deadline, then the
    client's data makes the server's kernel reset the connection, dropping all the
    client had not acknowledged: the access log's bytes_out is exactly the plaintext the
    client still decrypts (bytes_unacked is plaintext too, not the kernel's ciphertext)."""
    caplog.set_level(logging.INFO, logger="connserver.access")
    server = serve(BigReply, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   write_timeout=0.5, max_write_buffer=64 << 20)
    with stalled_client(server, ca, rcvbuf=40_000) as client:   # a few records' worth
        client.sendall(frame(b"go"))
        stats = wait_closed(server, 1)
        # Data after the server's end: the closed socket answers with a reset (RFC 1122).
        client.sendall(b"after the end")
        assert wait_for(lambda: client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                        == _TCP_CLOSE)
        received = read_to_end(client)
    lines = [entry.getMessage() for entry in caplog.records if entry.name == "connserver.access"]
    assert len(lines) == 1
    bytes_out = int(re.search(r"bytes_out=(-?\d+)", lines[0]).group(1))
    assert stats.close_reasons == {"write_deadline": 1}
    assert stats.bytes_unacked > 0 and 0 < received < stats.bytes_sent
    assert bytes_out == stats.bytes_sent - stats.bytes_unacked == received


class Subscriber(connserver.Handler):
    """Subscribes to the hub (a 64 KiB queue, disconnect policy) until the peer leaves."""

    def handle(self) -> None:
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        hub = self.server.hub("accounting")
        self.conn.recv(1)
        with hub.subscribe(self.conn, policy="disconnect", max_queue_bytes=64 * 1024):
            while self.conn.recv():
                pass


def test_a_tls_subscribers_unsent_records_are_not_counted_as_sent(serve, ca, certs):
    """A TLS subscriber that stops reading is a slow consumer; the records its hub writer
    had sealed but the socket never took are not in bytes_sent."""
    server = serve(Subscriber, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   idle_timeout=60.0)
    hub = server.hub("accounting")
    with stalled_client(server, ca) as client:
        client.sendall(b"S")
        assert wait_for(lambda: hub.statistics().subscribers == 1)
        message = b"m" * 999 + b"\n"
        for _ in range(20_000):   # 20 MB: far past what the socket and the queue take
            hub.publish(message)
            if hub.statistics().slow_consumers:
                break
        stats = wait_closed(server, 1)
        received = read_to_end(client)
    assert stats.close_reasons == {"slow_consumer": 1}
    assert 0 < received
    assert stats.bytes_sent == received


class Sizes(connserver.FramedHandler):
    """Replies to a frame holding a size with that many bytes."""

    def handle_frame(self, payload: bytes) -> bytes:
        return b"s" * int(payload)


def test_a_normal_exchange_counts_every_plaintext_byte(serve, ca, certs):
    """Replies of every size around a record's (16 KiB) and a write step's (256 KiB),
    all read by the client: bytes_sent is exactly what it read, bytes_received what it sent."""
    server = serve(Sizes, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    sizes = [0, 1, 16383, 16384, 16385, 100_000, 262_144, 300_001, 1 << 20]
    sent = received = 0
    with tls_client(server, ca) as client:
        for size in sizes:
            request = frame(b"%d" % size)
            client.sendall(request)
            sent += len(request)
            assert read_frame(client) == b"s" * size
            received += 4 + size
    stats = wait_closed(server, 1)
    assert (stats.bytes_received, stats.bytes_sent) == (sent, received)


def test_a_subscriber_that_reads_everything_is_counted_exactly(serve, ca, certs):
    """1 MB broadcast to a TLS subscriber that reads it all: bytes_sent equals it."""
    server = serve(Subscriber, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   idle_timeout=60.0)
    hub = server.hub("accounting")
    messages = [b"%05d:" % i + b"x" * 993 + b"\n" for i in range(1000)]
    expected = sum(len(message) for message in messages)
    with tls_client(server, ca) as client:
        client.sendall(b"N")
        assert wait_for(lambda: hub.statistics().subscribers == 1)
        received = 0
        for start in range(0, len(messages), 50):   # within the 64 KiB queue
            batch = messages[start:start + 50]
            for message in batch:
                hub.publish(message)
            goal = received + sum(len(message) for message in batch)
            while received < goal:
                chunk = client.recv(1 << 16)
                assert chunk, "closed"
                received += len(chunk)
        assert received == expected
    stats = wait_closed(server, 1)
    assert stats.bytes_sent == expected
