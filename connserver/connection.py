"""Connection: the one place that does socket I/O, always under a deadline.

How deadlines reach the kernel. ``socket.settimeout(t)`` costs an ``ioctl`` on
every call and turns each ``recv`` into ``poll`` + ``recv`` (three system calls
where a plain blocking server makes one; see docs/explanation/deadlines.md).
So the socket stays in blocking mode and the time left is given to the kernel
as ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``: the same per-call bound computed from an
absolute monotonic deadline, set only when it changes. Waiting for the next
message uses the constant ``idle_timeout`` (no extra system call at all); a
message in progress and every write get the remaining time of their absolute
deadline, so a peer trickling a byte at a time cannot stretch it.

Only the owning handler thread calls :meth:`close`. Other threads (the
watchdog) call :meth:`abort`, which shuts the socket down under the same lock,
so a shutdown can never hit an fd number that was closed and reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import select
import socket
import ssl
import struct
import termios
import threading
import time
from typing import TYPE_CHECKING, Iterable, Iterator, NoReturn

from .buffers import BufferLease, BufferPool, LeaseAccount
from .cancel import CancelToken
from .config import Config
from .deadline import Clock, monotonic
from .errors import (Cancelled, CloseReason, ConnectionBroken, ConnServerError, DeadlineExceeded,
                     LocalProtocolError, RateLimited, RemoteProtocolError)
from .tls import TLSSession

if TYPE_CHECKING:
    from .admission import RunGate
    from .framing import Codec
    from .hub import Subscription
    from .ratelimit import TokenBucket
    from .stats import ServerStats

__all__ = ["Connection", "ConnectionInfo"]

_TIMEVAL = struct.Struct("ll")
# A timeout already set may be up to this much longer than what is left, to save a
# setsockopt per call; the deadline is then overshot by at most this.
_TIMEOUT_SLACK = 0.005
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_IOV_MAX = 1024   # buffers per sendmsg (Linux's IOV_MAX)
_DONTWAIT = socket.MSG_DONTWAIT
# A blocking recv asks for about the size of recent messages, between these:
# small enough that an idle connection waits holding next to nothing.
_HINT_MIN = 256
_HINT_MAX = 16384
# TLS: plaintext encrypted per step (bounds the ciphertext held for one write), and
# what one handshake read asks for (a flight of records, client certificates included).
_TLS_WRITE_MAX = 256 * 1024
_TLS_HANDSHAKE_READ = 32 * 1024


@dataclasses.dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one live connection (for ``server.connections()``)."""

    id: int
    peer: str
    age: float
    bytes_in: int
    bytes_out: int
    operation: str | None            # "idle", "read", "write" or None (running handler code)
    deadline_remaining: float | None
    leases: int
    queue_bytes: int


