"""The watchdog driven by a fake clock: lifetimes, prompt aborts, forced writes, stuck reports.

No sockets and no sleeps. The targets are fakes with what the watchdog needs
from a connection (a cancel token, ``operation``, ``abort()``, ``closed``),
wired as the server wires a connection: cancelling the token queues
``abort_soon()``. A test advances the clock, pokes the watchdog and waits, with
a 10 s safety net, on an event the watchdog's work sets. To assert that
something did *not* happen, :func:`settle` first waits until the watchdog has
finished every pass that could have done it.
"""

from __future__ import annotations

import collections
import inspect
import threading
import tracemalloc

import pytest

from connserver import CancelToken, CloseReason, Watchdog
from connserver.testing import FakeClock

SAFETY_TIMEOUT = 10.0


class Target:
    """What the watchdog needs from a connection, recording each ``abort()``."""

    def __init__(self, watchdog: Watchdog, operation: str | None = None) -> None:
        self.operation = operation
        self.closed = False
        self.forces: list[bool] = []   # the ``force`` flag of every abort() call, in order
        self.cancelled = threading.Event()
        self.aborted = threading.Event()
        self.forced = threading.Event()
        self.cancel_token = CancelToken(on_cancel=lambda: self._on_cancel(watchdog))

    def _on_cancel(self, watchdog: Watchdog) -> None:
        self.cancelled.set()
        watchdog.abort_soon(self)   # as the server wires a connection's token

    def abort(self, force: bool = False) -> bool:
        self.forces.append(force)
        (self.forced if force else self.aborted).set()
        return not force and self.operation == "write"


def settle(watchdog: Watchdog) -> None:
    """Return once the watchdog has finished every pass that began before the call.

    A queued abort is served in the first pass that starts after it, before that
    pass's rechecks; so one marker proves that everything due when it was queued
    has been collected, and a second marker (queued only once the first was
    served) proves that the pass holding the first has finished.
    """
    for _ in range(2):
        marker = Target(watchdog)
        marker.closed = True   # never reported as stuck
        watchdog.abort_soon(marker)
        assert marker.aborted.wait(SAFETY_TIMEOUT), "the watchdog did not serve its queue"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def watchdog(clock: FakeClock):
    watchdog = Watchdog(name="connserver-watchdog-test", clock=clock)
    watchdog.start()
    try:
        yield watchdog
    finally:
        assert watchdog.stop(SAFETY_TIMEOUT), "the watchdog thread did not exit"


def test_a_lifetime_ends_only_once_the_clock_passes_it(clock, watchdog):
    """A lifetime cancels with reason LIFETIME (and is then aborted) only when due."""
    sooner, later = Target(watchdog), Target(watchdog)
    watchdog.watch(sooner, clock() + 5)
    watchdog.watch(later, clock() + 10)
    assert watchdog.watched() == 2
    clock.advance(9.999)
    watchdog.poke()
    # The abort follows the cancel in a later pass, which checked `later` again.
    assert sooner.aborted.wait(SAFETY_TIMEOUT), "an expired lifetime was not enforced"
    assert sooner.cancel_token.reason is CloseReason.LIFETIME and sooner.forces == [False]
    assert not later.cancelled.is_set() and later.forces == []
    assert watchdog.watched() == 1 and watchdog.lifetime_expiries == 1
    clock.advance(0.001)
    watchdog.poke()
    assert later.aborted.wait(SAFETY_TIMEOUT), "the second lifetime was not enforced"
    assert later.cancel_token.reason is CloseReason.LIFETIME
    assert watchdog.watched() == 0 and watchdog.lifetime_expiries == 2


def test_unwatch_before_expiry_means_no_cancel(clock, watchdog):
    """A connection that ended before its lifetime is forgotten, not cancelled."""
    target = Target(watchdog)
    watchdog.watch(target, clock() + 5)
    watchdog.unwatch(target)
    watchdog.unwatch(target)   # twice is harmless: the server unwatches on every end
    clock.advance(10)
    watchdog.poke()
    settle(watchdog)
    assert not target.cancelled.is_set() and target.forces == []
    assert watchdog.watched() == 0 and watchdog.lifetime_expiries == 0


