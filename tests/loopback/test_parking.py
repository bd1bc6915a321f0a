"""Parked mode (Config.park): what only it does — no thread per waiting connection, replies
that wait in a bounded queue instead of in a thread, deadlines without a thread.

(Everything both modes share runs in both: see the both_modes marker.)
"""

from __future__ import annotations

import logging
import socket
import struct
import threading

import pytest

import connserver
from connserver import CloseReason
from connserver.apps.echo import FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes:
    header = _read(sock, 4)
    (size,) = struct.unpack("!I", header)
    return _read(sock, size)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed"
        data += chunk
    return data


def connserver_threads() -> int:
    return len([t for t in threading.enumerate() if t.name.startswith("connserver-")])


def test_waiting_connections_hold_no_thread(serve):
    """200 parked connections, each served once, then idle: the thread count does not grow."""
    server = serve(FramedEchoHandler, park=True, min_spare_threads=0, max_spare_threads=0)
    before = connserver_threads()
    clients = [connect(server) for _ in range(200)]
    try:
        for index, client in enumerate(clients):
            client.sendall(frame(b"%d" % index))
        for index, client in enumerate(clients):
            assert read_frame(client) == b"%d" % index
        assert wait_for(lambda: len(server.connections()) == 200)
        assert connserver_threads() == before   # a burst of 200 started no thread
        assert wait_for(lambda: {info.operation for info in server.connections()} == {"parked"})
    finally:
        for client in clients:
            client.close()
    wait_closed(server, 200)


def test_a_reply_the_peer_does_not_take_waits_parked_and_arrives_whole(serve):
    """A 4 MiB reply to a peer that reads later: queued without holding a thread, then
    delivered whole and in order once the peer reads."""
    big = bytes(range(256)) * (16 * 1024)

    class Big(connserver.FramedHandler):
        def handle_frame(self, payload):
            return big if payload == b"big" else payload

    server = serve(Big, park=True, max_write_buffer=8 << 20, min_spare_threads=0,
                   max_spare_threads=0)
    with connect(server) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        client.sendall(frame(b"big"))
        assert wait_for(lambda: [i for i in server.connections() if i.bytes_out > 0])
        client.sendall(frame(b"after"))   # handled once the queue has gone out
        assert read_frame(client) == big
        assert read_frame(client) == b"after"
    wait_closed(server, 1)


def test_a_peer_that_never_reads_is_a_slow_consumer_past_max_write_buffer(serve):
    """Replies piling up past max_write_buffer end the connection as slow_consumer."""
    class Flood(connserver.FramedHandler):
        def handle_frame(self, payload):
            return b"x" * 64 * 1024

    server = serve(Flood, park=True, max_write_buffer=256 * 1024)
    with connect(server) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(200):
            try:
                client.sendall(frame(b"more"))
            except OSError:
                break
        stats = wait_closed(server, 1)
    assert stats.close_reasons == {"slow_consumer": 1}


def test_a_queued_reply_meets_the_write_deadline(serve):
    """A reply the peer stops taking ends the connection at write_timeout (write_deadline)."""
    class Big(connserver.FramedHandler):
        def handle_frame(self, payload):
            return b"y" * (32 << 20)   # more than the kernel's buffers take

    server = serve(Big, park=True, write_timeout=0.3, max_write_buffer=64 << 20)
    with connect(server) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(frame(b"go"))
        stats = wait_closed(server, 1)
    assert stats.close_reasons == {"write_deadline": 1}
    assert stats.deadline_hits == {"write": 1}


@pytest.mark.parametrize("config, why", [
    ({"max_running": 2}, "max_running"),
])
def test_what_cannot_be_parked_yet_runs_on_threads_and_says_why(serve, caplog, config, why):
    """Configurations parking does not cover yet fall back to thread mode, with a warning."""
    caplog.set_level(logging.WARNING, logger="connserver.server")
    serve(FramedEchoHandler, park=True, **config)
    assert any("park: serving FramedEchoHandler in thread mode" in r.getMessage() and
               why in r.getMessage() for r in caplog.records)


