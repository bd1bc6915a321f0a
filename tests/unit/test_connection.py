"""Connection over socket.socketpair(): deadlines, cancellation, copies, counters."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import pytest

import connserver
from connserver import BufferPool, CancelToken, CloseReason, Config, Connection, Watchdog
from connserver.core.rate_limits import RateMeter
from connserver.testing import FakeClock, wait_for


def make_conn(sock: socket.socket, **config) -> Connection:
    config.setdefault("idle_timeout", 5.0)
    return Connection(sock, ("127.0.0.1", 9), id=1, config=Config(**config),
                      pool=BufferPool(4096, 4))


def shrink_buffers(*socks: socket.socket) -> None:
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def test_recv_returns_an_exact_bytes_copy_and_holds_no_buffer(socketpair):
    """recv() gives exact-size bytes; a small message never touches the pool, a
    larger one borrows a pooled buffer for the rest and gives it back."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.sendall(b"hello")
    data = conn.recv()
    assert data == b"hello" and type(data) is bytes
    assert conn._pool.statistics().allocated == 0   # one recv straight into the bytes returned
    assert conn.bytes_received == 5 and conn.leases.outstanding == 0
    big = bytes(range(256)) * 12   # 3 KiB: more than the first recv asks for
    client.sendall(big)
    data = conn.recv()
    assert data == big and type(data) is bytes
    stats = conn._pool.statistics()
    assert stats.leased == 0 and stats.free == 1 and stats.misses == 1
    client.sendall(big)
    assert conn.recv() == big   # the next recv asks for enough: no pooled buffer needed
    assert conn._pool.statistics().hits + conn._pool.statistics().misses == 1


def test_recv_returns_empty_bytes_at_eof(socketpair):
    """End of stream is b"" and is recorded as the outcome eof."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.shutdown(socket.SHUT_WR)
    assert conn.recv() == b""
    assert conn.outcome is CloseReason.EOF


def test_idle_timeout_fires_on_a_silent_peer(socketpair):
    """A peer that sends nothing meets the idle deadline."""
    server_side, _client = socketpair
    conn = make_conn(server_side, idle_timeout=0.05)
    started = time.monotonic()
    with pytest.raises(connserver.DeadlineExceeded) as info:
        conn.recv()
    assert info.value.phase == "idle"
    assert 0.04 <= time.monotonic() - started < 1.0
    assert conn.outcome is CloseReason.IDLE


def test_read_deadline_is_absolute_against_a_trickling_peer(socketpair):
    """A peer trickling one byte every 20 ms cannot stretch a 0.2 s read deadline."""
    server_side, client = socketpair
    conn = make_conn(server_side, idle_timeout=5.0, read_timeout=0.2)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.02):
            try:
                client.send(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle, name="test-trickle")
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(connserver.DeadlineExceeded) as info:
            conn.recv_exactly(1000)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        sender.join(10)
    assert info.value.phase == "read"
    assert 0.2 <= elapsed < 0.5
    assert conn.outcome is CloseReason.READ_DEADLINE


def test_recv_exactly_assembles_a_message_and_reports_truncation(socketpair):
    """recv_exactly() joins pieces; b"" at a boundary; a protocol error mid-message."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.sendall(b"abc")
    client.sendall(b"defgh")
    assert conn.recv_exactly(8) == b"abcdefgh"
    client.sendall(b"xyz")
    assert conn.recv_exactly(3) == b"xyz"
    client.sendall(b"12")
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(connserver.RemoteProtocolError, match="2 bytes into a 5-byte"):
        conn.recv_exactly(5)
    assert conn._pool.statistics().leased == 0


def test_recv_exactly_larger_than_the_pool_buffer(socketpair):
    """Messages larger than buffer_size are read into their own buffer."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    payload = bytes(range(256)) * 40   # 10 KiB > 4 KiB pool buffers
    sender = threading.Thread(target=client.sendall, args=(payload,), name="test-send")
    sender.start()
    assert conn.recv_exactly(len(payload)) == payload
    sender.join(10)
    client.shutdown(socket.SHUT_WR)
    assert conn.recv_exactly(4) == b""


def test_write_deadline_fires_when_the_peer_never_reads(socketpair):
    """sendall() to a peer that never reads ends at write_timeout."""
    server_side, client = socketpair
    shrink_buffers(server_side, client)
    conn = make_conn(server_side, write_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(connserver.DeadlineExceeded) as info:
        conn.sendall(b"x" * (4 * 1024 * 1024))
    assert info.value.phase == "write"
    assert 0.19 <= time.monotonic() - started < 1.0
    assert conn.outcome is CloseReason.WRITE_DEADLINE
    assert 0 < conn.bytes_sent < 4 * 1024 * 1024


def test_deadline_block_narrows_every_call_inside_it(socketpair):
    """conn.deadline() bounds a whole unit of work; nesting only narrows."""
    server_side, _client = socketpair
    conn = make_conn(server_side, idle_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(connserver.DeadlineExceeded) as info:
        with conn.deadline(0.1):
            with conn.deadline(10.0):
                conn.recv()
    assert info.value.phase == "read"
    assert time.monotonic() - started < 1.0
    assert conn._unit_expires_at is None


def test_peer_reset_raises_connection_broken(socketpair):
    """Writing to a peer that is gone is ConnectionBroken, chained from the OSError."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.close()
    with pytest.raises(connserver.ConnectionBroken) as info:
        for _ in range(100):
            conn.sendall(b"x" * 65536)
    assert isinstance(info.value.__cause__, OSError)
    assert conn.outcome is CloseReason.RESET


