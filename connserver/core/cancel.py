"""Cancellation: a token per connection, and one watchdog thread per server.

A thread blocked in ``recv()`` cannot be interrupted by setting a flag, and on
Linux ``close()`` from another thread does not wake it either (and risks the fd
number being reused under it). What does wake it is ``shutdown()`` on the
socket: the blocked call returns at once. So cancelling is two steps: set the
token (the level-triggered truth every later call checks) and ask the watchdog
to shut the socket down — the read side first, so the handler can still send a
goodbye, and both sides shortly after if a write stays blocked. The watchdog
also enforces ``max_lifetime`` from a heap of expiry times, so no connection
needs a timer thread of its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import weakref
from collections import deque
from typing import Callable, Protocol

from .deadline import Clock, monotonic
from ..errors import Cancelled, CloseReason
from .faults import Faults
from .threads import block_async_signals

__all__ = ["CancelToken", "Watchdog", "Abortable"]

log = logging.getLogger("connserver.watchdog")


class CancelToken:
    """A one-shot, level-triggered cancellation flag with a reason.

    Once cancelled it stays cancelled; the first reason wins. ``cancelled`` is a
    plain attribute because every I/O call reads it: one attribute load, no call.
    The event that :meth:`wait_cancelled` blocks on is made only when someone
    waits, so the ten thousand tokens of idle connections cost a few words each.
    """

    __slots__ = ("cancelled", "_reason", "_on_cancel", "_waiter", "__weakref__")

    # One lock for every token: cancelling is rare, and a lock per token would cost
    # every idle connection its memory.
    _lock = threading.Lock()

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        self.cancelled = False
        self._reason: CloseReason | None = None
        self._on_cancel = on_cancel
        self._waiter: threading.Event | None = None

    def cancel(self, reason: CloseReason | str = CloseReason.CANCELLED) -> bool:
        """Cancel with ``reason``; return ``False`` if it was already cancelled."""
        reason = CloseReason(reason)
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason      # before the flag: whoever sees the flag sees the reason
            self.cancelled = True
            callback, self._on_cancel = self._on_cancel, None
            waiter = self._waiter
        if waiter is not None:
            waiter.set()
        if callback is not None:
            callback()
        return True

    @property
    def reason(self) -> CloseReason | None:
        return self._reason

    def wait_cancelled(self, timeout: float | None) -> bool:
        """Block until cancelled or ``timeout`` seconds pass; return whether cancelled."""
        with self._lock:
            if self.cancelled:
                return True
            if self._waiter is None:
                self._waiter = threading.Event()
            waiter = self._waiter
        return waiter.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled(self._reason or CloseReason.CANCELLED)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when cancelled (at once if already cancelled).

        The server uses it to hand a cancelled connection to its watchdog. No lock
        unless the token is cancelled (every connection sets one; the lock is shared):
        whichever of this and :meth:`cancel` takes the callback under the lock calls it.
        """
        self._on_cancel = callback
        if not self.cancelled:
            return
        with self._lock:
            if self._on_cancel is not callback:
                return   # cancel() took it, and calls it
            self._on_cancel = None
        callback()

    @property
    def callback(self) -> Callable[[], None] | None:
        """The callback still attached, if any (memory accounting excludes it)."""
        return self._on_cancel

    def detach(self) -> None:
        """Drop the callback (and the references it holds) once the connection ended
        (one store: a cancel() racing with it calls the callback or does not, both fine)."""
        self._on_cancel = None

    def __repr__(self) -> str:
        state = f"cancelled={self._reason.value}" if self._reason else "active"
        return f"<CancelToken {state}>"


class Abortable(Protocol):
    """What the watchdog needs from a connection."""

    cancel_token: CancelToken
    operation: str | None   # "write" while a write is under way

    def abort(self, force: bool = False) -> bool:
        """Wake a thread blocked reading (or, with ``force``, writing) on the socket.

        Never closes it. Returns True if a write seemed to be under way, so the
        watchdog should come back and force it if it is still blocked.
        """


