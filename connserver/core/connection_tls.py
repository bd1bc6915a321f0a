"""The TLS half of a connection's I/O: ciphertext through the same deadline-bound calls.

Part of :class:`~connserver.Connection` (a mixin with no state of its own),
kept apart because it is the one path most readers can skip. The connection's
socket stays a plain blocking socket; OpenSSL works between memory BIOs
(:class:`~connserver.tls.TLSSession`), and this module moves the ciphertext:
reads wait like plaintext reads (idle between records; once a record has
begun, the rest is due within ``read_timeout`` of its first byte), writes are
encrypted a bounded step at a time and sent under the write deadline, and the
handshake runs under one absolute deadline.
"""

from __future__ import annotations

import functools
import socket
import ssl
from typing import TYPE_CHECKING, Any

from ..errors import RemoteProtocolError
from .closing import Answer, unacked_bytes
from .send_buffers import IOV_MAX, SEND_FLAGS, skip_sent, take_up_to
from ..protocols.tls import TLSSession

if TYPE_CHECKING:
    from .deadline import Deadline

__all__ = ["TLSConnectionIO"]

# Plaintext encrypted per step (bounds the ciphertext held for one write), and
# what one handshake read asks for (a flight of records, client certificates included).
_TLS_WRITE_MAX = 256 * 1024
_TLS_HANDSHAKE_READ = 32 * 1024
_ANSWER_READ = 64 * 1024   # plaintext decrypted per step while a closing answer is awaited
_DONTWAIT = socket.MSG_DONTWAIT


