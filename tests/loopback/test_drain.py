"""Closing without losing replies: graceful drains and lingering closes deliver what was sent.

Closing a TCP socket with unread input makes the kernel send a reset and drop
every byte it had not yet delivered. These tests build exactly that situation
(clients that stream and read slowly, handlers that reply and close while the
peer is still sending) and check that every byte the server counted as sent
arrives, followed by a clean end of stream.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import threading

import pytest

import connserver
from connserver import CancelToken, CloseReason
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for


from tests.unit.test_connection import make_conn

def record(index: int) -> bytes:
    return f"{index:099d}\n".encode()


def small_buffered_client(server: connserver.Server) -> socket.socket:
    """A client with small kernel buffers, so the server's replies back up quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    sock.settimeout(10)
    sock.connect(server.server_address[:2])
    return sock


def stream_until_stalled(sock: socket.socket, limit: int = 8 << 20, patience: float = 0.0) -> bytes:
    """Send numbered records without reading until the pipe backs up; return what was sent.

    With ``patience``, a full send buffer is waited on that long before giving up,
    so the server's own buffers fill too and its handler ends up blocked writing.
    """
    sock.setblocking(False)
    sent = index = 0
    pending = b""
    chunks = []
    try:
        while sent < limit:
            if not pending:
                pending = b"".join(record(index + i) for i in range(64))
                index += 64
            try:
                count = sock.send(pending)
            except BlockingIOError:
                if not patience or not select.select((), (sock,), (), patience)[1]:
                    break
                continue
            sent += count
            chunks.append(pending[:count])
            pending = pending[count:]
    finally:
        sock.settimeout(10)
    return b"".join(chunks)


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends, and how the stream ended ("eof" or the error)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        return b"".join(chunks), type(exc).__name__
    return b"".join(chunks), "eof"


def access_bytes_out(caplog, peer: str) -> int:
    for entry in caplog.records:
        if entry.name == "connserver.access" and f" {peer} " in entry.getMessage():
            return int(re.search(r"bytes_out=(\d+)", entry.getMessage()).group(1))
    raise AssertionError(f"no access-log line for {peer}")


@pytest.mark.parametrize("handlers", ["write", "idle"])
def test_a_drain_delivers_every_reply_the_server_counted(serve, caplog, handlers):
    """SIGTERM-style drain under streaming clients that have not read their replies yet,
    with handlers blocked writing or idle (replies queued in the kernel): each client
    gets all bytes_out the access log claims, in order, then EOF."""
    caplog.set_level(logging.INFO, logger="connserver.access")
    server = serve(EchoHandler, graceful_timeout=10.0)
    clients = [small_buffered_client(server) for _ in range(3)]
    try:
        # Idle: no more than the kernel's buffers hold in echo (32 KiB: under the client's
        # receive buffer alone), so no handler blocks writing whatever the timing.
        sent = {client: stream_until_stalled(client, patience=0.2) if handlers == "write"
                else stream_until_stalled(client, limit=32768) for client in clients}
        assert wait_for(lambda: [c.operation for c in server.connections()] == [handlers] * 3)
        reports = []
        drain = threading.Thread(target=lambda: reports.append(server.shutdown(grace=10.0)))
        drain.start()
        try:
            if handlers == "idle":
                # Until every handler has ended (lingering, or closed): late bytes then
                # meet a socket the server is done with, which must not reset.
                assert wait_for(lambda: "idle" not in [c.operation for c in server.connections()])
            for client in clients:   # the clients keep streaming while the server drains
                client.setblocking(False)   # (a socket with a timeout would wait to send)
                try:
                    sent[client] += b"late\n"[:client.send(b"late\n")]
                except BlockingIOError:
                    pass
                client.settimeout(10)
            results = [read_to_end(client) for client in clients]
        finally:
            drain.join(15)
        assert not drain.is_alive()
        report = reports[0]
        assert (report.drained, report.forced, report.stuck) == (3, 0, ())
        for client, (data, ending) in zip(clients, results):
            assert ending == "eof"
            peer = "%s:%d" % client.getsockname()[:2]
            assert len(data) == access_bytes_out(caplog, peer) > 0
            assert data == sent[client][:len(data)]   # the echo of what was sent, in order
        assert server.stats().bytes_unacked == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_closing_after_a_reply_delivers_it_while_the_peer_still_sends(serve, ending):
    """A handler that replies and ends (end(), /quit, an error after the reply) while the
    peer is still sending: the reply arrives whole, then EOF, never a reset."""
    reply = bytes(range(256)) * 8192   # 2 MiB: far more than the socket buffers hold

    class ReplyAndGo(connserver.Handler):
        def handle(self):
            self.conn.recv()
            self.conn.sendall(reply)
            if ending == "raise":
                raise RuntimeError("an error after the reply")

    server = serve(ReplyAndGo)
    with small_buffered_client(server) as client:
        client.sendall(b"go")
        stream_until_stalled(client, limit=256 * 1024)   # unread input at the server's close
        data, how = read_to_end(client)
    assert how == "eof" and data == reply
    expected = "closed" if ending == "return" else "error"
    stats = wait_for(lambda: (s := server.stats()).close_reasons.get(expected) and s)
    assert stats.bytes_unacked == 0


