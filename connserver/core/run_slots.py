"""Run slots: at most ``max_running`` handler threads run Python at once, in FIFO order.

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

A slot is never held across a wait for the network: the connection's
:class:`RunSlot` is given back before any call that may block (a ``recv``, a write the peer's
window cannot take, a rate-limit wait). Handler code that blocks on something
else (a database, a lock, a sleep) keeps its slot; so that such code cannot
stall everyone, a thread that has waited ``overdue`` seconds for a slot goes
in anyway (counted as ``overdue``). The gate only engages while there are more
live connections than slots; below that it is never consulted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque

__all__ = ["RunGate", "RunGateStatistics", "RunSlot"]


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


class RunSlot:
    """One connection's place at a :class:`RunGate`: held while its handler code runs.

    The connection takes a slot when a message arrives (:meth:`enter_if_engaged`)
    and gives it back around anything that may block (:meth:`released`).
    """

    __slots__ = ("gate", "held", "_ticket")

    def __init__(self, gate: RunGate) -> None:
        self.gate = gate
        self.held = False
        self._ticket: threading.Lock | None = None   # what this connection queues on

    def enter_if_engaged(self) -> None:
        """Take a slot, if the gate is engaged (more live connections than slots)."""
        gate = self.gate
        if gate.connections > gate.slots:
            self.enter()

    def enter(self) -> None:
        if self._ticket is None:
            self._ticket = threading.Lock()
            self._ticket.acquire()
        self.gate.enter(self._ticket)
        self.held = True

    def leave(self) -> None:
        """Give the slot back (before something that may block, or at the end)."""
        if self.held:
            self.held = False
            self.gate.leave()

    def released(self) -> "contextlib.AbstractContextManager[None]":
        """Around a wait: give the slot back, and take one again if the wait went well."""
        return _Released(self) if self.held else _NOTHING_HELD


class _Released:
    """See RunSlot.released; after an exception the connection is ending: no re-entry."""

    __slots__ = ("slot",)

    def __init__(self, slot: RunSlot) -> None:
        self.slot = slot

    def __enter__(self) -> None:
        self.slot.leave()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.slot.enter()


_NOTHING_HELD = contextlib.nullcontext()