class TLSConnectionIO:
    """TLS reads, writes and handshake for :class:`~connserver.Connection`."""

    __slots__ = ()
    # The Connection attributes and methods this half uses, declared for readers and
    # type checkers (defined in connection.py and connection_writing.py).
    tls: TLSSession | None
    _sock: socket.socket
    _read_timeout: float
    _write_timeout: float
    _buffer_size: int
    _recv_hint: int
    _pending_error: OSError | None
    _unit_expires_at: float | None
    _write_sink: Any
    cancel_token: Any
    operation: str | None
    _op_expires_at: float | None
    bytes_received: int
    bytes_sent: int
    clock: Any
    _io_failed: Any
    _arm_recv: Any
    _arm_idle: Any
    _arm_send: Any
    _bound_wait: Any
    _adapt_hint: Any
    _recv_into_pool: Any
    _saw_eof: Any
    _slot_released: Any

    def start_tls(self, context: ssl.SSLContext, deadline: "Deadline") -> None:
        """Run the server side of a TLS handshake before ``deadline``.

        On this connection's own thread, so a client that never finishes its
        handshake holds up no one else. Every flight is read and written under
        that one deadline, so a client trickling its handshake cannot stretch it.
        """
        session = self.tls = TLSSession(context, functools.partial(unacked_bytes, self._sock))
        expires_at = deadline.expires_at
        assert expires_at is not None
        self.operation = "handshake"
        self._op_expires_at = expires_at
        sock = self._sock
        try:
            while True:
                done = self._tls_handshake_step()
                if session.output_ready:
                    self._tls_send(session.seal(), expires_at, "handshake")
                if done:
                    return
                self._bound_wait(socket.SO_RCVTIMEO, expires_at, "handshake")
                try:
                    data = sock.recv(_TLS_HANDSHAKE_READ)
                except OSError as exc:
                    self._io_failed(exc, "handshake")
                if data:
                    session.receive(data, self.clock())
                else:
                    session.receive_eof()   # the next step fails as OpenSSL sees fit
        finally:
            self.operation = None

    def _tls_handshake_step(self) -> bool:
        """One step of the handshake with what was received (both modes); True once
        done. Bad input fails it, after OpenSSL's alert if the socket takes it."""
        try:
            return self.tls.handshake()   # type: ignore[union-attr]
        except ssl.SSLError as exc:
            self._tls_send_alert()
            self._io_failed(exc, "handshake")

    def _tls_recv(self, limit: int, message_expires_at: float | None, phase: str) -> bytes:
        """TLS's blocking read: plaintext already received, else wait for ciphertext.

        The wait is a plaintext wait on the raw socket: between records, the
        idle timeout (or the message's deadline); once a record has begun, the
        rest of it is due within ``read_timeout`` of its first byte (or by the
        message's deadline, if sooner), so a peer trickling a record cannot
        stretch a read to the idle timeout.
        """
        session = self.tls
        assert session is not None
        sock = self._sock
        try:
            while True:
                try:
                    data = session.read(limit)
                except ssl.SSLError as exc:
                    self._tls_send_alert()
                    self._io_failed(exc, phase)
                if session.output_ready:
                    self._tls_flush_output()
                if data is not None:
                    return data
                started = session.record_started
                if started is not None:
                    expires_at = started + self._read_timeout
                    if message_expires_at is not None and message_expires_at < expires_at:
                        expires_at = message_expires_at
                    phase = self._arm_recv(expires_at)
                elif message_expires_at is not None or self._unit_expires_at is not None:
                    phase = self._arm_recv(message_expires_at,
                                           "handshake" if phase == "handshake" else "read")
                else:
                    phase = self._arm_idle()
                want = self._recv_hint
                try:
                    if self._pending_error is not None:
                        raise self._pending_error   # seen after the last call's data
                    data = sock.recv(want)
                except OSError as exc:
                    self._io_failed(exc, phase)
                if not data:
                    return data   # end of stream, with or without close_notify, as plaintext
                if len(data) == want:   # sized as plaintext reads are
                    data = self._recv_into_pool(data, self._buffer_size)
                self._adapt_hint(want, len(data))
                session.receive(data, self.clock())
        finally:
            self.operation = None

    def _tls_fill(self, buffer: bytearray, received: int, size: int) -> bytes:
        """The rest of a message that has begun, under its deadline (see ``_fill``)."""
        message_expires_at = self.clock() + self._read_timeout
        with self._slot_released():
            while received < size:
                chunk = self._tls_recv(size - received, message_expires_at, "read")
                if not chunk:
                    self._saw_eof()
                    raise RemoteProtocolError(
                        f"peer closed the connection {received} bytes into a {size}-byte message")
                buffer[received:received + len(chunk)] = chunk
                received += len(chunk)
                self.bytes_received += len(chunk)
        with memoryview(buffer) as view:
            return bytes(view[:size])

    def _tls_send_buffers(self, buffers: list, expires_at: float) -> None:
        """Encrypt a bounded part at a time, and send all of its ciphertext (after any
        left unsent before) under the write deadline."""
        session = self.tls
        assert session is not None
        first = 0
        self.operation = "write"
        self._op_expires_at = expires_at
        try:
            with self._slot_released():   # the run slot is given back first, as for any wait
                while True:
                    data, first = take_up_to(buffers, first, _TLS_WRITE_MAX)
                    try:
                        chunks = session.seal(data)
                    except ssl.SSLError as exc:
                        self._io_failed(exc, "write")
                    self._tls_send(chunks, expires_at, "write")
                    if first >= len(buffers):
                        return
        finally:
            self.operation = None

    def _tls_send(self, chunks: list, expires_at: float, phase: str) -> None:
        """Send all of ``chunks`` (ciphertext) by ``expires_at``; whatever is left when
        this fails goes back to the session, to go out first next time. Plaintext
        counts in ``bytes_sent`` as the kernel takes its records whole."""
        sock = self._sock
        session = self.tls
        assert session is not None
        try:
            while chunks:
                if phase == "write":
                    self._arm_send(expires_at)
                else:
                    self._bound_wait(socket.SO_SNDTIMEO, expires_at, phase)
                try:
                    sent = sock.sendmsg(chunks[:IOV_MAX], (), SEND_FLAGS)
                except OSError as exc:
                    self._io_failed(exc, phase)
                self.bytes_sent += session.sent(sent)
                del chunks[:skip_sent(chunks, 0, sent)]
        finally:
            if chunks:
                session.put_back(chunks)

    def _tls_flush_output(self) -> None:
        """Send the ciphertext that reading made (an alert, a key update): at once, or,
        while a hub's writer owns the write side, through it, behind what it holds."""
        if self._write_sink is not None:
            self._write_sink.wake_writer()
        else:
            self._tls_send_buffers([], self.clock() + self._write_timeout)

    def _tls_send_alert(self) -> None:
        """Before failing on bad TLS input, send OpenSSL's alert if the socket takes it now.
        Not once cancelled: the end of stream OpenSSL then complains of is our own
        (the cancel shut the read side), not the peer's fault."""
        if self._write_sink is not None or self.cancel_token.cancelled:
            return   # the hub's writer may be half-way through a record
        self._send_now_or_never(self.tls.seal())   # type: ignore[union-attr]

    def _tls_close_notify(self) -> None:
        """Before closing: end the TLS stream with close_notify if the socket takes it
        now (best effort), so the client can tell our end from a truncation."""
        if self._write_sink is not None:
            return   # the hub's writer still owns the write side
        if self.cancel_token.cancelled and not self.tls.established:   # type: ignore[union-attr]
            return   # a handshake cut short by us: no alert of OpenSSL's blaming the peer
        self._send_now_or_never(self.tls.close_notify())   # type: ignore[union-attr]

    def plaintext_answer(self, answer: Answer | None) -> Answer | None:
        """The lingering close reads ciphertext: over TLS, an awaited answer (a WebSocket's
        close frame) is given what that decrypts to, and the peer's close_notify ends
        the wait (nothing more can come). In clear, ``answer`` itself."""
        session = self.tls
        if answer is None or session is None:
            return answer

        def take(ciphertext: bytes) -> bool:
            session.receive(ciphertext, self.clock())
            while plaintext := session.read(_ANSWER_READ):   # ssl.SSLError ends the wait too
                answer.feed(plaintext)
                if answer.done:
                    return True
            return plaintext == b""

        return Answer(take, answer.timeout)

    def _send_now_or_never(self, chunks: list) -> None:
        """Send what the socket takes of ``chunks`` now; the rest is dropped (the
        connection is ending), and with it the stream: the session is told."""
        if not chunks:
            return
        session = self.tls
        assert session is not None
        sent = 0
        try:
            sent = self._sock.sendmsg(chunks[:IOV_MAX], (), SEND_FLAGS | _DONTWAIT)
        except OSError:
            pass
        self.bytes_sent += session.sent(sent)
        if sent < sum(len(chunk) for chunk in chunks):
            session.give_up()
