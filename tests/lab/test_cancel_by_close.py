"""Lab 5: the kernel behaviour it rests on, and the books that count what it shows."""

from __future__ import annotations

import socket
import threading

import pytest

from connserver.lab.cancel_by_close import CancelBooks
from connserver.testing import FakeClock, wait_for
from tests.conftest import unavailable


def _blocked_in_a_call_on(thread: threading.Thread, fd: int) -> bool:
    """The thread is inside a system call whose first argument is ``fd`` (its recv)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as status:
            fields = status.read().split()
    except OSError:
        unavailable("no /proc/self/task/TID/syscall to see a blocked call")
    return len(fields) > 1 and fields[0] not in ("running", "-1") and int(fields[1], 16) == fd


def _reader(sock: socket.socket, results: list) -> threading.Thread:
    def read() -> None:
        try:
            results.append(sock.recv(64))
        except OSError as exc:
            results.append(exc)

    thread = threading.Thread(target=read, name="connserver-test-reader")
    thread.start()
    assert wait_for(lambda: _blocked_in_a_call_on(thread, sock.fileno()), 10.0)
    return thread


def test_close_from_another_thread_leaves_recv_blocked_and_shutdown_wakes_it(socketpair):
    """Linux: close() does not wake a recv() blocked on the socket; shutdown() does, at once."""
    a, b = socketpair
    results: list = []
    reader = _reader(a, results)
    a.close()                              # the broken side's cancel
    reader.join(0.3)                       # meant to time out: close() woke nothing
    assert reader.is_alive() and results == []
    b.close()                              # the peer's FIN is what ends that recv()
    reader.join(10.0)
    assert not reader.is_alive() and results == [b""]

    c, d = socket.socketpair()
    try:
        results.clear()
        reader = _reader(c, results)
        c.shutdown(socket.SHUT_RDWR)       # the watchdog's cancel
        reader.join(10.0)
        assert not reader.is_alive() and results == [b""]
    finally:
        c.close()
        d.close()


def test_a_reused_fd_number_is_counted_only_while_a_live_handler_holds_it():
    """A new connection on a number a live handler holds is a reuse; on one given back, not."""
    books = CancelBooks(FakeClock())
    books.begin(1, fd=7, due=1001.0)
    books.begin(2, fd=8, due=1001.0)
    books.begin(3, fd=7, due=1002.0)     # handler 1 still holds 7: it was closed under it
    assert books.fd_reuses == 1
    books.woke(2)
    books.end(2)
    books.begin(4, fd=8, due=1003.0)     # 8 was given back by its owner: no hazard
    assert books.fd_reuses == 1


def test_blocked_and_the_slowest_wake_up_are_measured_from_the_cancel():
    """Blocked: past its cancel and not woken; the slowest wake-up counts those still waiting."""
    clock = FakeClock(1000.0)
    books = CancelBooks(clock)
    books.begin(1, fd=7, due=1001.0)
    books.begin(2, fd=8, due=1001.0)
    books.begin(3, fd=9, due=1010.0)
    assert books.figures() == {"blocked": 0, "wakeup_ms": 0.0, "fd_reuses": 0}
    clock.advance(1.002)
    books.woke(1)                        # 2 ms after its cancel
    books.end(1)
    clock.advance(2.0)                   # 2 is still blocked, 2.002 s after its cancel
    figures = books.figures()
    assert figures["blocked"] == 1 and figures["wakeup_ms"] == pytest.approx(2002.0)
    books.woke(2)
    books.end(2)
    assert books.figures()["blocked"] == 0 and books.figures()["wakeup_ms"] == pytest.approx(2002.0)
