"""Parked connections: message handlers served without a thread while they wait.

A message handler (``FramedHandler``, ``LineHandler``) only needs a thread
while it handles a message. Parked (``Config.park``), its connection waits
between messages in one epoll set, holding no thread and no buffer; a small
pool of threads (``Config.park_threads``) all wait in that epoll with one-shot
registrations, so the kernel hands each ready connection to exactly one of
them and no dispatcher hands work over (leader/followers). The thread that
wakes reads what has arrived without blocking, feeds the handler's codec,
calls ``handle_frame``/``handle_line`` for each complete message (ordinary
blocking Python), sends the replies without waiting (the rest queues, bounded,
until the socket is writable) and parks the connection again.

Pool threads never wait on a peer: a partial message stays parked with its
absolute read deadline; a queued reply with its write deadline; idle, read,
write and lifetime deadlines are one lazily moved entry per connection in the
watchdog's heap. An end waits parked too: its goodbye and the replies still
queued go out as the socket takes them, then a lingering close (closing.py)
discards input as it comes while the watchdog looks at the acknowledgements
(1 to 50 ms apart, as a thread would), until ``linger_timeout``. Only a hub
subscriber's end, which must take its queue back from the hub's writer, is
handed to a handler thread. When the watchdog hands a connection back to the
pool whatever its socket's state (a rate wait over, a linger done), it queues
it and wakes a pool thread through a socket pair ("kicked"). New connections go straight
from the accept thread into the epoll: a burst starts no thread per connection.

A PROXY header and a TLS handshake are parked too: each readiness event takes
them a step further (:class:`~connserver.core.preamble.PreambleSteps`), all of
it due within ``handshake_timeout``, and ``setup()`` runs once they are done.

Over a rate limit with ``on_rate_limit="wait"``, a connection waits parked
too: the frames it may not handle yet stay with its handler, its socket is not
read (TCP pushes back on the client, as in thread mode), and the watchdog hands
it back to the pool when the tokens are there.

What is not parked, and runs in thread mode as before (the server logs why at
start-up): ``max_running`` and handler classes that override ``handle()``.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import select
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..config import Config
from ..errors import CloseReason
from .cancel import CancelToken, Watchdog
from .faults import Faults
from .handler import MessageHandler
from .outcome import classify_failure
from .parked_ending import READ, WRITE, Ending, ParkedEnds
from .preamble import PreambleSteps
from .stats import ServerStats
from .threads import block_async_signals

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["ParkingLot", "why_not_parked"]

log = logging.getLogger("connserver.server")

_HANGUP = select.EPOLLRDHUP | select.EPOLLONESHOT   # the peer's FIN, or ours: a cancellation
_READS_PER_WAKE = 4   # chunks read per wake-up before others get a turn
_EXPIRED = {"handshake": CloseReason.HANDSHAKE_DEADLINE, "write": CloseReason.WRITE_DEADLINE,
            "read": CloseReason.READ_DEADLINE, "idle": CloseReason.IDLE}


def why_not_parked(config: Config, handler_class: type) -> str | None:
    """Why connections of ``handler_class`` cannot be parked under ``config`` (None: they can)."""
    if not (isinstance(handler_class, type) and issubclass(handler_class, MessageHandler)):
        return "only message handlers (FramedHandler, LineHandler) can be parked"
    if handler_class.handle is not MessageHandler.handle:
        return f"{handler_class.__name__} overrides handle()"
    if config.max_running:
        return "max_running is not parked"
    return None


class _Parked:
    """One parked connection: its handler, and the deadlines the watchdog checks."""

    __slots__ = ("conn", "handler", "preamble", "accounted_ip", "idle_expires_at",
                 "lifetime_expires_at", "serving", "started", "cancel_token", "scheduled_at",
                 "rate_waiting", "ending", "__weakref__")

    def __init__(self, conn: "Connection", preamble: PreambleSteps, accounted_ip: str | None,
                 lifetime_expires_at: float | None) -> None:
        self.conn = conn
        self.handler: Any = None             # made once the preamble is done
        self.preamble: PreambleSteps | None = preamble
        self.accounted_ip = accounted_ip
        self.idle_expires_at = conn.created_at + conn.config.idle_timeout
        self.lifetime_expires_at = lifetime_expires_at
        self.serving = False
        self.started = False
        self.cancel_token: CancelToken = conn.cancel_token   # what the watchdog cancels
        self.scheduled_at: float | None = None   # when the watchdog looks next
        self.rate_waiting = False   # parked for a rate limit (the lot's lock guards it)
        self.ending: Ending | None = None   # set once, when its end begins

    def abort(self, force: bool = False) -> bool:
        return self.conn.abort(force)

    @property
    def operation(self) -> str | None:
        return self.conn.operation

    def next_deadline(self, stats: ServerStats | None = None) -> float | None:
        """On the watchdog's thread: cancel if a deadline has passed, else when to look again."""
        self.scheduled_at = at = self._next_deadline(stats)
        return at

    def waiting_for(self) -> tuple[str, float]:
        """The phase this parked connection is in, and when it must end."""
        conn = self.conn
        if self.preamble is not None:
            return "handshake", self.preamble.expires_at
        if self.handler.rate_resume_at is not None:
            return "rate_wait", self.handler.rate_resume_at
        if conn.out_expires_at is not None:
            return "write", conn.out_expires_at
        timer = self.handler.next_timer()
        handler_at = self.handler.message_expires_at
        message_at = min(filter(None, (handler_at, conn.record_expires_at)), default=None)
        if message_at is not None:
            if timer is not None and timer < message_at:
                return "timer", timer
            return ("read" if message_at != handler_at else self.handler.message_phase,
                    message_at)
        if timer is not None and timer < self.idle_expires_at:
            return "timer", timer
        return "idle", self.idle_expires_at

    def _next_deadline(self, stats: ServerStats | None) -> float | None:
        conn = self.conn
        now = conn.clock()
        lifetime = self.lifetime_expires_at
        if lifetime is not None and now >= lifetime:
            self.cancel_token.cancel(CloseReason.LIFETIME)
            return None
        if self.serving:   # handler code is running: its deadlines apply after it parks
            due = now + conn.config.idle_timeout
        else:
            phase, due = self.waiting_for()
            if phase in ("rate_wait", "timer"):   # not deadlines: the lot kicks it (_look)
                if due <= now:
                    due = now + conn.config.idle_timeout
            elif now >= due:
                if stats is not None:
                    stats.count_deadline(phase)
                self.cancel_token.cancel(_EXPIRED[phase])
                return None
        return due if lifetime is None else min(due, lifetime)


