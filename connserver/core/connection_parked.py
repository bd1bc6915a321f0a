"""The parked half of a connection's I/O: reads and writes that never wait.

Part of :class:`~connserver.Connection` (a mixin with no state of its own),
used when the connection is parked (see :mod:`connserver.core.parking`): the
engine's threads must never wait on a peer, so a read takes what has arrived
and a write sends what the kernel takes now; the rest of a reply waits in a
bounded queue until the socket is writable, under the write deadline
(``out_expires_at``), and a peer that lets it grow past its bound is a slow
consumer.
"""

from __future__ import annotations

import socket
from typing import Any

from ..errors import CloseReason

__all__ = ["ParkedIO"]

_DONTWAIT = socket.MSG_DONTWAIT


class ParkedIO:
    """Non-blocking reads and queued writes for :class:`~connserver.Connection`."""

    __slots__ = ()
    # The Connection attributes and methods this half uses (defined in connection.py
    # and connection_writing.py), declared for readers and type checkers.
    _sock: socket.socket
    _parked_out: list | None
    _parked_out_bytes: int
    _max_parked_out: int
    _recv_hint: int
    _buffer_size: int
    _pending_error: OSError | None
    _write_timeout: float
    out_expires_at: float | None
    operation: str | None
    _op_expires_at: float | None
    cancel_token: Any
    bytes_received: int
    outcome: Any
    clock: Any
    send_nowait: Any
    _io_failed: Any
    _raise_cancelled: Any
    _recv_into_pool: Any
    _adapt_hint: Any
    _saw_eof: Any

    def recv_nowait(self) -> bytes | None:
        """Parked mode: what has arrived, without waiting (``None``: nothing yet;
        ``b""``: end of stream). Sized like :meth:`recv`; errors raise as there."""
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        want = self._recv_hint
        try:
            if self._pending_error is not None:
                raise self._pending_error
            data = self._sock.recv(want, _DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._io_failed(exc, "read")
        if len(data) == want:
            data = self._recv_into_pool(data, self._buffer_size)
        self._adapt_hint(want, len(data))
        if not data:
            self._saw_eof()
            return data
        self.bytes_received += len(data)
        self.outcome = None   # a handler that recovered from a deadline is not judged by it
        return data

    def shared_objects(self) -> list:
        """What this connection refers to that every connection shares (config, pool,
        stats, clock, the run gate, the watchdog behind the cancel callback): memory
        accounting (``diagnostics.footprint``) leaves these out."""
        shared = [self.config, self._pool, self._stats, self.clock]
        if self.run_slot is not None:
            shared.append(self.run_slot.gate)
        if self.cancel_token.callback is not None:
            shared.append(self.cancel_token.callback)
        return [item for item in shared if item is not None]

    def mark_parked(self, expires_at: float | None) -> None:
        """Waiting in the parking lot (``operation`` shows ``parked``) until ``expires_at``."""
        self.operation = "parked" if expires_at is not None else None
        self._op_expires_at = expires_at

    def park_writes(self, max_buffer: int) -> None:
        """Parked mode: writes send what the kernel takes now and queue the rest (at most
        ``max_buffer`` bytes, else the peer is a slow consumer) for :meth:`flush_parked`."""
        self._parked_out = []
        self._max_parked_out = max_buffer

    def unpark_writes(self) -> bytes:
        """Leave parked mode (to end on a thread that may wait): writes block again, and
        the replies still queued are returned, to be sent first."""
        out, self._parked_out = self._parked_out or [], None
        self._parked_out_bytes = 0
        self.out_expires_at = None
        return b"".join(bytes(part) for part in out)

    @property
    def parked_output_waiting(self) -> bool:
        return bool(self._parked_out)

    def _send_parked(self, buffers: list) -> None:
        out = self._parked_out
        assert out is not None
        if not out:
            try:
                if self.send_nowait(buffers):
                    return
            except OSError as exc:
                self._io_failed(exc, "write")
            self.out_expires_at = self.clock() + self._write_timeout
        for part in buffers:   # copies: a caller's bytearray may change after we return
            out.append(bytes(part))
            self._parked_out_bytes += len(part)
        if self._parked_out_bytes > self._max_parked_out:
            self.cancel_token.cancel(CloseReason.SLOW_CONSUMER)
            self._raise_cancelled()

    def flush_parked(self) -> bool:
        """Send what the kernel takes of the queued replies now; True once none wait."""
        out = self._parked_out
        if not out:
            return True
        try:
            done = self.send_nowait(out)
        except OSError as exc:
            self._io_failed(exc, "write")
        self._parked_out_bytes = sum(len(part) for part in out)
        if done:
            self.out_expires_at = None
        return done
