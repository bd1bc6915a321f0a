"""The lingering close waiting for the peer's answer to a goodbye (closing.Answer), on a
real TCP pair: it ends when the answer is complete, at the answer's timeout, or at the
peer's end of stream, with the read side shut or not."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from connserver.core.closing import Answer, linger
from connserver.testing import wait_for

SAFETY = 10.0


@pytest.fixture
def tcp_pair():
    """(ours, theirs): a connected TCP pair on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=SAFETY)
        ours, _ = listener.accept()
    with ours, theirs:
        yield ours, theirs


def wait_for_bytes(sock: socket.socket, size: int = 1) -> None:
    """Until ``sock`` has ``size`` bytes of input queued (the peer's bytes arrived)."""
    deadline = time.monotonic() + SAFETY
    while len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < size:
        assert time.monotonic() < deadline


class Collect:
    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.seen = b""

    def __call__(self, data: bytes) -> bool:
        self.seen += data
        return self.marker in self.seen


@pytest.mark.parametrize("read_shut", [False, True])
def test_linger_ends_once_the_answer_is_complete(tcp_pair, read_shut):
    """The answer, already there in two pieces, is handed over and ends the wait at once."""
    ours, theirs = tcp_pair
    if read_shut:
        ours.shutdown(socket.SHUT_RD)   # what follows still arrives, and is read (Linux)
    theirs.sendall(b"noise, then CLO")
    theirs.sendall(b"SE")
    wait_for_bytes(ours, len(b"noise, then CLOSE"))
    collect = Collect(b"CLOSE")
    answer = Answer(collect, timeout=SAFETY)
    started = time.monotonic()
    linger(ours, SAFETY, read_shut=read_shut, forced=lambda: False, answer=answer)
    assert answer.done
    assert collect.seen == b"noise, then CLOSE" and time.monotonic() - started < SAFETY / 2


@pytest.mark.parametrize("read_shut", [False, True])
def test_linger_stops_waiting_at_the_answers_timeout(tcp_pair, read_shut):
    """No answer: the wait ends at answer.timeout (0.2 s), not at the linger's 10 s."""
    ours, _theirs = tcp_pair
    if read_shut:
        ours.shutdown(socket.SHUT_RD)
    answer = Answer(Collect(b"CLOSE"), timeout=0.2)
    started = time.monotonic()
    linger(ours, SAFETY, read_shut=read_shut, forced=lambda: False, answer=answer)
    elapsed = time.monotonic() - started
    assert not answer.done and 0.15 < elapsed < SAFETY / 2, elapsed


def test_the_peers_end_of_stream_ends_the_wait(tcp_pair):
    """The peer closed without answering: no answer can come, so no waiting."""
    ours, theirs = tcp_pair
    theirs.shutdown(socket.SHUT_WR)
    answer = Answer(Collect(b"CLOSE"), timeout=SAFETY)
    started = time.monotonic()
    linger(ours, SAFETY, read_shut=False, forced=lambda: False, answer=answer)
    assert not answer.done and time.monotonic() - started < SAFETY / 2


def test_an_answer_that_raises_ends_the_wait(tcp_pair):
    """A peer that breaks its protocol while answering (take() raises): the wait ends."""
    ours, theirs = tcp_pair
    theirs.sendall(b"garbage")
    wait_for_bytes(ours)

    def broken(data: bytes) -> bool:
        raise ValueError("not a close frame")

    answer = Answer(broken, timeout=SAFETY)
    linger(ours, SAFETY, read_shut=False, forced=lambda: False, answer=answer)
    assert answer.done


def test_unacked_payload_does_not_count_our_fin(tcp_pair):
    """After shutdown(SHUT_WR) the kernel counts our FIN as one more unacknowledged byte
    until it is acknowledged; the access log's bytes_unacked counts data only."""
    import fcntl
    import termios

    from connserver.core.closing import unacked_bytes, unacked_payload

    ours, theirs = tcp_pair
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # fills fast: zero window
    ours.setblocking(False)
    written = 0
    deadline = time.monotonic() + SAFETY
    while time.monotonic() < deadline:
        try:
            written += ours.send(b"x" * 65536)
        except BlockingIOError:
            break
    ours.shutdown(socket.SHUT_WR)   # the FIN waits behind the data the window refuses

    def received() -> int:
        return struct.unpack("i", fcntl.ioctl(theirs.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    samples: list[int] = []

    def standing_still() -> bool:   # the transfer stopped at the zero window
        samples.append(received())
        return len(samples) > 1 and samples[-1] == samples[-2]

    assert wait_for(standing_still, SAFETY, interval=0.05)
    assert unacked_payload(ours) == written - received()
    assert unacked_bytes(ours) == written - received() + 1
