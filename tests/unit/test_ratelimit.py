"""TokenBucket with a fake clock: rate, burst, waits, cancellation, no threads."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

import connserver
from connserver import CancelToken
from connserver.core.rate_limits import TokenBucket
from connserver.testing import FakeClock


def test_burst_then_rate():
    """A full bucket allows `burst` at once, then `rate` per second."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.acquire_nowait() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.1)
    assert bucket.acquire_nowait() and not bucket.acquire_nowait()
    clock.advance(100)
    assert bucket.statistics().tokens == 5   # never more than burst


def test_acquire_waits_exactly_the_missing_time():
    """acquire() sleeps for the time the missing tokens need, on the injected clock."""
    clock = FakeClock()
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock.advance(seconds)

    bucket = TokenBucket(rate=4, burst=2, clock=clock, sleep=sleep)
    assert bucket.acquire(2)
    assert bucket.acquire(1)
    assert sleeps == [0.25]
    assert bucket.statistics().waited == 1


def test_acquire_gives_up_up_front_when_the_timeout_is_too_short():
    """A wait longer than the timeout is refused without sleeping in vain."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock, sleep=pytest.fail)
    assert bucket.acquire()
    assert not bucket.acquire(timeout=0.5)
    assert bucket.statistics().refused == 1
    with pytest.raises(ValueError):
        bucket.acquire(2)


def test_cancellation_interrupts_a_wait():
    """A cancelled token makes acquire() raise Cancelled instead of waiting on."""
    clock = FakeClock()
    bucket = TokenBucket(rate=0.001, burst=1, clock=clock)
    assert bucket.acquire()
    token = CancelToken()
    token.cancel("rate_limited")
    with pytest.raises(connserver.Cancelled):
        bucket.acquire(cancel=token)


def test_a_dropped_limiter_leaves_nothing_running():
    """No thread per limiter: creating and dropping many changes no thread count."""
    before = threading.active_count()
    buckets = [TokenBucket(rate=100, burst=10) for _ in range(1000)]
    for bucket in buckets:
        bucket.acquire_nowait()
    assert threading.active_count() == before
    ref = weakref.ref(buckets[0])
    del buckets, bucket
    gc.collect()
    assert ref() is None and threading.active_count() == before


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0.5)])
def test_bad_parameters(rate, burst):
    """Rates and bursts that can never work are refused."""
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_bucket_table_shares_per_key_and_forgets_refilled_entries():
    """Connections from one address share a bucket; the entry goes once it is full again."""
    from connserver.core.rate_limits import BucketTable

    clock = FakeClock()
    table = BucketTable(rate=10, burst=10, clock=clock)
    first, second = table.acquire("10.0.0.1"), table.acquire("10.0.0.1")
    assert first is second and table.acquire("10.0.0.2") is not first
    assert first.acquire_nowait(10) and not second.acquire_nowait()
    table.release("10.0.0.1")
    table.release("10.0.0.1")
    table.release("10.0.0.2")
    assert len(table) == 1          # 10.0.0.2 was full: dropped at once
    assert table.acquire("10.0.0.1") is first   # not refilled yet: remembered
    table.release("10.0.0.1")
    clock.advance(1.0)
    table.acquire("10.0.0.3")
    table.release("10.0.0.3")
    assert len(table) == 0


def test_bucket_table_is_bounded():
    """However many addresses come and go, the table keeps at most max_entries."""
    from connserver.core.rate_limits import BucketTable

    table = BucketTable(rate=1, burst=1, clock=FakeClock(), max_entries=50)
    for index in range(1000):
        bucket = table.acquire(f"10.0.{index // 256}.{index % 256}")
        bucket.acquire_nowait()   # leave it not full, so only the bound removes it
        table.release(f"10.0.{index // 256}.{index % 256}")
    assert len(table) <= 54