def test_cancel_wakes_a_blocked_recv_within_100ms(socketpair):
    """The watchdog's shutdown() wakes a thread blocked in recv() at once."""
    server_side, _client = socketpair
    watchdog = Watchdog()
    watchdog.start()
    token = CancelToken()
    conn = Connection(server_side, "peer", id=7, config=Config(idle_timeout=30.0),
                      pool=BufferPool(4096, 4), cancel_token=token)
    token.on_cancel(lambda: watchdog.abort_soon(conn))
    outcome: list = []
    woke_at: list = []

    def reader():
        try:
            conn.recv()
        except BaseException as exc:   # Cancelled is a BaseException
            outcome.append(exc)
        woke_at.append(time.monotonic())

    thread = threading.Thread(target=reader, name="test-reader")
    thread.start()
    try:
        assert connserver.testing.wait_for(lambda: conn.operation == "idle", 10)
        cancelled_at = time.monotonic()
        token.cancel("cancelled")
        thread.join(10)
        assert not thread.is_alive()
    finally:
        assert watchdog.stop(10)
    assert isinstance(outcome[0], connserver.Cancelled)
    assert outcome[0].reason is CloseReason.CANCELLED
    assert woke_at[0] - cancelled_at < 0.1


def test_cancel_wakes_a_blocked_sendall(socketpair):
    """A writer blocked on a peer that never reads is forced shut shortly after cancel()."""
    server_side, client = socketpair
    shrink_buffers(server_side, client)
    watchdog = Watchdog()
    watchdog.start()
    conn = make_conn(server_side, write_timeout=30.0)
    conn.cancel_token.on_cancel(lambda: watchdog.abort_soon(conn))
    outcome: list = []

    def writer():
        try:
            conn.sendall(b"x" * (8 * 1024 * 1024))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=writer, name="test-writer")
    thread.start()
    try:
        assert connserver.testing.wait_for(lambda: conn.operation == "write", 10)
        started = time.monotonic()
        conn.cancel_token.cancel()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - started < 0.5
    finally:
        assert watchdog.stop(10)
    assert isinstance(outcome[0], connserver.Cancelled)


def test_cancellation_is_level_triggered(socketpair):
    """Once cancelled, every later call raises Cancelled again."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    conn.cancel_token.cancel(CloseReason.SHUTDOWN)
    client.sendall(b"data waiting")
    for call in (conn.recv, lambda: conn.recv_exactly(3), lambda: conn.sendall(b"x")):
        with pytest.raises(connserver.Cancelled) as info:
            call()
        assert info.value.reason is CloseReason.SHUTDOWN


def test_send_goodbye_works_after_cancellation(socketpair):
    """A cancelled handler may still send one bounded goodbye."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    conn.cancel_token.cancel(CloseReason.SHUTDOWN)
    conn.abort()   # as the watchdog does: read side only
    assert conn.send_goodbye(b"bye\n")
    assert client.recv(10) == b"bye\n"


def test_abort_after_close_is_harmless(socketpair):
    """abort() from another thread after the owner closed does nothing."""
    server_side, _client = socketpair
    conn = make_conn(server_side)
    conn.close()
    conn.close()
    conn.abort(force=True)
    assert conn.closed and server_side.fileno() == -1


def test_lease_accounting_reports_a_leak(socketpair, caplog):
    """A lease still held at the end is counted and reported with its call site."""
    server_side, _client = socketpair
    conn = make_conn(server_side)
    with conn.lease() as buffer:
        assert len(buffer) == 4096
    assert conn.leases.outstanding == 0
    leaked = conn.lease()
    assert conn._pool.check_account(conn.leases, "connection #1") == 1
    assert "test_connection.py" in caplog.text
    assert conn._pool.statistics().leaks_detected == 1
    leaked.release()


def test_info_reports_the_current_operation(socketpair):
    """info() is a snapshot with the operation and the time left on its deadline."""
    server_side, client = socketpair
    conn = make_conn(server_side)
    client.sendall(b"abc")
    conn.recv()
    info = conn.info()
    assert info.id == 1 and info.peer == "127.0.0.1:9"
    assert info.bytes_in == 3 and info.operation is None


def test_bytes_already_read_survive_a_reset_right_behind_them():
    """A message that fills the first read, then a reset: recv() returns the message,
    the next call reports the reset (nothing the kernel handed over is lost)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    with server_side:
        conn = make_conn(server_side)
        message = bytes(range(256))   # exactly what the first recv asks for
        client.sendall(message)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()                # RST right behind the data
        poller = select.poll()
        poller.register(server_side, select.POLLIN)
        assert wait_for(lambda: any(events & (select.POLLERR | select.POLLHUP)
                                    for _, events in poller.poll(0)))
        assert conn.recv() == message and conn.bytes_received == 256
        with pytest.raises(connserver.ConnectionBroken):
            conn.recv()


def test_recv_exactly_charges_the_whole_message_to_a_byte_rate_limit(socketpair):
    """The first part is charged as it is read, the rest once the message is complete."""
    server_side, client = socketpair
    clock = FakeClock()
    bucket = connserver.TokenBucket(100.0, 10_000, clock=clock)
    conn = make_conn(server_side)
    conn.limit_rate(RateMeter((bucket,)))
    client.sendall(b"x" * 3000)
    assert conn.recv_exactly(3000) == b"x" * 3000
    assert bucket.statistics().tokens == 10_000 - 3000
