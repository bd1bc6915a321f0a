"""The writing half of a connection's I/O, and the write side handed to a hub.

Part of :class:`~connserver.Connection` (a mixin with no state of its own):
``sendall`` and frames under one absolute write deadline each, scatter-gather
with ``sendmsg``, the run slot given back before any write that must wait,
and, while a hub subscription owns the write side, the non-blocking calls its
writer thread uses (:meth:`WritingIO.send_nowait` and friends), so that only
the connection ever touches its socket.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Iterable, Protocol

from ..errors import Cancelled, ConnServerError, LocalProtocolError
from .send_buffers import IOV_MAX, SEND_FLAGS, skip_sent

if TYPE_CHECKING:
    from ..protocols.framing import Codec
    from ..protocols.tls import TLSSession

__all__ = ["WriteSink", "WritingIO"]

_DONTWAIT = socket.MSG_DONTWAIT


class WriteSink(Protocol):
    """What takes a connection's writes while attached (a hub subscription)."""

    queued_bytes: int

    def send(self, data: bytes) -> bool:
        """Queue ``data`` behind what is queued already."""

    def close(self) -> list:
        """Detach; return the buffers queued but not yet sent (plaintext)."""

    def wake_writer(self) -> None:
        """TLS: reading made ciphertext; have the writer send it, behind what it holds."""