def test_a_raw_handler_is_never_parked(serve, caplog):
    """Handler.handle() keeps its thread: park applies to message handlers only."""
    caplog.set_level(logging.WARNING, logger="connserver.server")
    serve(connserver.Handler, park=True)
    assert any("only message handlers" in r.getMessage() for r in caplog.records)


def test_cancelling_a_parked_connection_needs_no_thread_to_wake(serve):
    """server.cancel() on a parked connection ends it at once, with the reason given."""
    server = serve(FramedEchoHandler, park=True)
    with connect(server) as client:
        client.sendall(frame(b"hi"))
        assert read_frame(client) == b"hi"
        conn_id = wait_for(lambda: server.connections())[0].id
        assert server.cancel(conn_id, CloseReason.LIMIT)
        assert client.recv(1) == b""
    assert wait_closed(server, 1).close_reasons == {"limit": 1}


def test_a_drain_delivers_replies_still_queued(serve):
    """Shutdown while a parked connection has a reply queued: the reply arrives whole first."""
    big = b"z" * (16 << 20)

    class Big(connserver.FramedHandler):
        def handle_frame(self, payload):
            return big

    server = serve(Big, park=True, max_write_buffer=64 << 20, graceful_timeout=10.0)
    with connect(server) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        client.sendall(frame(b"go"))
        assert wait_for(lambda: [i for i in server.connections() if i.bytes_out > 0])
        reports = []
        drain = threading.Thread(target=lambda: reports.append(server.shutdown(grace=10.0)))
        drain.start()
        try:
            assert read_frame(client) == big
            assert client.recv(1) == b""
        finally:
            drain.join(15)
    assert reports[0].drained == 1 and reports[0].forced == 0


def test_a_rate_limited_connection_waits_parked(serve):
    """on_rate_limit="wait", parked: frames over the limit wait with no thread and the
    socket unread (operation rate_wait), are handled in order as tokens come, and other
    connections are served meanwhile by the one pool thread."""
    server = serve(FramedEchoHandler, park=True, park_threads=1, rate=10.0, burst=1,
                   on_rate_limit="wait", min_spare_threads=0, max_spare_threads=0)
    assert server.parks
    threads = connserver_threads()
    with connect(server) as limited, connect(server) as other:
        limited.sendall(b"".join(frame(b"%d" % index) for index in range(6)))
        assert read_frame(limited) == b"0"
        assert wait_for(lambda: "rate_wait" in {i.operation for i in server.connections()})
        other.sendall(frame(b"meanwhile"))
        assert read_frame(other) == b"meanwhile"   # the pool thread is not waiting
        assert connserver_threads() == threads
        assert [read_frame(limited) for _ in range(5)] == [b"%d" % i for i in range(1, 6)]
        limited.sendall(frame(b"again"))
        assert read_frame(limited) == b"again"
    assert wait_closed(server, 2).close_reasons == {"eof": 2}


def test_cancelling_a_rate_wait_ends_it_at_once(serve):
    """A parked rate wait (10 s for the next token) ends at once when cancelled: the
    frames held back are not handled, the reason is the one given."""
    handled: list = []

    class Recording(FramedEchoHandler):
        def handle_frame(self, payload):
            handled.append(payload)
            return payload

    server = serve(Recording, park=True, rate=0.1, burst=1, on_rate_limit="wait")
    with connect(server) as client:
        client.sendall(frame(b"first") + frame(b"held"))
        assert read_frame(client) == b"first"
        assert wait_for(lambda: "rate_wait" in {i.operation for i in server.connections()})
        (info,) = server.connections()
        assert server.cancel(info.id, CloseReason.CANCELLED)
        stats = wait_closed(server, 1, timeout=2.0)
    assert stats.close_reasons == {"cancelled": 1}
    assert handled == [b"first"]


def test_a_rate_wait_is_not_idleness(serve):
    """Waiting for tokens is not idleness: a wait longer than idle_timeout ends in
    the held frame being handled, not in an idle close."""
    server = serve(FramedEchoHandler, park=True, rate=2.0, burst=1, on_rate_limit="wait",
                   idle_timeout=0.2, read_timeout=0.2)
    with connect(server) as client:
        client.sendall(frame(b"one") + frame(b"two") + frame(b"three"))
        assert [read_frame(client) for _ in range(3)] == [b"one", b"two", b"three"]
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