class Watchdog:
    """The one thread per server that wakes cancelled connections and ends old ones.

    ``watch()`` registers a connection with an optional absolute expiry time (in
    the watchdog's clock); at expiry its token is cancelled with ``lifetime``.
    ``abort_soon()`` queues a connection whose token was just cancelled; the
    watchdog calls its ``abort()`` promptly, which shuts the read side (so the
    handler may still say goodbye). If a write was under way, the watchdog looks
    again ``WRITE_FORCE_INTERVAL`` later and forces both sides shut if that write
    is still blocked. Entries of connections that ended
    are dropped lazily and compacted, so the heap stays within twice the number
    of live connections (plus a small constant).
    """

    WRITE_FORCE_INTERVAL = 0.05
    MAX_WAIT_INTERVAL = 3600.0   # longest single wait: Condition.wait refuses huge timeouts

    def __init__(self, *, name: str = "connserver-watchdog", clock: Clock = monotonic,
                 stuck_timeout: float | None = None,
                 on_stuck: Callable[[Abortable], None] | None = None,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self._clock = clock
        self.faults = Faults("watchdog", log, on_fault)
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[Abortable] = deque()
        # Checks due later, on weak references so they pin nothing: ("write", a write
        # to force if still blocked) and ("stuck", a cancelled connection still open).
        self._recheck: list[tuple[float, int, weakref.ref, str]] = []
        self._stuck_timeout = stuck_timeout
        self._on_stuck = on_stuck
        self._heap: list[tuple[float, int, list]] = []
        self._entries: dict[int, list] = {}   # id(target) -> [target | None]
        self._dead = 0
        self._seq = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.aborts = 0
        self.lifetime_expiries = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("watchdog already started")
        self._thread = threading.Thread(target=self._run, name=self._name)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        """The watchdog's thread, once started."""
        return self._thread

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread; return ``False`` if it did not exit within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def watch(self, target: Abortable, expires_at: float | None,
              on_expiry: Callable[[], float | None] | None = None) -> None:
        """At ``expires_at``, cancel ``target`` with reason ``lifetime``; or, with
        ``on_expiry``, call it instead (on the watchdog's thread): it cancels what it
        must itself and returns the next time to be called, or None.

        One entry per target: watching again replaces the previous one. A parked
        connection keeps a single entry this way for all its deadlines, moved
        lazily: the deadline it names may already be later when it comes due.
        """
        if expires_at is None:
            return
        with self._cond:
            self._add(target, expires_at, on_expiry)

    def _add(self, target: Abortable, expires_at: float,
             on_expiry: Callable[[], float | None] | None) -> None:
        entry = [target, on_expiry]
        previous = self._entries.get(id(target))
        if previous is not None:
            previous[0] = None
            self._dead += 1
            self._compact_if_needed()
        self._entries[id(target)] = entry
        heapq.heappush(self._heap, (expires_at, next(self._seq), entry))
        if self._heap[0][2] is entry:
            self._cond.notify()

    def _watch_again(self, target: Abortable, expires_at: float | None,
                     on_expiry: Callable[[], float | None]) -> None:
        """After ``on_expiry`` ran: its next time, unless the target was watched anew
        meanwhile (from another thread, with a fresher time, which must stand)."""
        if expires_at is None:
            return
        with self._cond:
            if id(target) not in self._entries:
                self._add(target, expires_at, on_expiry)

    def unwatch(self, target: Abortable) -> None:
        with self._cond:
            entry = self._entries.pop(id(target), None)
            if entry is None:
                return
            entry[0] = None
            self._dead += 1
            self._compact_if_needed()

    def _compact_if_needed(self) -> None:
        """Drop dead entries once they outnumber the live ones (bounds the heap)."""
        if self._dead > 64 and self._dead > len(self._entries):
            self._heap = [item for item in self._heap if item[2][0] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def abort_soon(self, target: Abortable) -> None:
        """Queue ``target.abort()`` on the watchdog thread (cheap, never blocks)."""
        with self._cond:
            if self._stopping:
                return   # nothing would drain the queue; the server forces sockets itself
            self._pending.append(target)
            self._cond.notify()

    def poke(self) -> None:
        """Re-check expiries now (tests advance a fake clock, then poke)."""
        with self._cond:
            self._cond.notify()

    def watched(self) -> int:
        with self._cond:
            return len(self._entries)

    def _run(self) -> None:
        block_async_signals()
        while True:
            try:
                if not self._run_once():
                    return
            except Exception as exc:   # survive one connection's odd failure: see faults.py
                self.faults.record(exc)

    def _run_once(self) -> bool:
        """Wait for work and do it; False once stopping."""
        cond = self._cond
        with cond:
            while not (self._stopping or self._pending or self._due()):
                cond.wait(self._wait_timeout())
            if self._stopping:
                self._pending.clear()
                self._recheck.clear()
                return False
            to_abort = list(self._pending)
            self._pending.clear()
            expired = self._pop_expired()
            rechecks = self._pop_rechecks()
        for target, on_expiry in expired:
            # cancel() queues the abort through the token's callback.
            try:
                if on_expiry is not None:
                    self._watch_again(target, on_expiry(), on_expiry)
                elif target.cancel_token.cancel(CloseReason.LIFETIME):
                    self.lifetime_expiries += 1
            except Exception:   # a failing callback must not stop the watchdog
                log.exception("cancelling %r at its deadline failed", target)
        for target in to_abort:
            if self._abort(target, force=False):
                self._recheck_later(target, self.WRITE_FORCE_INTERVAL, "write")
            if self._stuck_timeout is not None:
                self._recheck_later(target, self._stuck_timeout, "stuck")
        for target, kind in rechecks:
            if kind == "write" and target.operation == "write":
                self._abort(target, force=True)   # still blocked writing: force it
            elif kind == "stuck" and not getattr(target, "closed", True) and self._on_stuck:
                try:
                    self._on_stuck(target)
                except Exception:
                    log.exception("reporting stuck %r failed", target)
        return True

    def _recheck_later(self, target: Abortable, delay: float, kind: str) -> None:
        with self._cond:
            heapq.heappush(self._recheck, (self._clock() + delay, next(self._seq),
                                           weakref.ref(target), kind))

    def _abort(self, target: Abortable, force: bool) -> bool:
        try:
            self.aborts += 1
            return target.abort(force=force)
        except Exception:  # never let one connection's failure stop the watchdog
            log.exception("aborting %r failed", target)
            return False

    def _due(self) -> bool:
        heap = self._heap
        while heap and heap[0][2][0] is None:
            heapq.heappop(heap)
            self._dead -= 1
        now = self._clock()
        return bool(heap) and heap[0][0] <= now or bool(self._recheck) and self._recheck[0][0] <= now

    def _wait_timeout(self) -> float | None:
        times = [queue[0][0] for queue in (self._heap, self._recheck) if queue]
        if not times:
            return None
        # Wait in real seconds until the earliest time due on the watchdog's clock;
        # with a fake clock, tests call poke() after advancing it.
        return min(self.MAX_WAIT_INTERVAL, max(0.0, min(times) - self._clock()))

    def _pop_rechecks(self) -> list[tuple[Abortable, str]]:
        now = self._clock()
        due = []
        while self._recheck and self._recheck[0][0] <= now:
            _, _, ref, kind = heapq.heappop(self._recheck)
            target = ref()
            if target is not None:
                due.append((target, kind))
        return due

    def _pop_expired(self) -> list[tuple[Abortable, Callable[[], float | None] | None]]:
        now = self._clock()
        expired = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, entry = heapq.heappop(heap)
            target = entry[0]
            if target is None:
                self._dead -= 1
                continue
            del self._entries[id(target)]
            expired.append((target, entry[1]))
        return expired
