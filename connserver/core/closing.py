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
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
from typing import Callable

__all__ = ["linger", "unacked_bytes", "discard_input", "connection_gone"]

_DONTWAIT = socket.MSG_DONTWAIT
_FIRST_WAIT_INTERVAL = 0.001
_MAX_WAIT_INTERVAL = 0.05
_TCP_CLOSE = 7   # tcpi_state of a closed connection (linux/tcp_states.h)


def unacked_bytes(sock: socket.socket) -> int:
    """Bytes sent on a TCP socket that the peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0   # closed or not a TCP socket: nothing we can still deliver


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


def discard_input(sock: socket.socket) -> str | None:
    """Read and drop what the peer sent that nobody will read.

    Returns ``"eof"`` at the peer's end of stream (or with the read side shut and
    nothing left), ``"reset"`` if the connection is broken, else None.
    """
    try:
        while True:
            if not sock.recv(65536, _DONTWAIT):
                return "eof"
    except BlockingIOError:
        return None
    except OSError:
        return "reset"   # nothing left to deliver


def linger(sock: socket.socket, timeout: float, *, read_shut: bool,
           forced: Callable[[], bool]) -> None:
    """Wait up to ``timeout`` seconds for the peer to take what was sent (see above).

    ``sock`` is the raw TCP socket (blocking, no Python timeout); ``read_shut``:
    its read side was shut; ``forced()``: another thread forced the connection
    shut, so stop now.
    """
    if unacked_bytes(sock) == 0:
        discard_input(sock)
        return
    # Once the read side is shut, or the peer's end of stream came, the socket
    # always reads as ready: then there is nothing to wait on but time.
    ready_always = read_shut
    if not ready_always and not forced():
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
    expires_at = time.monotonic() + timeout   # real time: clocks in tests may stand still
    interval = _FIRST_WAIT_INTERVAL
    poller = None
    while True:
        state = discard_input(sock)
        if state == "reset" or forced() or unacked_bytes(sock) == 0 or connection_gone(sock):
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
