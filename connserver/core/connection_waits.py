"""Waits that are not a message read: set-up protocols' peeks, and handlers' timers.

Part of :class:`~connserver.Connection` (a mixin with no state of its own). The
PROXY preamble reads its header with :meth:`peek` and consumes exactly it with
:meth:`skip`, so the stream after it starts intact. A message handler with a
timer (:meth:`~connserver.MessageHandler.next_timer`: a WebSocket's keepalive
ping) waits for input with :meth:`wait_readable` until its timer, in thread
mode; parked, the watchdog keeps its timers.
"""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING, Any

from .deadline import TIMEOUT_SLACK
from ..errors import RemoteProtocolError

if TYPE_CHECKING:
    from .deadline import Deadline

__all__ = ["WaitingIO"]


class WaitingIO:
    """Peeks, skips and timer waits for :class:`~connserver.Connection`."""

    __slots__ = ()
    # The Connection attributes and methods this part uses (connection.py).
    _sock: socket.socket
    operation: str | None
    _op_expires_at: float | None
    cancel_token: Any
    tls: Any
    clock: Any
    _bound_wait: Any
    _deadline_exceeded: Any
    _io_failed: Any
    _raise_cancelled: Any

    def wait_readable(self, until: float) -> bool:
        """Whether input is waiting, or arrives before ``until`` (the connection's clock);
        waits at most that long. A cancellation wakes it (the read side is shut)."""
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        if self.tls is not None and self.tls.has_input():
            return True
        self.operation = "idle"
        self._op_expires_at = until
        try:
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN | select.POLLRDHUP)
            return bool(poller.poll(max(0.0, until - self.clock()) * 1000))
        finally:
            self.operation = None

    def peek(self, max_bytes: int, deadline: Deadline, *, at_least: int = 1) -> bytes:
        """Up to ``max_bytes`` of what the peer sent, left unread (for set-up protocols).

        Waits until ``at_least`` bytes are waiting, or the stream ended (then fewer
        come back), within ``deadline`` (phase ``handshake``). The PROXY preamble
        reads its header this way and consumes only the header (:meth:`skip`), so
        the application stream or a TLS handshake starts intact.
        """
        expires_at = deadline.expires_at
        assert expires_at is not None
        self.operation = "handshake"
        self._op_expires_at = expires_at
        try:
            self._bound_wait(socket.SO_RCVTIMEO, expires_at, "handshake")
            try:
                if at_least > 1:
                    waiting = self._sock.recv(at_least, socket.MSG_PEEK | socket.MSG_WAITALL)
                    if len(waiting) < at_least:
                        if expires_at - self.clock() <= TIMEOUT_SLACK:
                            # A waiting-for-all read that times out returns what it has.
                            self._deadline_exceeded("handshake")
                        return waiting   # the stream ended first
                return self._sock.recv(max_bytes, socket.MSG_PEEK)
            except OSError as exc:
                self._io_failed(exc, "handshake")
        finally:
            self.operation = None

    def skip(self, size: int) -> None:
        """Consume ``size`` bytes that :meth:`peek` showed waiting."""
        try:
            taken = len(self._sock.recv(size, socket.MSG_WAITALL))
        except OSError as exc:
            self._io_failed(exc, "handshake")
        if taken != size:
            raise RemoteProtocolError(f"the connection ended {taken} bytes into {size} "
                                      f"bytes that were waiting")
