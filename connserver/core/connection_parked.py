"""The parked half of a connection's I/O: reads and writes that never wait.

Part of :class:`~connserver.Connection` (a mixin with no state of its own),
used when the connection is parked (see :mod:`connserver.core.parking`): the
engine's threads must never wait on a peer, so a read takes what has arrived
and a write sends what the kernel takes now; the rest of a reply waits in a
bounded queue until the socket is writable, under the write deadline
(``out_expires_at``), and a peer that lets it grow past its bound is a slow
consumer.

With TLS, the queue is the session's own: ciphertext the socket did not take
goes back to the :class:`~connserver.tls.TLSSession` (which sends it before
anything newer), so a hub's writer taking over the write side, or a goodbye,
finds it in order. The handshake and the PROXY header are read the same way,
a step per readiness event (see :class:`~connserver.core.preamble.PreambleSteps`).
"""

from __future__ import annotations

import functools
import socket
import ssl
from typing import Any

from ..errors import Cancelled, CloseReason, ConnServerError
from ..protocols.tls import TLSSession
from .closing import unacked_bytes

__all__ = ["ParkedIO"]

_DONTWAIT = socket.MSG_DONTWAIT
_TLS_HANDSHAKE_READ = 32 * 1024   # as in connection_tls: a flight of records


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
    _read_timeout: float
    _write_sink: Any
    tls: TLSSession | None
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
    _tls_send_alert: Any
    _tls_handshake_step: Any
    input_drained: bool   # the last socket read was short: it took all there was
    _tls_close_notify: Any
    _read_shut: bool
    _forced: bool

    def recv_nowait(self, from_socket: bool = True) -> bytes | None:
        """Parked mode: what has arrived, without waiting (``None``: nothing yet;
        ``b""``: end of stream). Sized like :meth:`recv`; errors raise as there.

        ``from_socket=False`` takes only what was read already (TLS: plaintext in
        records the session holds, which no readiness event will announce)."""
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        if self.tls is not None:
            return self._tls_recv_nowait(from_socket)
        if not from_socket:
            return None
        want = self._recv_hint
        try:
            if self._pending_error is not None:
                raise self._pending_error
            data = self._sock.recv(want, _DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._io_failed(exc, "read")
        self.input_drained = len(data) < want
        if not self.input_drained:
            data = self._recv_into_pool(data, self._buffer_size)
        self._adapt_hint(want, len(data))
        if not data:
            self._saw_eof()
            return data
        self.bytes_received += len(data)
        self.outcome = None   # a handler that recovered from a deadline is not judged by it
        return data

    def _tls_recv_nowait(self, from_socket: bool) -> bytes | None:
        """Plaintext the session can give now; at most one socket read to get some."""
        session = self.tls
        assert session is not None
        while True:
            try:
                data = session.read(self._recv_hint)
            except ssl.SSLError as exc:
                self._tls_send_alert()
                self._io_failed(exc, "read")
            if session.output_ready:   # a key update, an alert: out behind the replies
                if self._write_sink is not None:
                    self._write_sink.wake_writer()
                else:
                    self.flush_parked()
            if data is not None:
                if not data:
                    self._saw_eof()   # close_notify
                    return data
                self.bytes_received += len(data)
                self.outcome = None
                return data
            if not from_socket:
                return None
            from_socket = False
            want = self._recv_hint
            try:
                if self._pending_error is not None:
                    raise self._pending_error
                raw = self._sock.recv(want, _DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                self._io_failed(exc, "read")
            if not raw:
                self._saw_eof()   # without close_notify: an end of stream all the same
                return raw
            self.input_drained = len(raw) < want
            if not self.input_drained:
                raw = self._recv_into_pool(raw, self._buffer_size)
            self._adapt_hint(want, len(raw))
            session.receive(raw, self.clock())

    @property
    def record_expires_at(self) -> float | None:
        """TLS: when the record now arriving must be complete (None between records)."""
        started = self.tls.record_started if self.tls is not None else None
        return None if started is None else started + self._read_timeout

    def peek_nowait(self, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` waiting, left unread (``None``: nothing yet; ``b""``: end
        of stream). For a parked preamble (the PROXY header), with :meth:`skip`."""
        try:
            return self._sock.recv(max_bytes, socket.MSG_PEEK | _DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._io_failed(exc, "handshake")

    def handshake_nowait(self, context: ssl.SSLContext, expires_at: float) -> bool:
        """Advance a TLS handshake with what has arrived; True once it is complete.

        Its flights go out through the parked queue (what the socket does not take
        waits for writability); the deadline is the parking lot's to enforce."""
        session = self.tls
        if session is None:
            session = self.tls = TLSSession(context, functools.partial(unacked_bytes, self._sock))
        self.operation = "handshake"
        self._op_expires_at = expires_at
        while True:
            done = self._tls_handshake_step()
            if session.output_ready:
                self.flush_parked()
            if done:
                self.operation = None
                return True
            try:
                data = self._sock.recv(_TLS_HANDSHAKE_READ, _DONTWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._io_failed(exc, "handshake")
            if data:
                session.receive(data, self.clock())
            elif self.cancel_token.cancelled:
                self._raise_cancelled()   # our own cancel shut the read side: no alert
            else:
                session.receive_eof()   # the next step fails as OpenSSL sees fit

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

    def mark_parked(self, expires_at: float | None, operation: str = "parked") -> None:
        """Waiting in the parking lot (``operation`` shows ``parked``, or ``handshake``
        during the preamble) until ``expires_at``; None: being served."""
        self.operation = operation if expires_at is not None else None
        self._op_expires_at = expires_at

    def park_writes(self, max_buffer: int) -> None:
        """Parked mode: writes send what the kernel takes now and queue the rest (at most
        ``max_buffer`` bytes, else the peer is a slow consumer) for :meth:`flush_parked`."""
        self._parked_out = []
        self._max_parked_out = max_buffer

    def unpark_writes(self) -> bytes:
        """Leave parked mode (to end on a thread that may wait): writes block again, and
        the replies still queued are returned, to be sent first (TLS: they stay in the
        session as ciphertext, and go out before anything sent next)."""
        out, self._parked_out = self._parked_out or [], None
        self._parked_out_bytes = 0
        self.out_expires_at = None
        return b"".join(bytes(part) for part in out)

    def queue_goodbye(self, data: bytes) -> None:
        """Parked: a last message, allowed after cancellation, behind the queued replies
        (best effort, as :meth:`send_goodbye`: never raises)."""
        try:
            self._send_parked([data])
        except (OSError, ConnServerError, Cancelled):
            pass

    def shut_write(self) -> None:
        """A parked lingering close begins: TLS's close_notify, then our end of stream,
        unless the read side was shut (data on a socket shut both ways gets a reset)."""
        if self.tls is not None:
            self._tls_close_notify()
        if not self._read_shut:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    @property
    def forced(self) -> bool:
        """``abort(force=True)`` shut it: nothing more may be sent or waited for."""
        return self._forced

    @property
    def parked(self) -> bool:
        """Served by the parking lot (writes queue instead of waiting)."""
        return self._parked_out is not None

    @property
    def parked_output_waiting(self) -> bool:
        """Queued output the parking lot must flush (none while a hub's writer owns
        the write side: it sends the session's ciphertext itself, in order)."""
        if self._write_sink is not None:
            return False
        return bool(self._parked_out) or (self.tls is not None and self.tls.has_output())

    def _send_parked(self, buffers: list) -> None:
        out = self._parked_out
        assert out is not None
        if self.tls is not None:
            self._send_parked_tls(buffers)
            return
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

    def _send_parked_tls(self, buffers: list) -> None:
        session = self.tls
        assert session is not None
        data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        try:
            chunks = session.seal(data)   # after any ciphertext still waiting, in order
        except ssl.SSLError as exc:
            self._io_failed(exc, "write")
        self._send_ciphertext_nowait(chunks)   # counts the plaintext as its records go
        if session.pending_bytes() > self._max_parked_out:
            self.cancel_token.cancel(CloseReason.SLOW_CONSUMER)
            self._raise_cancelled()

    def _send_ciphertext_nowait(self, chunks: list) -> bool:
        """Send what the socket takes of ``chunks``; the rest goes back to the session
        (ahead of anything newer) under the write deadline. True once none wait."""
        try:
            done = not chunks or self.send_nowait(chunks)
        except OSError as exc:
            self._io_failed(exc, "write")
        finally:
            self.tls.put_back(chunks)   # type: ignore[union-attr]
        if done:
            self.out_expires_at = None
        elif self.out_expires_at is None:
            self.out_expires_at = self.clock() + self._write_timeout
        return done

    def flush_parked(self) -> bool:
        """Send what the kernel takes of the queued replies now; True once none wait."""
        if self._write_sink is not None:
            return True   # a hub's writer owns the write side
        if self.tls is not None:
            return self._send_ciphertext_nowait(self.tls.seal())
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