def test_no_expiry_means_not_watched(watchdog):
    """watch(target, None) (no max_lifetime) keeps nothing for the target."""
    watchdog.watch(Target(watchdog), None)
    assert watchdog.watched() == 0


def test_abort_soon_aborts_the_read_side_at_once(watchdog):
    """A cancelled connection is aborted without force, with no clock movement."""
    target = Target(watchdog)
    target.cancel_token.cancel()
    assert target.aborted.wait(SAFETY_TIMEOUT), "abort_soon() did not abort"
    assert target.forces == [False] and watchdog.aborts == 1


def test_a_write_still_blocked_after_the_interval_is_forced(clock, watchdog):
    """A write still under way WRITE_FORCE_INTERVAL after the abort gets abort(force=True)."""
    target = Target(watchdog, operation="write")
    target.cancel_token.cancel()
    assert target.aborted.wait(SAFETY_TIMEOUT)
    settle(watchdog)   # the recheck is scheduled on the clock as it reads now
    assert target.forces == [False]
    clock.advance(Watchdog.WRITE_FORCE_INTERVAL)
    watchdog.poke()
    assert target.forced.wait(SAFETY_TIMEOUT), "the blocked write was not forced"
    assert target.forces == [False, True]


def test_a_write_that_finished_is_not_forced(clock, watchdog):
    """A write that ended within WRITE_FORCE_INTERVAL is left alone."""
    target = Target(watchdog, operation="write")
    target.cancel_token.cancel()
    assert target.aborted.wait(SAFETY_TIMEOUT)
    settle(watchdog)
    target.operation = None   # the write returned (the read-side abort let it finish)
    clock.advance(Watchdog.WRITE_FORCE_INTERVAL)
    watchdog.poke()
    settle(watchdog)
    assert target.forces == [False] and not target.forced.is_set()


def test_a_cancelled_connection_still_open_is_reported_stuck_once(clock):
    """With stuck_timeout=5, a cancelled target still open 5 s later gets on_stuck once;
    one that closed in time is not reported."""
    reported: list[Target] = []
    stuck = threading.Event()

    def on_stuck(target) -> None:
        reported.append(target)
        stuck.set()

    watchdog = Watchdog(name="connserver-watchdog-test", clock=clock, stuck_timeout=5,
                        on_stuck=on_stuck)
    watchdog.start()
    try:
        hung, finished = Target(watchdog), Target(watchdog)
        hung.cancel_token.cancel()
        finished.cancel_token.cancel()
        assert hung.aborted.wait(SAFETY_TIMEOUT) and finished.aborted.wait(SAFETY_TIMEOUT)
        settle(watchdog)   # the stuck checks are scheduled on the clock as it reads now
        finished.closed = True
        clock.advance(4.5)
        watchdog.poke()
        settle(watchdog)
        assert reported == []   # not yet due
        clock.advance(0.5)
        watchdog.poke()
        assert stuck.wait(SAFETY_TIMEOUT), "the stuck connection was not reported"
        clock.advance(60)
        watchdog.poke()
        settle(watchdog)
        assert reported == [hung]
    finally:
        assert watchdog.stop(SAFETY_TIMEOUT)


