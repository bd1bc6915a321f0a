"""ByteBoundedQueue: a thread-safe queue bounded in items *and* bytes.

A count bound alone lets 256 one-megabyte messages through; what a slow
consumer costs is bytes, so that is what is bounded. When it is full the
policy decides: ``block`` (the producer waits, with a timeout), ``drop_newest``,
``drop_oldest``, or ``disconnect`` (the producer gets :class:`SlowConsumer` for
this consumer only, and should end that consumer's connection).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Literal

from ..core.deadline import Clock, monotonic
from ..errors import ConnServerError, SlowConsumer

__all__ = ["ByteBoundedQueue", "QueueStatistics", "QueueEmpty", "QueueFull", "QueueClosed",
           "OverflowPolicy"]

OverflowPolicy = Literal["block", "drop_newest", "drop_oldest", "disconnect"]
POLICIES = ("block", "drop_newest", "drop_oldest", "disconnect")


class QueueEmpty(ConnServerError):
    """get() found nothing within its timeout."""


class QueueFull(ConnServerError):
    """put() with the block policy found no room within its timeout."""


class QueueClosed(ConnServerError):
    """The queue was closed: puts are refused, gets fail once it is drained."""


@dataclasses.dataclass(frozen=True)
class QueueStatistics:
    items: int
    bytes: int
    max_items: int
    max_bytes: int
    policy: str
    put: int
    got: int
    dropped: int        # by drop_newest / drop_oldest
    overflows: int      # times the queue was full when a put arrived
    closed: bool


class ByteBoundedQueue:
    """FIFO of ``bytes``; at most ``max_items`` items and ``max_bytes`` bytes.

    Each hub subscriber has one, so it is kept small: its two conditions (about
    1.4 KiB each) are made only when a thread first has to wait on one; a hub's
    writer never waits, so a subscriber's queue usually never makes them.
    """

    __slots__ = ("max_items", "max_bytes", "policy", "_clock", "_items", "_bytes", "_lock",
                 "_not_empty", "_not_full", "_closed", "_put", "_got", "_dropped", "_overflows")

    def __init__(self, max_items: int, max_bytes: int, policy: OverflowPolicy = "block",
                 *, clock: Clock = monotonic) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be positive")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy = policy
        self._clock = clock
        # A list, not a deque: an empty deque keeps a 760-byte block, a list shrinks back
        # to 56 bytes once drained (idle subscribers are many; their queues are short).
        self._items: list[bytes] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self._not_empty: threading.Condition | None = None   # made by the first waiter
        self._not_full: threading.Condition | None = None
        self._closed = False
        self._put = self._got = self._dropped = self._overflows = 0

    # --- producing -------------------------------------------------------------

    def put(self, item: bytes, timeout: float | None = None) -> bool:
        """Add ``item``; what happens when full depends on the policy.

        Returns False if the item was dropped (``drop_newest``, or an item larger
        than ``max_bytes`` under ``drop_oldest``). Raises :class:`QueueFull`
        (``block``, after ``timeout``), :class:`SlowConsumer` (``disconnect``) or
        :class:`QueueClosed`.
        """
        size = len(item)
        with self._lock:
            if self._closed:
                raise QueueClosed("queue is closed")
            if not self._fits(size):
                self._overflows += 1
                if not self._make_room(size, timeout):
                    return False
            self._items.append(item)
            self._bytes += size
            self._put += 1
            if self._not_empty is not None:
                self._not_empty.notify()
            return True

    def has_room(self, size: int) -> bool:
        """Whether an item of ``size`` bytes would fit now (a hint: others may race)."""
        with self._lock:
            return self._fits(size)

    def put_nowait(self, item: bytes) -> bool:
        """put() that never waits (the block policy raises QueueFull at once)."""
        return self.put(item, timeout=0)

    def _fits(self, size: int) -> bool:
        return len(self._items) < self.max_items and self._bytes + size <= self.max_bytes

    def _make_room(self, size: int, timeout: float | None) -> bool:
        policy = self.policy
        if policy == "disconnect":
            raise SlowConsumer(f"queue full ({len(self._items)} items, {self._bytes} bytes)")
        if policy == "drop_newest" or (policy == "drop_oldest" and size > self.max_bytes):
            self._dropped += 1
            return False
        if policy == "drop_oldest":
            while self._items and not self._fits(size):
                self._bytes -= len(self._items.pop(0))
                self._dropped += 1
            return True
        if size > self.max_bytes:
            raise QueueFull(f"an item of {size} bytes can never fit in {self.max_bytes} bytes")
        if timeout is not None and timeout <= 0:
            raise QueueFull("queue full")
        if self._not_full is None:
            self._not_full = threading.Condition(self._lock)
        if not self._not_full.wait_for(lambda: self._closed or self._fits(size), timeout):
            raise QueueFull(f"queue still full after {timeout:g} s")
        if self._closed:
            raise QueueClosed("queue closed while waiting to put")
        return True

    # --- consuming -------------------------------------------------------------

    def get(self, timeout: float | None = None) -> bytes:
        """Take the oldest item, waiting up to ``timeout`` (QueueEmpty, QueueClosed)."""
        with self._lock:
            if not self._items:
                if timeout is not None and timeout <= 0:
                    self._raise_empty()
                if self._not_empty is None:
                    self._not_empty = threading.Condition(self._lock)
                self._not_empty.wait_for(lambda: self._items or self._closed, timeout)
                if not self._items:
                    self._raise_empty()
            return self._pop()

    def get_nowait(self) -> bytes:
        return self.get(timeout=0)

    def drain_nowait(self, max_bytes: int, max_items: int = 1024) -> list[bytes]:
        """Take up to ``max_items`` items from the front without passing ``max_bytes``.

        Always at least one item if any is queued (even one larger than ``max_bytes``).
        The default of 1024 items is Linux's IOV_MAX, the most one ``sendmsg`` takes.
        """
        with self._lock:
            items = self._items
            limit = min(max_items, len(items))
            count = total = 0
            while count < limit and (not count or total + len(items[count]) <= max_bytes):
                total += len(items[count])
                count += 1
            taken = items[:count]
            del items[:count]
            self._bytes -= total
            self._got += count
            if count and self._not_full is not None:
                self._not_full.notify(count)
            return taken

    def _pop(self) -> bytes:
        item = self._items.pop(0)
        self._bytes -= len(item)
        self._got += 1
        if self._not_full is not None:
            self._not_full.notify()
        return item

    def _raise_empty(self) -> None:
        if self._closed:
            raise QueueClosed("queue is closed and drained")
        raise QueueEmpty("queue empty")

    # --- state -----------------------------------------------------------------

    def close(self) -> None:
        """Refuse further puts and wake every waiter; items already queued can be got."""
        with self._lock:
            self._closed = True
            for waiters in (self._not_empty, self._not_full):
                if waiters is not None:
                    waiters.notify_all()

    def clear(self) -> int:
        """Drop every queued item (e.g. when its consumer is gone); return how many."""
        with self._lock:
            count = len(self._items)
            self._items.clear()
            self._bytes = 0
            if self._not_full is not None:
                self._not_full.notify_all()
            return count

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def statistics(self) -> QueueStatistics:
        with self._lock:
            return QueueStatistics(
                items=len(self._items), bytes=self._bytes, max_items=self.max_items,
                max_bytes=self.max_bytes, policy=self.policy, put=self._put, got=self._got,
                dropped=self._dropped, overflows=self._overflows, closed=self._closed)