class ParkingLot(ParkedEnds):
    """The epoll set and the threads that serve parked connections (see the module docstring).

    The server supplies what a connection's life needs: ``open_connection(sock,
    address)`` (registered, not yet served), ``begin(conn)`` (its preamble's
    steps), ``end_connection(conn, reason, accounted_ip)`` (close, clean up,
    count), ``start_handler(conn)`` (the parked handler instance, once the
    preamble is done) and ``hand_off(callable)`` (run it on a handler thread,
    for ends that may wait).
    """

    def __init__(self, config: Config, watchdog: Watchdog, stats: ServerStats, *,
                 open_connection: Callable[[socket.socket, Any], "Connection"],
                 begin: Callable[["Connection"], PreambleSteps],
                 start_handler: Callable[["Connection"], Any],
                 end_connection: Callable[["Connection", CloseReason, str | None], None],
                 hand_off: Callable[[Callable[[], None]], None],
                 linger_timeout: Callable[[], float], name_prefix: str) -> None:
        self.config = config
        self._watchdog = watchdog
        self._stats = stats
        self._open_connection = open_connection
        self._begin = begin
        self._start_handler = start_handler
        self._end_connection = end_connection
        self._hand_off = hand_off
        self._linger_timeout = linger_timeout
        self._prefix = name_prefix
        self.faults = Faults("park", log, stats.internal_error)
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)   # level: wakes all
        # Connections the watchdog hands back to the pool whatever their socket's state
        # (a rate wait over, a lingering close done): queued, announced on this pair.
        self._kicked: collections.deque[_Parked] = collections.deque()
        self._kick_r, self._kick_w = socket.socketpair()
        self._kick_r.setblocking(False)
        self._kick_w.setblocking(False)
        self._epoll.register(self._kick_r.fileno(), select.EPOLLIN)
        self._parked: dict[int, _Parked] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        if self._threads:
            return
        for index in range(self.config.park_threads):
            thread = threading.Thread(target=self._run, name=f"{self._prefix}-park-{index + 1}")
            self._threads.append(thread)
            thread.start()

    def __len__(self) -> int:
        return len(self._parked)

    def admit(self, job: tuple[socket.socket, Any, str | None]) -> None:
        """A new connection, from the accept thread: into the epoll at once, no thread.

        Registered for writability, so a pool thread runs its ``setup()`` (which
        may send a greeting) straight away, then parks it for input; or, if the
        peer speaks first (a PROXY header, a TLS ClientHello), for input.
        """
        sock, address, accounted_ip = job
        conn = self._open_connection(sock, address)
        parked = None
        try:
            preamble = self._begin(conn)
            lifetime = self.config.max_lifetime
            if lifetime is not None:   # shortened at random, as in thread mode
                lifetime = conn.created_at + lifetime * (
                    1.0 - random.uniform(0.0, self.config.lifetime_jitter))
            parked = _Parked(conn, preamble, accounted_ip, lifetime)
            # In place of the server's callback (which only wakes the socket): same cost.
            conn.cancel_token.on_cancel(functools.partial(self._cancelled, parked))
            with self._lock:
                self._parked[conn.fileno()] = parked
            self._watch(parked, parked.next_deadline())
            self._epoll.register(conn.fileno(), READ if preamble.waits_for_peer else WRITE)
        except BaseException as exc:
            if parked is not None:
                self._forget(parked)
            self._end(conn, classify_failure(conn, exc), accounted_ip)

    def stop(self, timeout: float) -> list[threading.Thread]:
        """Stop the pool threads (after the connections ended); return those still alive."""
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        alive = []
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(timeout)
            if thread.is_alive():
                alive.append(thread)
        if not alive:
            self._epoll.close()
            for sock in (self._wake_r, self._wake_w, self._kick_r, self._kick_w):
                sock.close()
        return alive

    # --- the pool threads ---------------------------------------------------------

    def _run(self) -> None:
        block_async_signals()
        wake_fd = self._wake_r.fileno()
        kick_fd = self._kick_r.fileno()
        while not self._stopping:
            try:
                events = self._epoll.poll(-1, 1)
            except OSError:
                if self._stopping:
                    return
                raise
            for fd, mask in events:
                if fd == wake_fd:
                    continue
                if fd == kick_fd:
                    self._serve_kicked()
                    continue
                parked = self._parked.get(fd)
                if parked is None:
                    continue
                self._serve_safely(parked, mask)

    def _serve_kicked(self) -> None:
        try:
            while self._kick_r.recv(4096):
                pass
        except OSError:
            pass   # drained (BlockingIOError), or closing
        while True:
            with self._lock:
                if not self._kicked:
                    return
                parked = self._kicked.popleft()
                if self._parked.get(parked.conn.fileno()) is not parked:
                    continue   # ended meanwhile
            self._serve_safely(parked, 0)

    def _kick(self, parked: _Parked) -> None:
        """From the watchdog: have a pool thread serve ``parked`` now (mask 0)."""
        with self._lock:
            self._kicked.append(parked)
        try:
            self._kick_w.send(b"\0")
        except OSError:
            pass   # full (a wake is due anyway) or closing

    def _serve_safely(self, parked: _Parked, mask: int) -> None:
        try:
            self._serve(parked, mask)
        except Exception as exc:   # a bug here ends that connection, not the thread
            self.faults.record(exc, f"serving #{parked.conn.id}")
            if parked.ending is None:
                self._finish(parked, CloseReason.ERROR)
            else:   # the bug was in its end: end it without more ado
                self._forget(parked)
                self._end(parked.conn, CloseReason.ERROR, parked.accounted_ip)

    def _serve(self, parked: _Parked, mask: int) -> None:
        """Serve a ready (or, mask 0, kicked) connection, then park or end it."""
        conn = parked.conn
        reads = 0
        resumed = False
        with self._lock:
            if parked.serving:
                return   # another thread has it, and arms it again when done
            if parked.rate_waiting:
                if mask and not conn.cancel_token.cancelled:
                    return   # a hangup while waiting for tokens: the watchdog kicks it
                parked.rate_waiting = False
            parked.serving = True
        if parked.ending is not None:
            return self._close(parked)
        conn.mark_parked(None)
        try:
            if parked.preamble is not None:
                if conn.cancel_token.cancelled:
                    return self._finish(parked, conn.cancel_token.reason)
                if mask & select.EPOLLOUT and not conn.flush_parked():
                    return self._park(parked)
                if not parked.preamble.advance():
                    return self._park(parked)
                parked.accounted_ip = parked.preamble.accounted_ip or parked.accounted_ip
                parked.preamble = None
                parked.handler = self._start_handler(conn)
                mask |= select.EPOLLIN   # what came with the handshake's end is read now
            handler = parked.handler
            if not parked.started:
                parked.started = True
                handler.setup()
            if conn.cancel_token.cancelled:
                return self._finish(parked, conn.cancel_token.reason)
            if mask & select.EPOLLOUT and not conn.flush_parked():
                return self._park(parked)
            timer = handler.next_timer()
            if timer is not None and conn.clock() >= timer and handler.rate_resume_at is None:
                handler.on_timer()
            if handler.rate_resume_at is not None:   # back from a rate limit's wait
                resumed = True
                if not handler.resume_held():
                    reason = conn.cancel_token.reason or conn.outcome or CloseReason.CLOSED
                    return self._finish(parked, reason)
                if handler.rate_resume_at is not None:
                    return self._park_for_rate(parked)
                mask |= select.EPOLLIN   # input was left unread meanwhile
            if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                # A few socket reads, then what they left in a TLS session. A short read
                # took all there was: no second read to learn so from an exception (if
                # more comes meanwhile, arming the connection again reports it).
                while True:
                    data = conn.recv_nowait(from_socket=reads < _READS_PER_WAKE and not (
                        reads and conn.input_drained))
                    if data is None:
                        break
                    reads += 1
                    if not handler.feed(data):
                        reason = conn.cancel_token.reason or conn.outcome or CloseReason.CLOSED
                        return self._finish(parked, reason)
                    if conn.cancel_token.cancelled:
                        return self._finish(parked, conn.cancel_token.reason)
                    if handler.rate_resume_at is not None:
                        return self._park_for_rate(parked)
        except BaseException as exc:
            return self._finish(parked, classify_failure(conn, exc))
        if reads or resumed:   # only the peer's input, not a timer or a kick, restarts idle
            parked.idle_expires_at = conn.clock() + self.config.idle_timeout
        self._park(parked)

    def _park(self, parked: _Parked) -> None:
        parked.serving = False
        conn = parked.conn
        # Deadlines move later lazily (the watchdog looks, finds a later one, looks again
        # then); one that moved earlier (a message begun, a reply queued) is rescheduled.
        _, due = parked.waiting_for()
        lifetime = parked.lifetime_expires_at
        if lifetime is not None and lifetime < due:
            due = lifetime
        if parked.scheduled_at is None or due < parked.scheduled_at:
            parked.scheduled_at = due
            self._watch(parked, due)
        conn.mark_parked(min(due, parked.idle_expires_at),
                         "parked" if parked.preamble is None else "handshake")
        events = READ | (select.EPOLLOUT if conn.parked_output_waiting else 0)
        try:
            self._epoll.modify(conn.fileno(), events)
        except OSError as exc:   # gone from the set: it is being ended elsewhere
            self.faults.record(exc, f"parking #{conn.id}")

    def _park_for_rate(self, parked: _Parked) -> None:
        """Over a rate limit: wait for the tokens with the socket unread (TCP pushes back),
        only a hangup armed, until the watchdog hands it back (``_look``). A hangup does
        not end the wait (a half-closed peer still wants its replies) and is not armed
        again (it would be reported at once, again and again): a cancellation kicks
        the connection instead (``_cancelled``)."""
        conn = parked.conn
        resume_at = parked.handler.rate_resume_at
        with self._lock:
            parked.serving = False
            parked.rate_waiting = True
            conn.mark_parked(resume_at, "rate_wait")
            try:
                self._epoll.modify(conn.fileno(), _HANGUP)
            except OSError as exc:
                self.faults.record(exc, f"parking #{conn.id}")
        if conn.cancel_token.cancelled:   # cancelled while it was served: _cancelled missed it
            self._kick(parked)
        if parked.scheduled_at is None or resume_at < parked.scheduled_at:
            parked.scheduled_at = resume_at
            self._watch(parked, resume_at)

    def _cancelled(self, parked: _Parked) -> None:
        """The cancel token's callback (any thread): the watchdog shuts the read side,
        which the events armed for a parked connection report, as for any connection;
        and a rate wait, whose one armed event (a hangup) may be spent already, is kicked."""
        self._watchdog.abort_soon(parked.conn)
        if parked.rate_waiting:
            self._kick(parked)

    def _watch(self, parked: _Parked, at: float | None) -> None:
        self._watchdog.watch(parked, at, functools.partial(self._look, parked))

    def _look(self, parked: _Parked) -> float | None:
        """On the watchdog's thread, when a parked connection's next time comes: a rate
        wait that is over goes back to the pool (kicked); a passed deadline cancels;
        otherwise, when to look again."""
        if parked.ending is not None:
            return None   # its end's looks are the Ending's (see parked_ending.py)
        if parked.rate_waiting:
            resume_at = parked.handler.rate_resume_at
            if resume_at is not None and parked.conn.clock() >= resume_at:
                self._kick(parked)
        elif parked.handler is not None and parked.ending is None and not parked.serving:
            timer = parked.handler.next_timer()
            if timer is not None and parked.conn.clock() >= timer:
                self._kick(parked)
        return parked.next_deadline(self._stats)

    def _forget(self, parked: _Parked) -> None:
        """Out of the lot: no more events, no more watchdog looks."""
        conn = parked.conn
        with self._lock:
            self._parked.pop(conn.fileno(), None)
        try:
            self._epoll.unregister(conn.fileno())
        except (OSError, ValueError):
            pass
        self._watchdog.unwatch(parked)
        if parked.ending is not None:
            self._watchdog.unwatch(parked.ending)

    def _end(self, conn: "Connection", reason: CloseReason, accounted_ip: str | None) -> None:
        """Close (its lingering done already, parked), clean up, count."""
        self._end_connection(conn, reason, accounted_ip, lingered=True)