class Connection:
    """A connected socket with deadline-bounded, cancel-aware I/O.

    Methods for the handler: :meth:`recv`, :meth:`recv_exactly`, :meth:`sendall`,
    :meth:`deadline`, :meth:`lease`. Read-only attributes: ``id``, ``peer``,
    ``bytes_received``, ``bytes_sent``, ``close_reason`` (set once it ended).
    """

    # Slots: more than 30 attributes would make every instance carry a full dict of its own
    # (CPython shares dict keys only up to 30), about 1 KiB per idle connection. ``__dict__``
    # stays available for attributes a subclass or handler adds.
    __slots__ = ("id", "peer", "peer_label", "config", "cancel_token", "_sock", "_fileno",
                 "_pool", "_stats", "_clock", "_close_lock", "_closed", "_idle_timeout",
                 "_read_timeout", "_write_timeout", "_buffer_size", "_rcvtimeo", "_sndtimeo",
                 "_unit_expires_at", "_op_expires_at", "leases", "_recv_hint", "_pending_error",
                 "run_gate", "_in_gate", "_gate_ticket", "thread_ident", "created_at",
                 "bytes_received", "bytes_sent", "operation", "outcome", "close_reason",
                 "queue_bytes", "codec", "_subscription", "tls", "accounted_ip", "rate_ip",
                 "_recv_flags", "_send_flags", "rate_limiters", "rate_unit",
                 "_wait_when_limited", "_handler", "_read_shut", "_forced", "_cancel_raised",
                 "bytes_unacked", "__dict__", "__weakref__")

    def __init__(self, sock: socket.socket, peer: object, *, id: int, config: Config,
                 pool: BufferPool, cancel_token: CancelToken | None = None,
                 stats: "ServerStats | None" = None, clock: Clock = monotonic,
                 kernel_timeouts_set: bool = False) -> None:
        self.id = id
        self.peer = peer
        self.peer_label = format_peer(peer)
        self.config = config
        self.cancel_token = cancel_token if cancel_token is not None else CancelToken()
        self._sock = sock
        self._fileno = sock.fileno()
        self._pool = pool
        self._stats = stats
        self._clock = clock
        self._close_lock = threading.Lock()
        self._closed = False
        self._idle_timeout = config.idle_timeout
        self._read_timeout = config.read_timeout
        self._write_timeout = config.write_timeout
        self._buffer_size = pool.buffer_size
        # What the kernel has now; kernel_timeouts_set: set_kernel_timeouts() was called.
        self._rcvtimeo = config.idle_timeout if kernel_timeouts_set else None
        self._sndtimeo = config.write_timeout if kernel_timeouts_set else None
        self._unit_expires_at: float | None = None
        self._op_expires_at: float | None = None
        self.leases = LeaseAccount()
        self._recv_hint = _HINT_MIN   # how much the next blocking recv asks for
        self._pending_error: OSError | None = None   # a read error behind returned data
        self.run_gate: "RunGate | None" = None   # set by the server (Config.max_running)
        self._in_gate = False                    # holding a run slot
        self._gate_ticket: threading.Lock | None = None   # what we queue on for one
        self.thread_ident = threading.get_ident()   # the owning handler thread
        self.created_at = clock()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.operation: str | None = None
        self.outcome: CloseReason | None = None   # what the I/O itself saw: eof, reset, a deadline
        self.close_reason: CloseReason | None = None
        self.queue_bytes = 0   # bytes queued for this connection elsewhere (a hub)
        self.codec: "Codec | None" = None   # set by FramedHandler / LineHandler
        self._subscription: "Subscription | None" = None   # set by Hub.subscribe
        self._handler: object = None   # the Handler serving it, set by Handler.__init__
        self.tls: TLSSession | None = None   # set by start_tls(); TLS changes how I/O is done
        self.accounted_ip: str | None = None   # the address max_connections_per_ip counted
        self.rate_ip: str | None = None        # the address whose ip_rate bucket we hold
        self._recv_flags = _DONTWAIT   # for reads of what is known to be waiting
        self._send_flags = _SEND_FLAGS
        self.rate_limiters: tuple[TokenBucket, ...] = ()   # set by the server from Config
        self.rate_unit = "bytes"   # what raw recv() charges; message handlers charge frames
        self._wait_when_limited = config.on_rate_limit == "wait"
        self._read_shut = False      # abort() shut the read side (the watchdog woke a reader)
        self._forced = False         # abort(force=True): both sides shut, writes fail now
        self._cancel_raised = False  # Cancelled was raised to the handler at least once
        self.bytes_unacked = 0       # sent, but not acknowledged by the peer when closed
        sock.setblocking(True)

    # --- reading -------------------------------------------------------------

    def recv(self, max_bytes: int | None = None) -> bytes:
        """Receive up to ``max_bytes`` (at most ``buffer_size``); ``b""`` at end of stream.

        Waits at most ``idle_timeout`` for data (less inside :meth:`deadline`).
        The result is an exact-size ``bytes`` copy; no pooled buffer stays held.
        """
        if max_bytes is None or max_bytes >= self._buffer_size:
            return self._recv_copy(self._buffer_size, None)
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        return self._recv_copy(max_bytes, None)

    def recv_part(self, message_expires_at: float | None) -> bytes:
        """Receive what is available of a message whose deadline is ``message_expires_at``.

        For framing loops: ``None`` means no message has started (the idle timeout
        applies); otherwise the absolute deadline (on the connection's clock) that
        the message's first byte started.
        """
        return self._recv_copy(self._buffer_size, message_expires_at)

    def _recv_copy(self, limit: int, message_expires_at: float | None) -> bytes:
        """Block (under the current deadline) for what is available, up to ``limit``.

        One blocking ``recv`` sized like the connection's recent messages: the
        kernel writes straight into the ``bytes`` object returned, so a small
        message costs one system call and no copy, and an idle connection waits
        holding only that small allocation (at most ``_HINT_MAX``), never a pooled
        buffer. If it comes back full, more may be waiting: the rest is read
        without blocking into a pooled buffer and copied out once. ``b""`` at end
        of stream.
        """
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        if message_expires_at is None and self._unit_expires_at is None:
            # Waiting for a new message: the constant idle timeout, usually already set.
            phase = self.operation = "idle"
            self._op_expires_at = self._clock() + self._idle_timeout
            if self._rcvtimeo != self._idle_timeout:
                self._set_timeout(socket.SO_RCVTIMEO, self._idle_timeout)
        else:
            phase = self._arm_recv(message_expires_at)
        if self.tls:
            if self._in_gate:
                self._leave_gate()
            data = self._tls_recv(limit, message_expires_at, phase)
        else:
            want = self._recv_hint if self._recv_hint < limit else limit
            if self._in_gate:
                self._leave_gate()
            try:
                if self._pending_error is not None:
                    raise self._pending_error   # seen after the last call's data
                data = self._sock.recv(want)
            except OSError as exc:
                self._io_failed(exc, phase)
            finally:
                self.operation = None
            received = len(data)
            if received == want:
                if want < limit:
                    data = self._recv_into_pool(data, limit)
                # Next time ask for the next power of two above what came, so a
                # message of the same size fits in one call.
                self._recv_hint = min(_HINT_MAX, max(_HINT_MIN, 1 << len(data).bit_length()))
            elif received <= want >> 3 and want > _HINT_MIN:
                self._recv_hint = want >> 1   # messages got small again: let the idle wait shrink
        if not data:
            self._saw_eof()
            return data
        gate = self.run_gate
        if gate is not None and gate.connections > gate.slots:
            self._enter_gate(gate)
        self.bytes_received += len(data)
        self.outcome = None   # a handler that recovered from a deadline is not judged by it
        if self.rate_limiters and self.rate_unit == "bytes":
            self.charge(len(data))
        return data

    def _recv_into_pool(self, prefix: bytes, limit: int) -> bytes:
        """``prefix`` plus whatever more is readable now, up to ``limit`` bytes in all."""
        pool = self._pool
        buffer = pool.acquire()
        try:
            start = len(prefix)
            with memoryview(buffer) as view:
                view[:start] = prefix
                try:
                    more = self._sock.recv_into(view[start:limit], limit - start, self._recv_flags)
                except OSError as exc:
                    if not prefix:
                        self._io_failed(exc, "read")
                    # Nothing more yet, or a reset right behind the bytes we already
                    # hold: return those; the next call reports the error.
                    if not isinstance(exc, BlockingIOError):
                        self._pending_error = exc
                    return prefix
                return bytes(view[:start + more]) if more else prefix
        finally:
            pool.release(buffer)

    # --- TLS: ciphertext goes through the same deadline-bound calls as plaintext ---

    def start_tls(self, context: "ssl.SSLContext", timeout: float) -> None:
        """Run the server side of a TLS handshake within ``timeout`` (one absolute deadline).

        On this connection's own thread, so a client that never finishes its
        handshake holds up no one else. Every flight is read and written under
        that one deadline, so a client trickling its handshake cannot stretch it.
        """
        session = self.tls = TLSSession(context)
        expires_at = self._clock() + timeout
        self.operation = "handshake"
        self._op_expires_at = expires_at
        sock = self._sock
        try:
            while True:
                try:
                    done = session.handshake()
                except ssl.SSLError as exc:
                    self._tls_send_alert()
                    self._io_failed(exc, "handshake")
                if session.output_ready:
                    self._tls_send(session.seal(), expires_at, "handshake")
                if done:
                    return
                self._arm_tls(socket.SO_RCVTIMEO, expires_at, "handshake")
                try:
                    data = sock.recv(_TLS_HANDSHAKE_READ)
                except OSError as exc:
                    self._io_failed(exc, "handshake")
                if data:
                    session.receive(data, self._clock())
                else:
                    session.receive_eof()   # the next step fails as OpenSSL sees fit
        finally:
            self.operation = None

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
                    phase = self._arm_recv(message_expires_at)
                else:
                    phase = self.operation = "idle"
                    self._op_expires_at = self._clock() + self._idle_timeout
                    if self._rcvtimeo != self._idle_timeout:
                        self._set_timeout(socket.SO_RCVTIMEO, self._idle_timeout)
                want = self._recv_hint
                try:
                    if self._pending_error is not None:
                        raise self._pending_error   # seen after the last call's data
                    data = sock.recv(want)
                except OSError as exc:
                    self._io_failed(exc, phase)
                if not data:
                    return data   # end of stream, with or without close_notify, as plaintext
                if len(data) == want:   # sized as _recv_copy sizes plaintext reads
                    data = self._recv_into_pool(data, self._buffer_size)
                    self._recv_hint = min(_HINT_MAX, max(_HINT_MIN, 1 << len(data).bit_length()))
                elif len(data) <= want >> 3 and want > _HINT_MIN:
                    self._recv_hint = want >> 1
                session.receive(data, self._clock())
        finally:
            self.operation = None

    def _tls_fill(self, buffer: bytearray, received: int, size: int) -> bytes:
        """:meth:`_fill` for TLS: the rest of a message that has begun, under its deadline."""
        message_expires_at = self._clock() + self._read_timeout
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
        """:meth:`_send_buffers` for TLS: encrypt a bounded part at a time, and send all
        of its ciphertext (after any left unsent before) under the write deadline."""
        session = self.tls
        assert session is not None
        first = 0
        self.operation = "write"
        self._op_expires_at = expires_at
        try:
            with self._slot_released():   # the run slot is given back first, as for any wait
                while True:
                    data, first = _take_plaintext(buffers, first, _TLS_WRITE_MAX)
                    try:
                        chunks = session.seal(data)
                    except ssl.SSLError as exc:
                        self._io_failed(exc, "write")
                    self._tls_send(chunks, expires_at, "write")
                    self.bytes_sent += len(data)
                    if first >= len(buffers):
                        return
        finally:
            self.operation = None

    def _tls_send(self, chunks: list, expires_at: float, phase: str) -> None:
        """Send all of ``chunks`` (ciphertext) by ``expires_at``; whatever is left when
        this fails goes back to the session, to go out first next time."""
        sock = self._sock
        try:
            while chunks:
                if phase == "write":
                    self._arm_send(expires_at)
                else:
                    self._arm_tls(socket.SO_SNDTIMEO, expires_at, phase)
                try:
                    sent = sock.sendmsg(chunks[:_IOV_MAX], (), _SEND_FLAGS)
                except OSError as exc:
                    self._io_failed(exc, phase)
                del chunks[:_skip_sent(chunks, 0, sent)]
        finally:
            if chunks:
                self.tls.put_back(chunks)   # type: ignore[union-attr]

    def _tls_flush_output(self) -> None:
        """Send the ciphertext that reading made (an alert, a key update): at once, or,
        while subscribed, through the hub's writer, behind what it holds."""
        if self._subscription is not None:
            self._subscription.wake_writer()
        else:
            self._tls_send_buffers([], self._clock() + self._write_timeout)

    def _tls_send_alert(self) -> None:
        """Before failing on bad TLS input, send OpenSSL's alert if the socket takes it now."""
        if self._subscription is not None:
            return   # the hub's writer may be half-way through a record
        try:
            chunks = self.tls.seal()   # type: ignore[union-attr]
            if chunks:
                self._sock.sendmsg(chunks, (), _SEND_FLAGS | _DONTWAIT)
        except OSError:
            pass

    def _tls_close_notify(self) -> None:
        """Before closing: end the TLS stream with close_notify if the socket takes it
        now (best effort), so the client can tell our end from a truncation."""
        if self._subscription is not None:
            return   # the hub's writer still owns the write side
        try:
            chunks = self.tls.close_notify()   # type: ignore[union-attr]
            if chunks:
                self._sock.sendmsg(chunks, (), _SEND_FLAGS | _DONTWAIT)
        except OSError:
            pass

    def _arm_tls(self, option: int, expires_at: float, phase: str) -> None:
        """Like :meth:`_arm_recv` / :meth:`_arm_send`, for a step of the handshake."""
        remaining = expires_at - self._clock()
        if remaining <= 0:
            self._deadline_exceeded(phase)
        current = self._rcvtimeo if option == socket.SO_RCVTIMEO else self._sndtimeo
        if current is None or not (remaining <= current <= remaining + _TIMEOUT_SLACK):
            self._set_timeout(option, remaining)

    def recv_exactly(self, size: int) -> bytes:
        """Receive exactly ``size`` bytes, or ``b""`` if the stream ends before the first.

        The first byte may take ``idle_timeout``; from it, the whole message must
        arrive within ``read_timeout`` (an absolute deadline). The stream ending
        part-way is a :class:`~connserver.RemoteProtocolError`.
        """
        if size <= 0:
            raise ValueError("size must be positive")
        head = self._recv_copy(min(size, self._buffer_size), None)
        if not head or len(head) == size:
            return head
        buffer = self._pool.acquire() if size <= self._buffer_size else bytearray(size)
        try:
            buffer[:len(head)] = head
            message = self._fill(buffer, len(head), size)
        finally:
            if size <= self._buffer_size:
                self._pool.release(buffer)
        if self.rate_limiters and self.rate_unit == "bytes":
            self.charge(size - len(head))   # the first part was charged as it came
        return message

    def _fill(self, buffer: bytearray, received: int, size: int) -> bytes:
        """Read the rest of a message that has begun, under its absolute read deadline."""
        if self.tls:
            return self._tls_fill(buffer, received, size)
        message_expires_at = self._clock() + self._read_timeout
        sock = self._sock
        # The rest may take up to read_timeout: wait for it without a run slot.
        with self._slot_released(), memoryview(buffer) as view:
            try:
                while received < size:
                    phase = self._arm_recv(message_expires_at)
                    try:
                        count = sock.recv_into(view[received:size])
                    except OSError as exc:
                        self._io_failed(exc, phase)
                    if not count:
                        self._saw_eof()
                        raise RemoteProtocolError(
                            f"peer closed the connection {received} bytes into a "
                            f"{size}-byte message")
                    received += count
                    self.bytes_received += count
            finally:
                self.operation = None
            message = bytes(view[:size])
        return message

    def _arm_recv(self, message_expires_at: float | None) -> str:
        """Set the kernel receive timeout for the next call; return the phase it bounds."""
        expires_at = self._unit_expires_at
        if message_expires_at is not None and (expires_at is None or message_expires_at < expires_at):
            expires_at = message_expires_at
        assert expires_at is not None   # the idle wait without one is _recv_copy's fast path
        remaining = expires_at - self._clock()
        phase = "read"
        if message_expires_at is None and remaining > self._idle_timeout:
            remaining, phase = self._idle_timeout, "idle"
        self.operation = phase
        self._op_expires_at = expires_at
        if remaining <= 0:
            self._deadline_exceeded(phase)
        current = self._rcvtimeo
        if current is None or not (remaining <= current <= remaining + _TIMEOUT_SLACK):
            self._set_timeout(socket.SO_RCVTIMEO, remaining)
        return phase

    # --- writing -------------------------------------------------------------

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` within ``write_timeout`` (an absolute deadline).

        After cancellation this raises :class:`~connserver.Cancelled`, except during
        a shutdown's drain: see :meth:`_writes_cancelled`.
        """
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        if (self._subscription is not None or self._unit_expires_at is not None or self._in_gate
                or self.tls):
            self._send_buffers([data])
            return
        # Fast path: a fresh write deadline is always write_timeout away, so the
        # kernel timeout already set for the last write usually fits unchanged.
        self.operation = "write"
        self._op_expires_at = expires_at = self._clock() + self._write_timeout
        if self._sndtimeo != self._write_timeout:
            self._set_timeout(socket.SO_SNDTIMEO, self._write_timeout)
        try:
            sent = self._sock.send(data, self._send_flags)
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

        While subscribed to a hub, the bytes go on the subscription's queue
        instead, so only the hub's writer writes to the socket and order holds.
        """
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        if self._subscription is not None:
            self._subscription.send(b"".join(buffers))
            return
        if expires_at is None:
            expires_at = self._clock() + self._write_timeout
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
        try:
            if self._in_gate and len(buffers) <= _IOV_MAX:
                # Holding a run slot: first what the kernel takes without blocking.
                try:
                    sent_total = sendmsg(buffers, (), _SEND_FLAGS | _DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    self._io_failed(exc, "write")
                first = _skip_sent(buffers, 0, sent_total)
            if first < len(buffers):
                # The rest waits for the peer: no slot meanwhile.
                with self._slot_released():
                    while first < len(buffers):
                        self._arm_send(expires_at)
                        try:
                            sent = sendmsg(buffers[first:first + _IOV_MAX], (), _SEND_FLAGS)
                        except OSError as exc:
                            self._io_failed(exc, "write")
                        sent_total += sent
                        first = _skip_sent(buffers, first, sent)
        finally:
            self.bytes_sent += sent_total
            self.operation = None

    def _arm_send(self, expires_at: float) -> None:
        if self.cancel_token.cancelled and self._writes_cancelled():
            self._raise_cancelled()
        remaining = expires_at - self._clock()
        if remaining <= 0:
            self._deadline_exceeded("write")
        current = self._sndtimeo
        if current is None or not (remaining <= current <= remaining + _TIMEOUT_SLACK):
            self._set_timeout(socket.SO_SNDTIMEO, remaining)

    # --- deadlines, leases -----------------------------------------------------

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Bound everything inside the block to ``seconds`` from now (nesting narrows)."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        previous = self._unit_expires_at
        expires_at = self._clock() + seconds
        if previous is not None and previous < expires_at:
            expires_at = previous
        self._unit_expires_at = expires_at
        try:
            yield
        finally:
            self._unit_expires_at = previous

    def charge(self, amount: float = 1) -> None:
        """Take ``amount`` (bytes or messages) from every rate limiter of this connection.

        With ``on_rate_limit="wait"`` this blocks (cancel-aware) until the tokens are
        there, and since nothing is read meanwhile, TCP pushes back on the client;
        with ``"close"`` it raises :class:`~connserver.RateLimited` instead.
        """
        for bucket in self.rate_limiters:
            remaining = amount
            while remaining > 0:   # more than a burst at once: take it a burst at a time
                step = min(remaining, bucket.burst)
                if self._wait_when_limited:
                    if not bucket.acquire_nowait(step):
                        self.operation = "rate_wait"
                        try:
                            with self._slot_released():   # never wait one out holding a slot
                                bucket.acquire(step, cancel=self.cancel_token)
                        finally:
                            self.operation = None
                elif not bucket.acquire_nowait(step):
                    self.outcome = CloseReason.RATE_LIMITED
                    raise RateLimited(f"over the rate limit of {bucket.rate:g}/s")
                remaining -= step

    def set_peer(self, peer: object) -> None:
        """The client's real address, learned from a PROXY header."""
        self.peer = peer
        self.peer_label = format_peer(peer)

    def lease(self) -> BufferLease:
        """Lease a pooled buffer for this connection; it must be released before the end."""
        return self._pool.lease(self.leases, stacklevel=2)

    # --- run slots (admission) ---------------------------------------------------

    def _enter_gate(self, gate: "RunGate") -> None:
        """Take a run slot before running handler code on a message (see admission.py)."""
        if self._gate_ticket is None:
            self._gate_ticket = threading.Lock()
            self._gate_ticket.acquire()
        gate.enter(self._gate_ticket)
        self._in_gate = True

    def _leave_gate(self) -> None:
        """Give the run slot back before something that may block."""
        self._in_gate = False
        self.run_gate.leave()

    def _slot_released(self) -> contextlib.AbstractContextManager:
        """Around a wait: give the run slot back, and take one again if it went well."""
        return _SlotReleased(self) if self._in_gate else _NO_SLOT

    # --- failure paths ---------------------------------------------------------

    def _set_timeout(self, option: int, seconds: float) -> None:
        """Give the kernel the time this call may take (TLS too: its socket is plain); cached."""
        receiving = option == socket.SO_RCVTIMEO
        # A zero timeval means "no timeout" to the kernel: never send one.
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))
        except OSError as exc:
            self._io_failed(exc, "read" if receiving else "write")
        if receiving:
            self._rcvtimeo = seconds
        else:
            self._sndtimeo = seconds

    def _io_failed(self, exc: OSError, phase: str) -> NoReturn:
        self.operation = None
        if isinstance(exc, ConnServerError):
            raise exc   # already judged (DeadlineExceeded is an OSError too): count it once
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        if isinstance(exc, ssl.SSLError) and not isinstance(
                exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError,
                      ssl.SSLWantWriteError)):
            self.outcome = CloseReason.PROTOCOL_ERROR
            raise RemoteProtocolError(f"TLS {phase} failed: {exc.reason or exc}") from exc
        if isinstance(exc, BlockingIOError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            self._deadline_exceeded(phase)
        if isinstance(exc, socket.timeout) and exc.errno != errno.ETIMEDOUT:
            # CPython's own timeout (TLS connections use settimeout). The kernel's
            # ETIMEDOUT, also a TimeoutError, means keepalive or retransmission gave
            # up on a vanished peer: that is a broken connection, handled below.
            self._deadline_exceeded(phase)
        self.outcome = CloseReason.RESET
        raise ConnectionBroken(f"connection broken during {phase}: {exc.strerror or exc}",
                               exc.errno) from exc

    def _deadline_exceeded(self, phase: str) -> NoReturn:
        self.operation = None
        # Name the configured timeout only when it is what bound this call.
        timeout = None if self._unit_expires_at is not None else {
            "idle": self._idle_timeout, "read": self._read_timeout,
            "write": self._write_timeout}.get(phase)
        error = DeadlineExceeded(phase, timeout)
        self.outcome = error.close_reason
        if self._stats is not None:
            self._stats.count_deadline(phase)
        raise error

    def _saw_eof(self) -> None:
        if self.cancel_token.cancelled:
            self._raise_cancelled()
        self.outcome = CloseReason.EOF

    def _raise_cancelled(self) -> NoReturn:
        self.operation = None
        self._cancel_raised = True
        raise Cancelled(self.cancel_token.reason or CloseReason.CANCELLED)

    def _writes_cancelled(self) -> bool:
        """Whether a write on a cancelled connection must raise Cancelled.

        Cancellation is level-triggered, with one exception that keeps a drain from
        losing replies: when a shutdown cancelled the connection, the handler may
        finish the message it has in hand. Its writes still go out, under the write
        deadline, until Cancelled has been raised once (its next read raises it)
        or the drain's grace ran out (``abort(force=True)``). A handler that only
        writes should watch ``self.cancel`` to stop.
        """
        return (self.cancel_token.reason is not CloseReason.SHUTDOWN or self._cancel_raised
                or self._forced)

    # --- ending ----------------------------------------------------------------

    def abort(self, force: bool = False) -> bool:
        """Wake any thread blocked on this socket (``shutdown``; never ``close``).

        Safe from any thread: on Linux, ``shutdown()`` makes a blocked ``recv`` or
        ``send`` return at once, whereas ``close()`` from another thread does not,
        and could hit a reused fd number. Without ``force`` only the read side is
        shut, so a cancelled handler can still send a goodbye
        (:meth:`send_goodbye`); the return value says whether a write was under
        way, which the watchdog then forces shut if it stays blocked.

        Two things are left alone unless forced, so a drain loses no reply: a
        write in progress on a connection a shutdown cancelled (it finishes
        under its write deadline; the next read raises), and a lingering close
        (shutting the read side there would make the kernel answer the peer's
        next bytes with a reset, dropping what it has not yet delivered).
        """
        with self._close_lock:
            if self._closed:
                return False
            if force:
                self._forced = True
            elif self.operation == "linger" or (
                    self.operation == "write" and self.cancel_token.reason is CloseReason.SHUTDOWN):
                return False
            else:
                self._read_shut = True
            try:
                # socket.socket's own shutdown: SSLSocket.shutdown would drop the TLS
                # state under the owning thread's feet.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR if force else socket.SHUT_RD)
            except OSError:
                pass   # already disconnected: the blocked call has returned anyway
        return not force and self.operation == "write"

    def send_goodbye(self, data: bytes, timeout: float = 1.0) -> bool:
        """Best-effort last write, allowed even after cancellation; never raises.

        Bounded by ``timeout`` (and by the write deadline); returns whether all of
        ``data`` was handed to the kernel. Everything else keeps raising
        :class:`~connserver.Cancelled` once the connection is cancelled.
        """
        if self._in_gate:
            self._leave_gate()
        expires_at = self._clock() + min(timeout, self._write_timeout)
        if self._subscription is not None:
            # Take the write side back from the hub, with whatever it had half sent.
            unsent = self._subscription.close()
            if unsent:
                data = b"".join(bytes(part) for part in unsent) + data
        sent = 0
        try:
            if self.tls:   # after any ciphertext left unsent (by the hub's writer, say)
                data = b"".join(bytes(part) for part in self.tls.seal(data))
            with memoryview(data) as view:
                while sent < len(view):
                    remaining = expires_at - self._clock()
                    if remaining <= 0:
                        return False
                    self._set_timeout(socket.SO_SNDTIMEO, remaining)
                    sent += self._sock.send(view[sent:], self._send_flags)
        except (OSError, ConnServerError, Cancelled):
            return False
        finally:
            self.bytes_sent += sent
        return True

    def close(self, linger_timeout: float = 0.0) -> None:
        """Close the socket (owner thread only; idempotent).

        With ``linger_timeout`` (seconds), first wait up to that long for the peer
        to acknowledge what was sent (see :meth:`_linger`). Whatever it has not
        acknowledged by then is counted in ``bytes_unacked``: it may never arrive.
        """
        if self._in_gate:
            self._leave_gate()
        if self._closed:
            return
        if self.tls:
            self._tls_close_notify()
        tcp = self._sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:
            self._linger(linger_timeout)
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            if tcp and not self._forced:
                self.bytes_unacked = _unacked_bytes(self._sock)
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def _linger(self, timeout: float) -> None:
        """A lingering close: let the peer take what was sent before the socket closes.

        Closing a TCP socket whose receive queue holds unread bytes (or that
        receives more afterwards) makes the kernel send a reset and drop every
        byte it has not yet delivered: replies counted as sent would be lost. So,
        while the peer has not acknowledged everything: shut the write side (the
        peer reads to our end of stream), read and discard its input until its
        own end of stream, and stop when all is acknowledged, at ``timeout``, or
        when forced. If a reader was woken by ``shutdown(SHUT_RD)``, the write
        side stays open (data arriving on a socket shut both ways is answered
        with a reset) and input is discarded until everything is acknowledged.
        There is no readiness event for "acknowledged", so that wait polls, backing
        off from 1 ms to 50 ms. Unread input is always discarded, so the close
        itself sends no reset.
        """
        sock = self._sock
        if sock.gettimeout() is not None:
            # A socket in timeout mode waits for readiness before any recv, even with
            # MSG_DONTWAIT: make it plain blocking, so the flag does what it says.
            sock.settimeout(None)
        if _unacked_bytes(sock) == 0:
            self._discard_input()
            return
        self.operation = "linger"
        # Once the read side is shut, or the peer's end of stream came, the socket
        # always reads as ready: then there is nothing to wait on but time.
        ready_always = self._read_shut
        try:
            if not ready_always and not self._forced:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_WR)
                except OSError:
                    return
            expires_at = time.monotonic() + timeout   # real time: clocks in tests may stand still
            interval = 0.001
            poller = None
            while True:
                state = self._discard_input()
                if state == "reset" or self._forced or _unacked_bytes(sock) == 0:
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
                        poller.register(self._fileno, select.POLLIN)
                    poller.poll(wait * 1000)
                interval = min(interval * 2, 0.05)
        finally:
            self.operation = None

    def _discard_input(self) -> str | None:
        """Read and drop what the peer sent that nobody will read.

        Returns ``"eof"`` at the peer's end of stream (or with the read side shut
        and nothing left), ``"reset"`` if the connection is broken, else None.
        """
        try:
            while True:
                # socket.socket's own recv: for TLS these are raw bytes nobody will decrypt.
                if not socket.socket.recv(self._sock, 65536, _DONTWAIT):
                    return "eof"
        except BlockingIOError:
            return None
        except OSError:
            return "reset"   # nothing left to deliver

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> socket.socket:
        """The raw socket, for options only; do I/O through the connection's methods."""
        return self._sock

    def info(self) -> ConnectionInfo:
        now = self._clock()
        expires_at = self._op_expires_at if self.operation else None
        remaining = None if expires_at is None else max(0.0, expires_at - now)
        return ConnectionInfo(
            id=self.id, peer=self.peer_label, age=now - self.created_at,
            bytes_in=self.bytes_received, bytes_out=self.bytes_sent,
            operation=self.operation, deadline_remaining=remaining,
            leases=self.leases.outstanding, queue_bytes=self.queue_bytes)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Connection #{self.id} {self.peer_label} {state}>"


class _SlotReleased:
    """See Connection._slot_released; after an exception the connection is ending."""

    __slots__ = ("conn", "gate")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.gate = conn.run_gate

    def __enter__(self) -> None:
        self.conn._leave_gate()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn._enter_gate(self.gate)


_NO_SLOT = contextlib.nullcontext()


def _skip_sent(buffers: list, first: int, sent: int) -> int:
    """After a write of ``sent`` bytes from ``buffers[first:]``: the first one not fully
    sent (its sent part cut off), or ``len(buffers)``."""
    while first < len(buffers) and sent >= len(buffers[first]):
        sent -= len(buffers[first])
        first += 1
    if sent:
        buffers[first] = memoryview(buffers[first])[sent:]
    return first


def _take_plaintext(buffers: list, first: int, limit: int) -> tuple:
    """Up to ``limit`` bytes from ``buffers[first:]`` as one buffer (joined only if they
    are several), and the index of the first buffer not wholly taken (see _skip_sent)."""
    end, size = first, 0
    while end < len(buffers) and size < limit:
        size += len(buffers[end])
        end += 1
    data = buffers[first] if end - first == 1 else b"".join(buffers[first:end])
    if size > limit:
        data = memoryview(data)[:limit]
    return data, _skip_sent(buffers, first, min(size, limit))


def _unacked_bytes(sock: socket.socket) -> int:
    """Bytes sent on a TCP socket that the peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0   # closed or not a TCP socket: nothing we can still deliver


def set_kernel_timeouts(sock: socket.socket, config: Config) -> None:
    """Give a new socket its usual kernel timeouts: ``idle_timeout`` and ``write_timeout``.

    The server calls this on its accepting thread, so that a handler thread whose
    connection only ever waits with these never calls ``setsockopt`` with a
    buffer. CPython's ``setsockopt`` first tries to parse the value as an integer
    and formats an error message when it is not; that formatting goes a page
    deeper into the C stack than anything else the thread does, and a touched
    stack page stays resident: 4 KiB more RSS per idle connection.
    """
    for option, seconds in ((socket.SO_RCVTIMEO, config.idle_timeout),
                            (socket.SO_SNDTIMEO, config.write_timeout)):
        sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))


def _timeval(seconds: float) -> bytes:
    """A kernel timeval for ``seconds``, never zero (zero means "no timeout")."""
    micros = max(1, int(seconds * 1_000_000))
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)


def format_peer(peer: object) -> str:
    """``host:port`` (``[v6]:port`` for IPv6), or the Unix socket path."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peer, (bytes, str)):
        return (peer.decode(errors="replace") if isinstance(peer, bytes) else peer) or "unix"
    return str(peer)

