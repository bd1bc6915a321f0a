"""Admission: at most ``max_running`` handler threads run Python at once, in FIFO order.

Why. With a thousand busy connections, a thousand threads return from ``recv``
at once and all wait for the GIL. CPython's GIL is not fair: a thread coming
back from a fast system call usually takes it again before the ones that have
been sleeping on it, and each sleeper wakes every switch interval (5 ms) to
ask for it, so with many waiters some connections are served over and over and
others wait for seconds (measured in docs/benchmarks.md). The gate keeps the
number of threads competing for the GIL small: a thread that received a
message takes a run slot before it runs its handler code and gives it back
before it blocks again. When every slot is taken it waits on its own lock in
a queue, so it costs no CPU while it waits and is admitted strictly in the
order it arrived.

A slot is never held across a wait for the network: :class:`Connection`
gives it back before any call that may block (a ``recv``, a write the peer's
window cannot take, a rate-limit wait). Handler code that blocks on something
else (a database, a lock, a sleep) keeps its slot; so that such code cannot
stall everyone, a thread that has waited ``overdue`` seconds for a slot goes
in anyway (counted as ``overdue``). The gate only engages while there are more
live connections than slots; below that it is never consulted.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque

__all__ = ["RunGate", "RunGateStatistics"]


@dataclasses.dataclass(frozen=True)
class RunGateStatistics:
    slots: int
    running: int     # threads holding a slot (may exceed slots briefly, see overdue)
    waiting: int     # threads queued for a slot now
    waited: int      # admissions that had to queue, since start
    overdue: int     # admissions that gave up queueing after `overdue` seconds


class RunGate:
    """FIFO run slots for handler threads; see the module docstring."""

    def __init__(self, slots: int, overdue: float = 0.1) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.overdue = overdue
        self.connections = 0   # live connections, kept by the server; engaged above `slots`
        self._lock = threading.Lock()
        self._running = 0
        self._queue: deque[threading.Lock] = deque()
        self._waited = 0
        self._overdue_count = 0

    @property
    def engaged(self) -> bool:
        return self.connections > self.slots

    def enter(self, ticket: threading.Lock) -> None:
        """Take a run slot, queueing on ``ticket`` (the caller's own held lock) if none is free."""
        with self._lock:
            if self._running < self.slots and not self._queue:
                self._running += 1
                return
            self._queue.append(ticket)
            self._waited += 1
        if ticket.acquire(timeout=self.overdue):
            return   # leave() handed us its slot
        with self._lock:
            try:
                self._queue.remove(ticket)
            except ValueError:
                handed_over = True   # a slot came just as we gave up; its release is due
            else:
                handed_over = False
                self._running += 1
                self._overdue_count += 1
        if handed_over:
            ticket.acquire()   # released by leave(), under its lock, before it let go

    def leave(self) -> None:
        """Give the slot back, straight to the longest-waiting thread if there is one."""
        with self._lock:
            if self._queue:
                self._queue.popleft().release()
            else:
                self._running -= 1

    def statistics(self) -> RunGateStatistics:
        with self._lock:
            return RunGateStatistics(slots=self.slots, running=self._running,
                                     waiting=len(self._queue), waited=self._waited,
                                     overdue=self._overdue_count)
