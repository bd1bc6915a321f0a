"""A parked connection's end, with no thread: goodbye, queued replies, lingering close.

Part of :class:`~connserver.core.parking.ParkingLot` (a mixin with no state of
its own). Thread mode ends a connection on its thread: the goodbye and the
replies in hand are sent under their timeouts, then ``close()`` lingers while
the peer has not acknowledged what was sent (:mod:`connserver.core.closing`).
Parked, the same steps wait parked: what the socket does not take goes out as it
becomes writable; the lingering close discards input as it arrives, and the
watchdog looks at the acknowledgements (1 to 50 ms apart, doubling, as a
lingering thread would), then kicks the connection back to the pool to end it.
A handler's ``closing_answer()`` (a WebSocket's awaited close frame) is handed
the input instead, and the linger also lasts until it is complete.
Only a hub subscriber's end, which must take its queue back from the hub's
writer (which may wait), goes to a handler thread.
"""

from __future__ import annotations

import functools
import select
import socket
import threading
from typing import Any, Callable

from ..config import Config
from ..errors import Cancelled, CloseReason, ConnServerError
from .cancel import Watchdog
from .closing import Answer, connection_gone, discard_input, unacked_bytes
from .faults import Faults
from .outcome import classify_failure

__all__ = ["Ending", "ParkedEnds", "NO_GOODBYE", "READ", "UNDELIVERABLE", "WRITE"]

# One-shot registrations: each readiness event goes to one pool thread, which arms
# the connection again when it parks it.
READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
WRITE = select.EPOLLOUT | select.EPOLLONESHOT

_FIRST_LOOK, _LAST_LOOK = 0.001, 0.05   # looks at the acknowledgements, as closing.py

# Ends after which no goodbye is sent (as in thread mode, where only Cancelled gets one),
# and after which queued replies cannot reach the peer.
NO_GOODBYE = frozenset({CloseReason.IDLE, CloseReason.READ_DEADLINE, CloseReason.WRITE_DEADLINE,
                         CloseReason.SLOW_CONSUMER, CloseReason.RESET})
UNDELIVERABLE = frozenset({CloseReason.WRITE_DEADLINE, CloseReason.SLOW_CONSUMER,
                            CloseReason.RESET})


class Ending:
    """A parked connection's end in progress: why, and until when it may linger.

    Also the watchdog's target for the looks at the acknowledgements: the watchdog
    keeps one entry per target, and the connection's own (its deadlines, ``_look``)
    may be set again by a look under way as the end begins; under one target, that
    would replace the linger's looks, and nothing would end the connection.
    """

    __slots__ = ("reason", "expires_at", "write_shut", "answer", "answer_expires_at", "_interval")

    def __init__(self, reason: CloseReason, expires_at: float) -> None:
        self.reason = reason
        self.expires_at = expires_at
        self.write_shut = False
        self.answer: Answer | None = None   # the peer's answer to our goodbye, awaited
        self.answer_expires_at = expires_at
        self._interval = _FIRST_LOOK / 2

    def await_answer(self, answer: Answer | None, now: float) -> None:
        """Wait for ``answer`` too (not beyond the linger), from ``now``."""
        self.answer = answer
        if answer is not None:
            self.answer_expires_at = min(self.expires_at, now + answer.timeout)

    def awaiting(self, conn: Any, state: str | None) -> bool:
        """The peer's answer is still owed, and worth waiting for (after a read that
        ended in ``state``; with the read side shut, that says nothing of the peer)."""
        answer = self.answer
        return (answer is not None and conn.clock() < self.answer_expires_at
                and answer.awaited(None if conn.read_shut else state))

    def next_interval(self) -> float:
        """How long until the watchdog looks at the acknowledgements again (1 -> 50 ms,
        doubling: most peers acknowledge within a round trip, a few take long)."""
        self._interval = min(self._interval * 2, _LAST_LOOK)
        return self._interval


