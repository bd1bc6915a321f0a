"""Closing a TCP socket without losing what was sent: the lingering close.

A ``send()`` that returned has only handed bytes to the kernel. Closing a TCP
socket whose receive queue holds unread bytes (or that receives more
afterwards) makes Linux send a reset and drop every byte it has not yet
delivered: replies counted as sent would never arrive. So before the owner
closes, while the peer has not acknowledged everything: shut the write side
(the peer reads to our end of stream), read and discard its input until its
own end of stream, and stop when all is acknowledged, at the timeout, or when
forced. If a reader was woken with ``shutdown(SHUT_RD)``, the write side stays
open (a socket shut both ways answers data with a reset, RFC 1122) and input
is discarded until everything is acknowledged. There is no readiness event for
"acknowledged", so that wait polls, backing off from 1 ms to 50 ms. Unread
input is always discarded, so the close itself sends no reset.

A protocol whose goodbye the peer answers (a WebSocket's close frame) can also
have the close wait for that answer: an :class:`Answer` is handed the input
instead of it being dropped, and the close goes on until it says the answer
came, within its own timeout (and the linger's).
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
from typing import Callable

__all__ = ["Answer", "linger", "unacked_bytes", "unacked_payload", "discard_input", "connection_gone"]

_DONTWAIT = socket.MSG_DONTWAIT
_FIRST_WAIT_INTERVAL = 0.001
_MAX_WAIT_INTERVAL = 0.05
_TCP_CLOSE = 7   # tcpi_state of a closed connection (linux/tcp_states.h)
_FIN_UNACKED_STATES = (4, 9, 11)   # FIN_WAIT1, LAST_ACK, CLOSING: our FIN not acknowledged yet


class Answer:
    """What a closing connection still waits for from its peer: ``take(data)`` is given
    each chunk of input read while closing and returns True once the answer is complete;
    the wait lasts at most ``timeout`` seconds (the linger's own bound applies too)."""

    __slots__ = ("take", "timeout", "done")

    def __init__(self, take: Callable[[bytes], bool], timeout: float) -> None:
        self.take = take
        self.timeout = timeout
        self.done = False

    def feed(self, data: bytes) -> None:
        if not self.done:
            try:
                self.done = bool(self.take(data))
            except Exception:   # the peer broke its protocol answering: stop waiting
                self.done = True

    def awaited(self, state: str | None) -> bool:
        """Still worth waiting for: not complete, and the peer's stream has not ended."""
        return not self.done and state != "eof"


def unacked_bytes(sock: socket.socket) -> int:
    """Bytes sent on a TCP socket that the peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0   # closed or not a TCP socket: nothing we can still deliver


def unacked_payload(sock: socket.socket) -> int:
    """Bytes of data sent and not acknowledged: :func:`unacked_bytes` without our FIN,
    which the kernel counts as one more byte until it is acknowledged (after
    ``shutdown(SHUT_WR)``: states FIN_WAIT1, CLOSING, LAST_ACK)."""
    queued = unacked_bytes(sock)
    if queued:
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (OSError, ValueError):
            return queued
        if state in _FIN_UNACKED_STATES:
            queued -= 1
    return queued


def connection_gone(sock: socket.socket) -> bool:
    """The kernel closed the connection (a reset came): nothing unacknowledged ever will be.

    A peer that closed its socket answers data sent after its end of stream (a TLS
    close_notify, say) with a reset; but once our side saw its end of stream, reads
    keep returning end of stream and never report that reset, and SIOCOUTQ keeps
    counting the bytes: the TCP state (``TCP_INFO``) is what tells.
    """
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except (OSError, ValueError):
        return True   # closed, or not TCP: nothing to wait for


def discard_input(sock: socket.socket, answer: Answer | None = None) -> str | None:
    """Read and drop what the peer sent that nobody will read (an ``answer`` still
    awaited is given it first).

    Returns ``"eof"`` at the peer's end of stream (or with the read side shut and
    nothing left), ``"reset"`` if the connection is broken, else None.
    """
    try:
        while True:
            data = sock.recv(65536, _DONTWAIT)
            if not data:
                return "eof"
            if answer is not None:
                answer.feed(data)
    except BlockingIOError:
        return None
    except OSError:
        return "reset"   # nothing left to deliver


def linger(sock: socket.socket, timeout: float, *, read_shut: bool,
           forced: Callable[[], bool], answer: Answer | None = None,
           end_stream: Callable[[], None] | None = None) -> None:
    """Wait up to ``timeout`` seconds for the peer to take what was sent (see above),
    and for its ``answer`` (up to ``answer.timeout``) if one is awaited.

    ``sock`` is the raw TCP socket (blocking, no Python timeout); ``read_shut``:
    its read side was shut; ``forced()``: another thread forced the connection
    shut, so stop now. With ``read_shut``, a read cannot say whether input may still
    come, so an answer is waited for by looking again, 1 to 50 ms apart.
    ``end_stream``: our end of a stream above TCP (TLS's close_notify), sent just
    before our TCP end of stream. Both wait until the answer is no longer awaited:
    the protocol's closing handshake completes before the transport's (a TLS peer
    that sees the end of ours first may never answer at all).
    """
    answer_expires_at = time.monotonic() + (0.0 if answer is None else min(answer.timeout, timeout))

    def answered(state: str | None) -> bool:
        # With the read side shut, reads end "eof" whether or not the peer's stream did.
        return (answer is None or not answer.awaited(None if read_shut else state)
                or time.monotonic() >= answer_expires_at)

    state = discard_input(sock, answer)
    if end_stream is None and unacked_bytes(sock) == 0 and answered(state):
        return   # nothing to deliver, nothing awaited: the close may go at once
    # Once the read side is shut, or the peer's end of stream came, the socket
    # always reads as ready: then there is nothing to wait on but time.
    ready_always = read_shut
    stream_open = True

    def end_our_stream() -> bool:
        nonlocal stream_open
        stream_open = False
        if forced():
            return True
        if end_stream is not None:
            end_stream()
        if read_shut:
            return True
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    if answered(state) and not end_our_stream():
        return
    expires_at = time.monotonic() + timeout   # real time: clocks in tests may stand still
    interval = _FIRST_WAIT_INTERVAL
    poller = None
    while True:
        state = discard_input(sock, answer)
        if state == "reset" or forced() or connection_gone(sock):
            return
        if stream_open and answered(state):
            if not end_our_stream():
                return
            continue
        if not stream_open and unacked_bytes(sock) == 0 and answered(state):
            return
        ready_always = ready_always or state == "eof"
        remaining = expires_at - time.monotonic()
        if remaining <= 0:
            return
        wait = min(interval, remaining)
        if ready_always:
            time.sleep(wait)
        else:
            if poller is None:
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLIN)
            poller.poll(wait * 1000)
        interval = min(interval * 2, _MAX_WAIT_INTERVAL)
