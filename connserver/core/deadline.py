"""Deadlines: absolute monotonic expiry times, and how they reach the kernel.

A per-call timeout is not a deadline: a peer that trickles one byte every
15 s never trips a 20 s timeout on each ``recv``. A deadline is fixed once,
when a unit of work starts (a message's first byte, a write, a handshake), and
every blocking call under it gets only what is left.

On the hot path a deadline is a plain float, an absolute time on the
connection's clock (``expires_at``); :class:`Deadline` is the same idea as an
object, for code that passes one around. What is left goes to the kernel as
``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` on a blocking socket rather than through
``socket.settimeout()``, which would cost an ``ioctl`` per call and turn each
``recv`` into ``poll`` + ``recv`` (see docs/explanation/deadlines.md).
:class:`KernelTimeouts` remembers what the kernel has, so a value is set only
when it must change: the one slack constant, :data:`TIMEOUT_SLACK`, lets a
timeout already set stand when it is at most that much longer than what is
left.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable

__all__ = ["Clock", "Deadline", "KernelTimeouts", "TIMEOUT_SLACK", "monotonic",
           "set_kernel_timeouts"]

#: A clock is any zero-argument callable returning seconds (monotonic).
Clock = Callable[[], float]

monotonic: Clock = time.monotonic

#: A kernel timeout already set may exceed what is left by this much, to save a
#: ``setsockopt`` per call; a deadline is then overshot by at most this.
TIMEOUT_SLACK = 0.005

_TIMEVAL = struct.Struct("ll")


class Deadline:
    """A point in time after which a unit of work has failed.

    ``Deadline(None)`` never expires; it exists so callers need not special-case
    "no limit" (which must be chosen explicitly).
    """

    __slots__ = ("expires_at", "_clock")

    def __init__(self, timeout: float | None, clock: Clock = monotonic) -> None:
        self._clock = clock
        self.expires_at: float | None = None if timeout is None else clock() + timeout

    @classmethod
    def at(cls, expires_at: float | None, clock: Clock = monotonic) -> "Deadline":
        """A deadline at an absolute time of ``clock``."""
        deadline = cls(None, clock)
        deadline.expires_at = expires_at
        return deadline

    def remaining(self) -> float | None:
        """Seconds left (may be zero or negative), or ``None`` for no limit."""
        if self.expires_at is None:
            return None
        return self.expires_at - self._clock()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def narrowed(self, timeout: float | None) -> "Deadline":
        """The earlier of this deadline and ``timeout`` seconds from now."""
        if timeout is None:
            return self
        candidate = self._clock() + timeout
        if self.expires_at is not None and self.expires_at <= candidate:
            return self
        return Deadline.at(candidate, self._clock)

    def __repr__(self) -> str:
        remaining = self.remaining()
        if remaining is None:
            return "Deadline(None)"
        return f"Deadline(remaining={remaining:.3f})"


class KernelTimeouts:
    """The receive and send timeouts one blocking socket has in the kernel, cached.

    ``recv`` / ``send`` are the values set (``None``: unknown). ``bound_*`` make
    the next call wait at most ``remaining`` seconds, setting the option only
    when the current value is shorter, or longer by more than the slack. Errors
    from ``setsockopt`` propagate (the socket is broken); the caller judges them.
    """

    __slots__ = ("_sock", "recv", "send")

    def __init__(self, sock: socket.socket, recv: float | None = None,
                 send: float | None = None) -> None:
        self._sock = sock
        self.recv = recv
        self.send = send

    def set_recv(self, seconds: float) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self.recv = seconds

    def set_send(self, seconds: float) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
        self.send = seconds

    def bound_recv(self, remaining: float) -> None:
        current = self.recv
        if current is None or not (remaining <= current <= remaining + TIMEOUT_SLACK):
            self.set_recv(remaining)

    def bound_send(self, remaining: float) -> None:
        current = self.send
        if current is None or not (remaining <= current <= remaining + TIMEOUT_SLACK):
            self.set_send(remaining)


def set_kernel_timeouts(sock: socket.socket, receive: float, send: float) -> None:
    """Give a new socket its usual kernel timeouts (the idle and write timeouts).

    The server calls this on its accepting thread, so that a handler thread whose
    connection only ever waits with these never calls ``setsockopt`` with a
    buffer. CPython's ``setsockopt`` first tries to parse the value as an integer
    and formats an error message when it is not; that formatting goes a page
    deeper into the C stack than anything else the thread does, and a touched
    stack page stays resident: 4 KiB more RSS per idle connection.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(receive))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))


def _timeval(seconds: float) -> bytes:
    """A kernel timeval for ``seconds``, never zero (zero means "no timeout")."""
    micros = max(1, int(seconds * 1_000_000))
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)