class BigThenEnd(FramedEchoHandler):
    """Answers ``big`` with 4 MiB and ends the connection; ``goodbye`` at a shutdown."""

    def handle_frame(self, payload):
        if payload == b"big":
            self.end()
            return b"x" * (4 << 20)
        return payload

    def goodbye(self, reason):
        return b"bye: " + reason.value.encode()


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_end_with_replies_queued_delivers_them_without_a_thread(serve):
    """A reply the socket could not take, then end(): the connection lingers parked
    (operation linger, no thread) until the peer has read all of it, then EOF."""
    server = serve(BigThenEnd, park=True, max_write_buffer=8 << 20,
                   min_spare_threads=0, max_spare_threads=0)
    threads = connserver_threads()
    with connect(server) as client:
        client.sendall(frame(b"big"))
        assert wait_for(lambda: {i.operation for i in server.connections()} == {"linger"})
        assert connserver_threads() == threads
        received = read_to_eof(client)
    assert received == frame(b"x" * (4 << 20))
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"closed": 1} and stats.bytes_unacked == 0
    assert connserver_threads() == threads


def test_a_parked_linger_ends_at_its_timeout_and_counts_what_never_arrived(serve):
    """A peer that never reads: the parked end waits linger_timeout, no longer, and
    counts the bytes the peer did not acknowledge."""
    server = serve(BigThenEnd, park=True, max_write_buffer=8 << 20, linger_timeout=0.3,
                   min_spare_threads=0, max_spare_threads=0)
    threads = connserver_threads()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    try:
        client.connect(server.server_address)
        client.sendall(frame(b"big"))
        stats = wait_closed(server, 1, timeout=3.0)
        assert connserver_threads() == threads
    finally:
        client.close()
    assert stats.close_reasons == {"closed": 1}
    assert stats.bytes_unacked > 0


def test_a_shutdown_says_goodbye_and_drains_parked_connections_without_threads(serve):
    """A shutdown of 50 parked connections: each gets its goodbye after the replies it
    had, delivered, all drained, and no thread was started for their ends."""
    server = serve(BigThenEnd, park=True, min_spare_threads=0, max_spare_threads=0)
    threads = connserver_threads()
    clients = [connect(server) for _ in range(50)]
    try:
        for index, client in enumerate(clients):
            client.sendall(frame(b"%d" % index))
        for index, client in enumerate(clients):
            assert read_frame(client) == b"%d" % index
        assert wait_for(lambda: len(server.connections()) == 50)
        report = server.shutdown(grace=5.0)
        assert (report.drained, report.forced) == (50, 0)
        assert connserver_threads() <= threads
        for client in clients:
            assert read_to_eof(client) == frame(b"bye: shutdown")
    finally:
        for client in clients:
            client.close()


def test_a_rate_wait_ends_even_when_the_peer_stopped_reading(serve):
    """A rate wait over while the socket is full (the peer stopped reading): the
    connection is still served (the held frame's reply queues) and the write deadline
    then ends it, rather than it waiting for writability forever."""
    class Flood(FramedEchoHandler):
        def handle_frame(self, payload):
            return b"x" * (1 << 20)

    server = serve(Flood, park=True, rate=5.0, burst=1, on_rate_limit="wait",
                   write_timeout=0.5, max_write_buffer=64 << 20)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    try:
        client.connect(server.server_address)
        client.sendall(frame(b"a") * 3)
        stats = wait_closed(server, 1, timeout=5.0)
    finally:
        client.close()
    assert stats.close_reasons == {"write_deadline": 1}


def test_the_idle_timeout_holds_when_it_is_shorter_than_the_handshake_timeout(serve):
    """A parked connection's first watchdog look is at its handshake deadline; once it
    is parked idle, an earlier idle deadline is scheduled (idle 0.3 s, handshake 30 s)."""
    server = serve(FramedEchoHandler, park=True, idle_timeout=0.3, handshake_timeout=30.0)
    with connect(server) as client:
        client.sendall(frame(b"hi"))
        assert read_frame(client) == b"hi"
        assert client.recv(10) == b""
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"idle": 1}