def test_watch_and_unwatch_churn_keeps_the_watchdog_small(clock, watchdog):
    """10,000 connections watched and unwatched (eight live at a time) leave the
    watchdog holding memory for the live ones only: unwatched entries are compacted."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        only_the_watchdog = [tracemalloc.Filter(True, inspect.getsourcefile(Watchdog))]

        def held() -> int:
            snapshot = tracemalloc.take_snapshot().filter_traces(only_the_watchdog)
            return sum(stat.size for stat in snapshot.statistics("filename"))

        before = held()
        live: collections.deque[Target] = collections.deque()
        for index in range(10_000):
            target = Target(watchdog)
            watchdog.watch(target, clock() + 3600 + index)
            live.append(target)
            if len(live) > 8:
                watchdog.unwatch(live.popleft())
            assert watchdog.watched() == len(live)
        grown = held() - before
        while live:
            watchdog.unwatch(live.popleft())
        assert watchdog.watched() == 0
    finally:
        if not was_tracing:
            tracemalloc.stop()
    # Without compaction the heap keeps an entry per connection ever watched (~1.5 MB).
    assert grown < 64 * 1024, f"the watchdog holds {grown} bytes after the churn"


def test_stop_ends_the_thread_and_reports_it(clock):
    """stop() returns True once the named thread has exited; later aborts are ignored."""
    watchdog = Watchdog(name="connserver-watchdog-test", clock=clock)
    assert watchdog.thread is None and watchdog.stop(SAFETY_TIMEOUT)   # never started
    watchdog = Watchdog(name="connserver-watchdog-test", clock=clock)
    watchdog.start()
    thread = watchdog.thread
    assert thread is not None and thread.is_alive() and thread.name == "connserver-watchdog-test"
    with pytest.raises(RuntimeError):
        watchdog.start()
    watchdog.watch(Target(watchdog), clock() + 5)   # a pending expiry does not hold it
    assert watchdog.stop(SAFETY_TIMEOUT)
    assert not thread.is_alive() and thread not in threading.enumerate()
    late = Target(watchdog)
    watchdog.abort_soon(late)
    assert late.forces == [] and watchdog.aborts == 0


def test_on_expiry_is_called_when_due_and_can_look_again_later(clock, watchdog):
    """With on_expiry, the watchdog calls it when due instead of cancelling; a time it
    returns is when it calls again (how a parked connection's deadlines move lazily)."""
    target = Target(watchdog)
    calls: list[float] = []
    called = threading.Event()

    def on_expiry():
        calls.append(clock())
        called.set()
        return clock() + 5 if len(calls) == 1 else None

    watchdog.watch(target, clock() + 1, on_expiry)
    clock.advance(1)
    watchdog.poke()
    assert called.wait(SAFETY_TIMEOUT)
    called.clear()
    clock.advance(4.999)
    watchdog.poke()
    settle(watchdog)
    assert len(calls) == 1 and not target.cancel_token.cancelled   # not due yet, not cancelled
    clock.advance(0.001)
    watchdog.poke()
    assert called.wait(SAFETY_TIMEOUT)
    settle(watchdog)
    assert len(calls) == 2 and watchdog.watched() == 0   # it returned None: no entry left


def test_watching_again_replaces_the_entry(clock, watchdog):
    """A second watch() of the same target replaces the first: only the new time counts."""
    target = Target(watchdog)
    watchdog.watch(target, clock() + 1)
    watchdog.watch(target, clock() + 10)
    assert watchdog.watched() == 1
    clock.advance(2)
    watchdog.poke()
    settle(watchdog)
    assert not target.cancel_token.cancelled
    clock.advance(8)
    watchdog.poke()
    assert target.cancelled.wait(SAFETY_TIMEOUT)
    assert target.cancel_token.reason is CloseReason.LIFETIME


def test_a_watch_made_while_on_expiry_runs_is_not_replaced_by_its_result(clock, watchdog):
    """Another thread watching a target anew while its on_expiry runs (a parked
    connection rescheduled an earlier deadline) keeps that time: the callback's
    (stale, later) result does not replace it."""
    target = Target(watchdog)
    fresh_called = threading.Event()

    def fresh():
        fresh_called.set()
        return None

    def stale():
        watchdog.watch(target, clock() + 2, fresh)   # as a pool thread would, meanwhile
        return clock() + 100

    watchdog.watch(target, clock() + 1, stale)
    clock.advance(1)
    watchdog.poke()
    settle(watchdog)
    clock.advance(2)
    watchdog.poke()
    assert fresh_called.wait(SAFETY_TIMEOUT)
