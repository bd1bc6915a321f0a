"""Connection: the one place that does socket I/O, always under a deadline.

Deadlines reach the kernel as ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` on a blocking
socket, set only when they change (:mod:`connserver.deadline`): waiting for the
next message uses the constant ``idle_timeout``; a message in progress and
every write get what is left of their absolute deadline, so a peer trickling
a byte at a time cannot stretch it. Writes, TLS, parked I/O and the waits of
set-up protocols and timers live in parts of the class of their own
(``connection_writing``, ``connection_tls``, ``connection_parked``,
``connection_waits``).

Ownership. Only this class touches the socket: handlers, the PROXY preamble
(:meth:`Connection.peek`), a hub's writer (``send_nowait``) and the admin views
(:meth:`Connection.info`) go through its methods. Only the owning handler
thread calls ``close``; other threads (the watchdog) call ``abort``, which shuts
the socket down under the same lock, so a shutdown never hits a reused fd
number. Concerns owned elsewhere are small objects it holds: its ``RunSlot``,
its ``RateMeter`` and, while attached, a write sink (a hub subscription).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Iterator, NoReturn

from .addresses import format_peer
from .buffers import BufferLease, BufferPool, LeaseAccount
from .cancel import CancelToken
from .closing import Answer, linger, unacked_payload
from ..config import Config
from .connection_tls import TLSConnectionIO
from .connection_parked import ParkedIO
from .connection_waits import WaitingIO
from .connection_writing import WriteSink, WritingIO
from .deadline import Clock, Deadline, KernelTimeouts, monotonic
from ..errors import (Cancelled, CloseReason, ConnectionBroken, ConnServerError, DeadlineExceeded,
                     RateLimited, RemoteProtocolError)
from .stats import ConnectionInfo
from ..protocols.tls import TLSSession

if TYPE_CHECKING:
    from ..protocols.framing import Codec
    from .rate_limits import RateMeter
    from .run_slots import RunSlot
    from .stats import ServerStats

__all__ = ["Connection", "ConnectionInfo", "WriteSink"]   # (ConnectionInfo: see stats)

_DONTWAIT = socket.MSG_DONTWAIT
# A blocking recv asks for about the size of recent messages, between these:
# small enough that an idle connection waits holding next to nothing.
_HINT_MIN = 256
_HINT_MAX = 16384


class Connection(WritingIO, TLSConnectionIO, ParkedIO, WaitingIO):
    """A connected socket with deadline-bounded, cancel-aware I/O.

    Methods for the handler: :meth:`recv`, :meth:`recv_exactly`, :meth:`sendall`,
    :meth:`send_frame`, :meth:`deadline`, :meth:`lease`, :meth:`send_goodbye`.
    Read-only attributes: ``id``, ``peer``, ``bytes_received``, ``bytes_sent``,
    ``bytes_unacked``, ``close_reason`` (set once it ended), ``tls``.
    """

    # Slots: more than 30 attributes would make every instance carry a full dict of its own
    # (CPython shares dict keys only up to 30), about 1 KiB per idle connection. ``__dict__``
    # stays available for attributes a subclass or handler adds.
    __slots__ = ("id", "peer", "peer_label", "config", "cancel_token", "clock", "_sock",
                 "_fileno", "_pool", "_stats", "_close_lock", "_closed", "_idle_timeout",
                 "_read_timeout", "_write_timeout", "_buffer_size", "_timeouts",
                 "_unit_expires_at", "_op_expires_at", "leases", "_recv_hint", "_pending_error",
                 "run_slot", "rate", "thread_ident", "created_at", "bytes_received",
                 "bytes_sent", "bytes_unacked", "operation", "outcome", "close_reason", "codec",
                 "_write_sink", "handler", "tls", "_read_shut", "_forced", "_cancel_raised",
                 "_parked_out", "_parked_out_bytes", "_max_parked_out", "out_expires_at",
                 "input_drained",
                 "__dict__", "__weakref__")

    def __init__(self, sock: socket.socket, peer: object, *, id: int, config: Config,
                 pool: BufferPool, cancel_token: CancelToken | None = None,
                 stats: "ServerStats | None" = None, clock: Clock = monotonic,
                 kernel_timeouts_set: bool = False, run_slot: "RunSlot | None" = None) -> None:
        self.id = id
        self.peer = peer
        self.peer_label = format_peer(peer)
        self.config = config
        self.cancel_token = cancel_token if cancel_token is not None else CancelToken()
        self.clock = clock
        self._sock = sock
        self._fileno = sock.fileno()
        self._pool = pool
        self._stats = stats
        self._close_lock = threading.Lock()
        self._closed = False
        self._idle_timeout = config.idle_timeout
        self._read_timeout = config.read_timeout
        self._write_timeout = config.write_timeout
        self._buffer_size = pool.buffer_size
        # kernel_timeouts_set: the server already gave the socket set_kernel_timeouts().
        self._timeouts = (KernelTimeouts(sock, config.idle_timeout, config.write_timeout)
                          if kernel_timeouts_set else KernelTimeouts(sock))
        self._unit_expires_at: float | None = None   # a deadline() block's
        self._op_expires_at: float | None = None     # the blocking call's, for info()
        self.leases = LeaseAccount()
        self._recv_hint = _HINT_MIN   # how much the next blocking recv asks for
        self._pending_error: OSError | None = None   # a read error behind returned data
        self.run_slot = run_slot   # its place at the server's run gate (Config.max_running)
        self.rate: RateMeter | None = None   # see limit_rate()
        self.thread_ident = threading.get_ident()   # the owning handler thread
        self.created_at = clock()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.bytes_unacked = 0       # sent, but not acknowledged by the peer when closed
        self.operation: str | None = None
        self.outcome: CloseReason | None = None   # what the I/O itself saw: eof, reset, a deadline
        self.close_reason: CloseReason | None = None
        self.codec: Codec | None = None   # set by FramedHandler / LineHandler
        self._write_sink: WriteSink | None = None
        self.handler: object = None   # the Handler serving it (attach_handler)
        self.tls: TLSSession | None = None   # set by start_tls(); TLS changes how I/O is done
        self._read_shut = False      # abort() shut the read side (the watchdog woke a reader)
        self._forced = False         # abort(force=True): both sides shut, writes fail now
        self._cancel_raised = False  # Cancelled was raised to the handler at least once
        self._parked_out: list | None = None   # parked mode: replies the kernel did not take yet
        self._parked_out_bytes = self._max_parked_out = 0
        self.out_expires_at: float | None = None   # parked: when those must be taken by
        self.input_drained = False   # parked: the last read was short (nothing more waited)
        sock.setblocking(True)

    # --- set-up, by the server and the handler bases ----------------------------

    def attach_handler(self, handler: object) -> None:
        """The Handler serving this connection (told ``connection_closed`` at the end)."""
        self.handler = handler

    def limit_rate(self, meter: "RateMeter | None") -> None:
        """Charge this connection's traffic to ``meter``'s buckets (None: no limits)."""
        self.rate = meter if meter is not None and meter.buckets else None

    def set_rate_unit(self, unit: str) -> None:
        """What a raw read is charged as: ``"bytes"``, or ``"messages"`` (message handlers
        charge each complete message themselves, with :meth:`charge`)."""
        if self.rate is not None:
            self.rate.unit = unit

    def set_peer(self, peer: object) -> None:
        """The client's real address, learned from a PROXY header."""
        self.peer = peer
        self.peer_label = format_peer(peer)

    def fileno(self) -> int:
        return self._fileno

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

    def recv_part(self, message_expires_at: float | None, phase: str = "read") -> bytes:
        """Receive what is available of a message whose deadline is ``message_expires_at``.

        For framing loops: ``None`` means no message has started (the idle timeout
        applies); otherwise the absolute deadline (on the connection's clock) that
        the message's first byte started, counted as ``phase`` when it passes
        (``"handshake"`` for a protocol's opening exchange).
        """
        return self._recv_copy(self._buffer_size, message_expires_at, phase)

    def _recv_copy(self, limit: int, message_expires_at: float | None,
                   message_phase: str = "read") -> bytes:
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
            phase = self._arm_idle()
        else:
            phase = self._arm_recv(message_expires_at, message_phase)
        slot = self.run_slot
        if slot is not None and slot.held:
            slot.leave()
        if self.tls:
            data = self._tls_recv(limit, message_expires_at, phase)
        else:
            want = self._recv_hint if self._recv_hint < limit else limit
            try:
                if self._pending_error is not None:
                    raise self._pending_error   # seen after the last call's data
                data = self._sock.recv(want)
            except OSError as exc:
                self._io_failed(exc, phase)
            finally:
                self.operation = None
            if len(data) == want and want < limit:
                data = self._recv_into_pool(data, limit)
            self._adapt_hint(want, len(data))
        if not data:
            self._saw_eof()
            return data
        if slot is not None:
            slot.enter_if_engaged()
        self.bytes_received += len(data)
        self.outcome = None   # a handler that recovered from a deadline is not judged by it
        rate = self.rate
        if rate is not None and rate.unit == "bytes":
            self.charge(len(data))
        return data

    def _adapt_hint(self, asked: int, received: int) -> None:
        if received >= asked:
            # Next time ask for the next power of two above what came, so a
            # message of the same size fits in one call.
            self._recv_hint = min(_HINT_MAX, max(_HINT_MIN, 1 << received.bit_length()))
        elif received <= asked >> 3 and asked > _HINT_MIN:
            self._recv_hint = asked >> 1   # messages got small again: let the idle wait shrink

    def _recv_into_pool(self, prefix: bytes, limit: int) -> bytes:
        """``prefix`` plus whatever more is readable now, up to ``limit`` bytes in all."""
        pool = self._pool
        buffer = pool.acquire()
        try:
            start = len(prefix)
            with memoryview(buffer) as view:
                view[:start] = prefix
                try:
                    more = self._sock.recv_into(view[start:limit], limit - start, _DONTWAIT)
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
        rate = self.rate
        if rate is not None and rate.unit == "bytes":
            self.charge(size - len(head))   # the first part was charged as it came
        return message

    def _fill(self, buffer: bytearray, received: int, size: int) -> bytes:
        """Read the rest of a message that has begun, under its absolute read deadline."""
        if self.tls:
            return self._tls_fill(buffer, received, size)
        message_expires_at = self.clock() + self._read_timeout
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

    # --- arming the kernel's timeouts ----------------------------------------------

    def _arm_idle(self) -> str:
        """Waiting for a new message: the constant idle timeout, usually already set."""
        self.operation = "idle"
        self._op_expires_at = self.clock() + self._idle_timeout
        if self._timeouts.recv != self._idle_timeout:
            try:
                self._timeouts.set_recv(self._idle_timeout)
            except OSError as exc:
                self._io_failed(exc, "idle")
        return "idle"

    def _arm_recv(self, message_expires_at: float | None, phase: str = "read") -> str:
        """Set the kernel receive timeout for the next call; return the phase it bounds."""
        expires_at = self._unit_expires_at
        if message_expires_at is not None and (expires_at is None or message_expires_at < expires_at):
            expires_at = message_expires_at
        assert expires_at is not None   # the idle wait without one is _arm_idle
        remaining = expires_at - self.clock()
        if message_expires_at is None and remaining > self._idle_timeout:
            remaining, phase = self._idle_timeout, "idle"
        self.operation = phase
        self._op_expires_at = expires_at
        if remaining <= 0:
            self._deadline_exceeded(phase)
        try:
            self._timeouts.bound_recv(remaining)
        except OSError as exc:
            self._io_failed(exc, phase)
        return phase

    def _bound_wait(self, option: int, expires_at: float, phase: str) -> None:
        """The next receive (or send) waits until ``expires_at`` at most."""
        remaining = expires_at - self.clock()
        if remaining <= 0:
            self._deadline_exceeded(phase)
        try:
            if option == socket.SO_RCVTIMEO:
                self._timeouts.bound_recv(remaining)
            else:
                self._timeouts.bound_send(remaining)
        except OSError as exc:
            self._io_failed(exc, phase)

    # --- deadlines, leases, rate limits -------------------------------------------

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[Deadline]:
        """Bound everything inside the block to ``seconds`` from now (nesting narrows)."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        previous = self._unit_expires_at
        expires_at = self.clock() + seconds
        if previous is not None and previous < expires_at:
            expires_at = previous
        self._unit_expires_at = expires_at
        try:
            yield Deadline.at(expires_at, self.clock)
        finally:
            self._unit_expires_at = previous

    def charge(self, amount: float = 1) -> None:
        """Take ``amount`` (bytes or messages) from every rate limiter of this connection.

        With ``on_rate_limit="wait"`` this blocks (cancel-aware) until the tokens are
        there, and since nothing is read meanwhile, TCP pushes back on the client;
        with ``"close"`` it raises :class:`~connserver.RateLimited` instead.
        """
        if self.rate is None:
            return
        try:
            self.rate.charge(amount, self)
        except RateLimited:
            self.outcome = CloseReason.RATE_LIMITED
            raise

    @contextlib.contextmanager
    def waiting(self, operation: str) -> Iterator[None]:
        """Around a wait that is not socket I/O (a rate limit): shown as ``operation``
        in :meth:`info`, and never holding a run slot."""
        self.operation = operation
        try:
            with self._slot_released():
                yield
        finally:
            self.operation = None

    def lease(self) -> BufferLease:
        """Lease a pooled buffer for this connection; it must be released before the end."""
        return self._pool.lease(self.leases, stacklevel=2)

    def _slot_released(self) -> contextlib.AbstractContextManager:
        """Around a wait: give the run slot back, and take one again if it went well."""
        slot = self.run_slot
        return _NO_SLOT if slot is None else slot.released()

    # --- failure paths ---------------------------------------------------------

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
            self._deadline_exceeded(phase)   # the kernel's SO_RCVTIMEO / SO_SNDTIMEO fired
        # The kernel's ETIMEDOUT (a TimeoutError) means keepalive or retransmission
        # gave up on a vanished peer: that is a broken connection, not a deadline.
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
                self._sock.shutdown(socket.SHUT_RDWR if force else socket.SHUT_RD)
            except OSError:
                pass   # already disconnected: the blocked call has returned anyway
        return not force and self.operation == "write"

    def close(self, linger_timeout: float = 0.0, reason: CloseReason | None = None,
              answer: Answer | None = None) -> None:
        """Close the socket (owner thread only; idempotent), recording ``reason``.

        With ``linger_timeout`` (seconds), first wait up to that long for the peer
        to acknowledge what was sent (:func:`connserver.closing.linger`). Whatever it
        has not acknowledged by then is counted in ``bytes_unacked``: it may never
        arrive. ``answer``: the peer's answer to our goodbye, waited for too (over TLS,
        given the plaintext: :meth:`plaintext_answer`).
        """
        slot = self.run_slot
        if slot is not None:
            slot.leave()
        if not self._closed:
            tcp = self._sock.family in (socket.AF_INET, socket.AF_INET6)
            if self.tls and not tcp:
                self._tls_close_notify()
            if tcp:
                self.operation = "linger"
                try:   # over TLS, close_notify goes once the peer's answer came
                    linger(self._sock, linger_timeout, read_shut=self._read_shut,
                           forced=lambda: self._forced, answer=self.plaintext_answer(answer),
                           end_stream=self._tls_close_notify if self.tls else None)
                finally:
                    self.operation = None
            with self._close_lock:
                if not self._closed:
                    self._closed = True
                    if tcp:   # forced too: what the kernel still holds may never arrive
                        unacked = unacked_payload(self._sock)
                        if self.tls:   # the kernel counts ciphertext: count what it carries
                            unacked = min(self.tls.unacked_plaintext(unacked), self.bytes_sent)
                        self.bytes_unacked = unacked
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self._sock.close()
        if reason is not None and self.close_reason is None:
            self.close_reason = reason

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def read_shut(self) -> bool:
        """``abort()`` shut the read side: a read's end of stream is not the peer's."""
        return self._read_shut

    @property
    def socket(self) -> socket.socket:
        """The raw socket, for options only; do I/O through the connection's methods."""
        return self._sock

    def info(self) -> ConnectionInfo:
        now = self.clock()
        expires_at = self._op_expires_at if self.operation else None
        remaining = None if expires_at is None else max(0.0, expires_at - now)
        return ConnectionInfo(
            id=self.id, peer=self.peer_label, age=now - self.created_at,
            bytes_in=self.bytes_received, bytes_out=self.bytes_sent,
            operation=self.operation, deadline_remaining=remaining,
            leases=self.leases.outstanding, queue_bytes=self.queue_bytes,
            latency=getattr(self.handler, "latency", None))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Connection #{self.id} {self.peer_label} {state}>"


_NO_SLOT = contextlib.nullcontext()