class ParkedEnds:
    """The ending half of :class:`~connserver.core.parking.ParkingLot` (``parked``
    arguments are its per-connection records)."""

    __slots__ = ()
    # The ParkingLot attributes and methods this half uses (defined in parking.py).
    config: Config
    faults: Faults
    _lock: threading.Lock
    _parked: dict
    _epoll: Any
    _watchdog: Watchdog
    _hand_off: Callable[[Callable[[], None]], None]
    _linger_timeout: Callable[[], float]
    _end_connection: Callable[..., None]
    _kick: Any
    _forget: Any
    _end: Any

    def _finish(self, parked: Any, reason: CloseReason | None) -> None:
        """End a parked connection (on a pool thread): goodbye and ``finish()`` now, then
        the rest (queued replies, a lingering close) parked, with no thread; a hub
        subscriber's end, which must take its queue back from the hub's writer, goes
        to a handler thread."""
        conn = parked.conn
        reason = reason or CloseReason.CLOSED
        with self._lock:
            if parked.ending is not None or self._parked.get(conn.fileno()) is not parked:
                return   # already ending
            parked.ending = Ending(reason, conn.clock() + self._linger_timeout())
        handler = parked.handler
        goodbye = (handler is not None and reason not in NO_GOODBYE
                   and conn.cancel_token.cancelled)
        if conn.write_sink_attached:
            self._forget(parked)
            self._hand_off(functools.partial(self._end_on_thread, parked, reason, goodbye))
            return
        try:
            if goodbye and reason not in UNDELIVERABLE:
                message = handler.framed_goodbye(reason)
                if message is not None:
                    conn.queue_goodbye(message)
            if parked.started:
                handler.finish()
            if handler is not None and reason not in UNDELIVERABLE:
                parked.ending.await_answer(conn.plaintext_answer(handler.closing_answer()),
                                           conn.clock())
        except BaseException as exc:
            parked.ending.reason = classify_failure(conn, exc)
        self._close(parked)

    def _close(self, parked: Any) -> None:
        """A step of a parked connection's end: send what is queued, then linger while the
        peer has not acknowledged everything (see closing.py), then end it. Between
        steps it waits parked: for writability, for input to discard, or for the
        watchdog, which looks at the acknowledgements (``_look_closing``)."""
        conn = parked.conn
        ending = parked.ending
        assert ending is not None
        sock = conn.socket
        try:
            deliverable = (ending.reason not in UNDELIVERABLE and not conn.forced
                           and conn.clock() < ending.expires_at)
            if deliverable and conn.parked_output_waiting and not conn.flush_parked():
                return self._wait_closing(parked, WRITE)
            if deliverable and sock.family in (socket.AF_INET, socket.AF_INET6):
                state = discard_input(sock, ending.answer)
                # Our end of stream (TLS close_notify, then FIN) waits for the peer's
                # answer: its closing handshake completes first (see closing.linger).
                if not ending.write_shut and not ending.awaiting(conn, state):
                    ending.write_shut = True
                    conn.shut_write()
                if state != "reset" and (unacked_bytes(sock) > 0 or ending.awaiting(conn, state)
                                         or not ending.write_shut) and not connection_gone(sock):
                    # After the peer's end of stream the socket always reads as ready:
                    # then only the watchdog looks again.
                    return self._wait_closing(parked, 0 if state == "eof" else READ)
        except (OSError, ConnServerError, Cancelled):
            pass   # the peer is gone: nothing more can reach it
        self._forget(parked)
        self._end(conn, ending.reason, parked.accounted_ip)

    def _wait_closing(self, parked: Any, events: int) -> None:
        conn = parked.conn
        ending = parked.ending
        assert ending is not None
        with self._lock:
            parked.serving = False
            conn.mark_parked(ending.expires_at, "linger")   # abort() leaves a linger alone
            if events:
                try:
                    self._epoll.modify(conn.fileno(), events)
                except OSError as exc:
                    self.faults.record(exc, f"closing #{conn.id}")
        self._watchdog.watch(ending, conn.clock() + ending.next_interval(),
                             functools.partial(self._look_closing, parked))

    def _look_closing(self, parked: Any) -> float | None:
        """On the watchdog's thread: once the peer has acknowledged everything, or reset
        the connection (what a peer that closed does with data sent after its end of
        stream: a TLS close_notify, say), or the linger is over, or forced, hand the
        connection to the pool to end it."""
        conn = parked.conn
        ending = parked.ending
        assert ending is not None
        now = conn.clock()
        sock = conn.socket
        state = discard_input(sock, ending.answer)
        if not (conn.forced or now >= ending.expires_at or state == "reset"
                or (unacked_bytes(sock) == 0 and not ending.awaiting(conn, state))
                or connection_gone(sock)):
            return min(now + ending.next_interval(), ending.expires_at)
        self._kick(parked)
        return None

    def _end_on_thread(self, parked: Any, reason: CloseReason, goodbye: bool) -> None:
        """A hub subscriber's end, on a handler thread: taking the write side back from
        the hub's writer may wait, as may sending what it had queued."""
        handler = parked.handler
        conn = parked.conn
        try:
            ciphertext_waiting = conn.parked_output_waiting and conn.tls is not None
            queued = conn.unpark_writes()
            if (queued or ciphertext_waiting) and reason not in UNDELIVERABLE:
                conn.send_goodbye(queued, timeout=self.config.linger_timeout)
            if goodbye:
                handler.say_goodbye(reason)
            if parked.started:
                handler.finish()
        except BaseException as exc:
            reason = classify_failure(conn, exc)
        self._end_connection(conn, reason, parked.accounted_ip)