class WritingIO:
    """Writes for :class:`~connserver.Connection`."""

    __slots__ = ()
    # Attributes of Connection this half uses (declared for readers and type checkers).
    _write_sink: WriteSink | None
    _parked_out: list | None
    _parked_out_bytes: int
    tls: "TLSSession | None"
    codec: "Codec | None"
    _sock: socket.socket

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` within ``write_timeout`` (an absolute deadline).

        After cancellation this raises :class:`~connserver.Cancelled`, except during
        a shutdown's drain: see :meth:`_writes_cancelled`.
        """
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        slot = self.run_slot
        if (self._write_sink is not None or self._unit_expires_at is not None or self.tls
                or (slot is not None and slot.held) or self._parked_out is not None):
            self._send_buffers([data])
            return
        # Fast path: a fresh write deadline is always write_timeout away, so the
        # kernel timeout already set for the last write usually fits unchanged.
        self.operation = "write"
        self._op_expires_at = expires_at = self.clock() + self._write_timeout
        try:
            if self._timeouts.send != self._write_timeout:
                self._timeouts.set_send(self._write_timeout)
            sent = self._sock.send(data, SEND_FLAGS)
        except OSError as exc:
            self._io_failed(exc, "write")
        self.operation = None
        self.bytes_sent += sent
        if sent < len(data):
            # The peer's window filled up: finish under the same absolute deadline.
            self._send_buffers([memoryview(data)[sent:]], expires_at)

    def send_frame(self, payload: bytes) -> None:
        """Send one frame (header and payload in one ``sendmsg``, no concatenation)."""
        self._send_buffers(list(self._require_codec().frame_parts(payload)))

    def send_frames(self, payloads: Iterable[bytes]) -> None:
        """Send several frames coalesced with scatter-gather, under one write deadline."""
        codec = self._require_codec()
        buffers: list = []
        for payload in payloads:
            buffers.extend(codec.frame_parts(payload))
        if buffers:
            self._send_buffers(buffers)

    def _require_codec(self) -> "Codec":
        if self.codec is None:
            raise LocalProtocolError("no framing codec on this connection (use FramedHandler "
                                     "or LineHandler, or set conn.codec)")
        return self.codec

    def _send_buffers(self, buffers: list, expires_at: float | None = None) -> None:
        """Write every buffer with ``sendmsg`` under one absolute write deadline.

        While a write sink (a hub subscription) is attached, the bytes go on its
        queue instead, so only the hub's writer writes to the socket and order holds.
        """
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        if self._write_sink is not None:
            self._write_sink.send(b"".join(buffers))
            return
        if self._parked_out is not None:
            self._send_parked(buffers)
            return
        if expires_at is None:
            expires_at = self.clock() + self._write_timeout
            if self._unit_expires_at is not None and self._unit_expires_at < expires_at:
                expires_at = self._unit_expires_at
        if self.tls:
            self._tls_send_buffers(buffers, expires_at)
            return
        sendmsg = self._sock.sendmsg
        sent_total = 0
        first = 0   # buffers before this index are fully sent
        self.operation = "write"
        self._op_expires_at = expires_at
        slot = self.run_slot
        try:
            if slot is not None and slot.held and len(buffers) <= IOV_MAX:
                # Holding a run slot: first what the kernel takes without blocking.
                try:
                    sent_total = sendmsg(buffers, (), SEND_FLAGS | _DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    self._io_failed(exc, "write")
                first = skip_sent(buffers, 0, sent_total)
            if first < len(buffers):
                # The rest waits for the peer: no slot meanwhile.
                with self._slot_released():
                    while first < len(buffers):
                        self._arm_send(expires_at)
                        try:
                            sent = sendmsg(buffers[first:first + IOV_MAX], (), SEND_FLAGS)
                        except OSError as exc:
                            self._io_failed(exc, "write")
                        sent_total += sent
                        first = skip_sent(buffers, first, sent)
        finally:
            self.bytes_sent += sent_total
            self.operation = None

    # --- a write sink (hub subscription) owns the write side --------------------------

    def attach_write_sink(self, sink: WriteSink) -> None:
        """From now on, writes go to ``sink`` (a hub subscription), which sends them
        (after any replies a parked connection still had waiting)."""
        if self._write_sink is not None:
            raise ValueError(f"connection #{self.id} is already subscribed to a hub")
        if self._parked_out:
            sink.send(b"".join(bytes(part) for part in self._parked_out))
            self._parked_out.clear()
            self._parked_out_bytes = 0
            self.out_expires_at = None
        self._write_sink = sink

    def detach_write_sink(self, sink: WriteSink) -> None:
        if self._write_sink is sink:
            self._write_sink = None

    @property
    def write_sink_attached(self) -> bool:
        return self._write_sink is not None

    @property
    def queue_bytes(self) -> int:
        """Bytes queued for this connection by its write sink, not yet sent."""
        sink = self._write_sink
        return 0 if sink is None else sink.queued_bytes

    def wire_bytes(self, plaintext: list) -> list:
        """What goes on the wire for the buffers ``plaintext``: themselves, or (TLS) their
        records after any ciphertext the session holds. For a writer that sends with
        :meth:`send_nowait`; ``ssl.SSLError`` (an ``OSError``) if the session failed."""
        if not self.tls:
            return plaintext
        data = plaintext[0] if len(plaintext) == 1 else b"".join(plaintext)
        return self.tls.seal(data)   # counted as sent as send_nowait hands its records over

    def wire_output_waiting(self) -> bool:
        """TLS: ciphertext made by reading (a key update, an alert) is waiting to go out."""
        return bool(self.tls and self.tls.has_output())

    def send_nowait(self, buffers: list) -> bool:
        """Send what the kernel takes of ``buffers`` now (removed from the list as sent).

        For a writer thread that must never wait (a hub's): True when everything
        went, False when the socket is full; ``OSError`` when the peer is gone.
        Counted in ``bytes_sent`` here: over TLS (``buffers`` are then ciphertext), the
        plaintext of the records the kernel took whole.
        """
        try:
            sent = self._sock.sendmsg(buffers[:IOV_MAX], (), SEND_FLAGS | _DONTWAIT)
        except BlockingIOError:
            return False
        self.bytes_sent += self.tls.sent(sent) if self.tls else sent
        del buffers[:skip_sent(buffers, 0, sent)]
        return not buffers

    def take_back_unsent(self, wire: list) -> list:
        """A detached writer's unsent wire bytes: TLS ciphertext goes back to the session
        (to go out before anything newer); plaintext is returned, for the next writer."""
        if self.tls:
            self.tls.put_back(wire)
            return []
        return wire

    def _arm_send(self, expires_at: float) -> None:
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        self._bound_wait(socket.SO_SNDTIMEO, expires_at, "write")

    def send_goodbye(self, data: bytes, timeout: float = 1.0) -> bool:
        """Best-effort last write, allowed even after cancellation; never raises.

        Bounded by ``timeout`` (and by the write deadline); returns whether all of
        ``data`` was handed to the kernel. Everything else keeps raising
        :class:`~connserver.Cancelled` once the connection is cancelled. While a
        hub's writer owns the write side, it is taken back first, with whatever
        it still had queued.
        """
        slot = self.run_slot
        if slot is not None:
            slot.leave()
        expires_at = self.clock() + min(timeout, self._write_timeout)
        if self._parked_out:   # a parked connection's queued replies go first
            data = b"".join(bytes(part) for part in self._parked_out) + data
            self._parked_out.clear()
            self._parked_out_bytes = 0
            self.out_expires_at = None
        if self._write_sink is not None:
            unsent = self._write_sink.close()
            if unsent:
                data = b"".join(bytes(part) for part in unsent) + data
        session = self.tls
        sent = 0
        try:
            if session:   # after any ciphertext left unsent (by the hub's writer, say)
                data = b"".join(bytes(part) for part in session.seal(data))
            with memoryview(data) as view:
                while sent < len(view):
                    remaining = expires_at - self.clock()
                    if remaining <= 0:
                        return False
                    self._timeouts.set_send(remaining)
                    taken = self._sock.send(view[sent:], SEND_FLAGS)
                    sent += taken
                    self.bytes_sent += session.sent(taken) if session else taken
        except (OSError, ConnServerError, Cancelled):
            return False
        finally:
            if session and sent < len(data):
                session.give_up()   # the rest of the goodbye is dropped
        return True