def test_a_reply_to_a_message_already_read_is_sent_during_a_drain(socketpair):
    """Cancelled by shutdown between recv() and its reply: the reply still goes out; the
    next read raises Cancelled, and after that writes raise too."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.sendall(b"question")
    assert conn.recv() == b"question"
    conn.cancel_token.cancel(CloseReason.SHUTDOWN)
    conn.sendall(b"answer")
    assert client.recv(100) == b"answer"
    with pytest.raises(connserver.Cancelled):
        conn.recv()
    with pytest.raises(connserver.Cancelled):
        conn.sendall(b"more")


def test_other_cancellations_stop_writes_at_once(socketpair):
    """Only a drain lets replies out: any other cancellation raises on the next write."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.sendall(b"question")
    assert conn.recv() == b"question"
    conn.cancel_token.cancel(CloseReason.LIFETIME)
    with pytest.raises(connserver.Cancelled):
        conn.sendall(b"answer")


def test_a_drain_does_not_interrupt_a_write_but_a_force_does(socketpair):
    """abort() during a drain leaves a write in progress alone; abort(force=True) does not."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    token: CancelToken = conn.cancel_token
    conn.operation = "write"
    token.cancel(CloseReason.SHUTDOWN)
    assert conn.abort() is False and not conn._read_shut
    conn.abort(force=True)
    with pytest.raises(connserver.Cancelled):
        conn.sendall(b"late")
    conn.operation = None


def test_a_forced_close_counts_what_the_peer_never_acknowledged(serve, caplog):
    """A drain's grace runs out on a handler blocked writing to a peer that stopped
    reading: forced shut, what the kernel still held unacknowledged is counted in
    bytes_unacked, so the access log's bytes_out is no more than the peer can read."""
    caplog.set_level(logging.INFO, logger="connserver.access")
    reply = bytes(range(256)) * 16384   # 4 MiB: far more than the socket buffers hold

    class Flood(connserver.Handler):
        def handle(self):
            self.conn.recv()
            self.conn.sendall(reply)

    server = serve(Flood, write_timeout=30.0)
    with small_buffered_client(server) as client:
        client.sendall(b"go")
        assert wait_for(lambda: [c.operation for c in server.connections()] == ["write"])
        report = server.shutdown(grace=0.3)
        assert report.forced == 1
        peer = "%s:%d" % client.getsockname()[:2]
        data, _ = read_to_end(client)
    stats = server.stats()
    assert stats.bytes_unacked > 0
    assert access_bytes_out(caplog, peer) <= len(data)
    assert data == reply[:len(data)]
