"""Rate limits: token buckets with no timer thread, and each connection's meter.

(Not to be confused with ``connection_limits`` — how many connections may be
open — or ``run_slots`` — how many handler threads may run at once.)

The article's Go limiter refills a buffered channel from a ticker goroutine —
one goroutine per limiter, leaked whenever a limiter is dropped. Here the
refill is computed from the clock whenever tokens are taken, as
``golang.org/x/time/rate`` does, so a limiter is plain data: dropping it leaves
nothing running.

Why not a ``threading.Semaphore`` holding the tokens (the shape first planned):
a semaphore's ``acquire`` takes one token per call, and byte-rate limits take
thousands per ``recv``; it also cannot be refilled lazily without a thread.
A lock around two floats does both, and a waiter sleeps exactly as long as the
missing tokens need, on the connection's cancel token so cancellation still
wakes it at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, ContextManager, Protocol

from .cancel import CancelToken
from .deadline import Clock, monotonic
from ..errors import RateLimited

__all__ = ["TokenBucket", "BucketStatistics", "BucketTable", "RateMeter"]

_EPSILON = 1e-9


@dataclasses.dataclass(frozen=True)
class BucketStatistics:
    rate: float
    burst: float
    tokens: float       # available now
    granted: int        # acquisitions that got their tokens
    refused: int        # acquisitions that gave up (nowait, or timed out)
    waited: int         # acquisitions that had to wait


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float, *, clock: Clock = monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = clock()
        self._granted = self._refused = self._waited = 0

    def acquire_nowait(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are there now."""
        with self._lock:
            if self._take(n):
                self._granted += 1
                return True
            self._refused += 1
            return False

    def acquire(self, n: float = 1, timeout: float | None = None,
                cancel: CancelToken | None = None) -> bool:
        """Wait until ``n`` tokens are available and take them.

        Returns False if that would take longer than ``timeout`` (checked up front,
        without waiting in vain). Raises :class:`~connserver.Cancelled` if
        ``cancel`` is cancelled while waiting.
        """
        if n > self.burst:
            raise ValueError(f"cannot take {n} tokens at once from a bucket of {self.burst:g}")
        waited = False
        started = self._clock()
        while True:
            if cancel is not None:
                cancel.raise_if_cancelled()
            with self._lock:
                if self._take(n):
                    self._granted += 1
                    self._waited += waited
                    return True
                delay = (n - self._tokens) / self.rate
                if timeout is not None and self._clock() + delay > started + timeout:
                    self._refused += 1
                    return False
            waited = True
            if cancel is not None:
                cancel.wait_cancelled(delay)
            else:
                self._sleep(delay)

    def delay_for(self, n: float = 1) -> float:
        """Seconds until ``n`` tokens will be available (0 if they are now)."""
        with self._lock:
            self._refill()
            return max(0.0, (n - self._tokens) / self.rate)

    def statistics(self) -> BucketStatistics:
        with self._lock:
            self._refill()
            return BucketStatistics(rate=self.rate, burst=self.burst, tokens=self._tokens,
                                    granted=self._granted, refused=self._refused,
                                    waited=self._waited)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = now

    def _take(self, n: float) -> bool:
        self._refill()
        if self._tokens >= n - _EPSILON:   # elapsed × rate is rarely exact in floats
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False


class BucketTable:
    """Token buckets per key (a peer address), shared by that key's connections.

    An entry lives while a connection holds it, and after that only until its
    bucket has refilled: a full bucket is the same as a fresh one, so dropping
    it loses nothing. The table is therefore bounded by the live keys plus those
    seen within the last refill time, and by ``max_entries`` in any case.
    """

    def __init__(self, rate: float, burst: float, *, clock: Clock = monotonic,
                 max_entries: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}   # key -> [bucket, holders]
        self._released: dict[str, None] = {}  # keys with no holder, oldest first

    def acquire(self, key: str) -> TokenBucket:
        with self._lock:
            self._sweep()
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [TokenBucket(self.rate, self.burst, clock=self._clock), 0]
            entry[1] += 1
            self._released.pop(key, None)
            return entry[0]

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                if entry[0].delay_for(self.burst) <= 0:
                    del self._entries[key]   # full: nothing to remember
                else:
                    self._released[key] = None
            self._sweep()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _sweep(self) -> None:
        """Drop released entries whose bucket is full again (oldest first, a few at a time)."""
        over = len(self._entries) - self._max_entries
        for _ in range(max(4, over)):
            if not self._released:
                return
            key = next(iter(self._released))
            bucket = self._entries[key][0]
            if over <= 0 and bucket.delay_for(bucket.burst) > 0:
                return   # not full yet: the rest wait for later calls
            del self._released[key]
            del self._entries[key]
            over -= 1


class RateWaiter(Protocol):
    """What a :class:`RateMeter` needs from the connection it charges."""

    cancel_token: CancelToken

    def waiting(self, operation: str) -> ContextManager[None]:
        """Around a wait: shown as ``operation``, with no run slot held."""


class RateMeter:
    """The rate limiters one connection is charged by, and what happens over them.

    ``buckets``: its own (``rate``), its address's (``ip_rate``) and the server's
    (``server_rate``); ``unit``: what raw reads charge (``"bytes"``; message
    handlers charge ``"messages"``); ``wait``: over a limit, wait for the tokens
    (TCP pushes back on the client meanwhile) rather than raise
    :class:`~connserver.RateLimited`; ``ip``: the address whose shared bucket is
    held, for the server to give back at the end.
    """

    __slots__ = ("buckets", "unit", "wait", "ip")

    def __init__(self, buckets: tuple[TokenBucket, ...] = (), *, wait: bool = True,
                 ip: str | None = None) -> None:
        self.buckets = buckets
        self.unit = "bytes"
        self.wait = wait
        self.ip = ip

    def try_charge(self, amount: float = 1, skip: int = 0) -> tuple[int, float]:
        """Without waiting: take ``amount`` (at most a burst) from ``buckets[skip:]`` in
        order. Returns how many buckets are charged so far and, if one was short, how
        long until it can give ``amount`` (0.0: all charged). A parked connection waits
        that long with no thread, then calls again with ``skip`` = buckets charged."""
        for index in range(skip, len(self.buckets)):
            bucket = self.buckets[index]
            if not bucket.acquire_nowait(amount):
                return index, max(bucket.delay_for(amount), 1e-3)
        return len(self.buckets), 0.0

    def charge(self, amount: float, waiter: RateWaiter) -> None:
        """Take ``amount`` from every bucket, a burst at a time; wait or raise when short."""
        for bucket in self.buckets:
            remaining = amount
            while remaining > 0:
                step = min(remaining, bucket.burst)
                if not bucket.acquire_nowait(step):
                    if not self.wait:
                        raise RateLimited(f"over the rate limit of {bucket.rate:g}/s")
                    with waiter.waiting("rate_wait"):
                        bucket.acquire(step, cancel=waiter.cancel_token)
                remaining -= step
