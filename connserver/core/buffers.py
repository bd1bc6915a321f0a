"""A pool of receive buffers that hands out ``bytes`` copies, never views.

In Go, ``buf[:n]`` of a pooled 64 KiB buffer pins all 64 KiB for as long as the
slice lives; in Python a ``memoryview`` slice does the same, and also stops
the ``bytearray`` from ever being resized. So connserver fills a pooled
``bytearray`` with ``recv_into``, copies exactly the ``n`` bytes received into a
new ``bytes`` object (one copy), and returns the buffer before ``recv()``
returns. An idle connection holds no buffer at all.

Leases are counted per connection (cheap, always on) with the call site that
took them; set ``CONNSERVER_LEAK_DETECTION=paranoid`` to record the whole stack
instead, like Netty's leak-detection levels.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import threading
import traceback
from collections import deque

__all__ = ["BufferPool", "BufferLease", "LeaseAccount", "PoolStatistics"]

log = logging.getLogger("connserver.buffers")

LEAK_DETECTION_ENV = "CONNSERVER_LEAK_DETECTION"


@dataclasses.dataclass(frozen=True)
class PoolStatistics:
    buffer_size: int
    allocated: int       # buffers created and not yet dropped
    free: int            # buffers idle in the pool
    leased: int          # buffers handed out and not yet returned
    hits: int            # acquisitions served from the free list
    misses: int          # acquisitions that allocated a new buffer
    dropped: int         # returned buffers dropped because the free list was full
    leaks_detected: int  # leases still held when their connection ended
    pinned: int          # returned buffers still exported by a memoryview (not reused)


class LeaseAccount:
    """The leases one connection holds; checked when the connection ends."""

    __slots__ = ("outstanding", "_sites")

    def __init__(self) -> None:
        self.outstanding = 0
        self._sites: dict[int, str] = {}

    def sites(self) -> list[str]:
        """Where the outstanding leases were taken."""
        return list(self._sites.values())


class BufferLease:
    """A leased buffer; use as a context manager so it always goes back."""

    __slots__ = ("buffer", "_pool", "_account")

    def __init__(self, pool: "BufferPool", buffer: bytearray, account: LeaseAccount | None) -> None:
        self.buffer = buffer
        self._pool = pool
        self._account = account

    def release(self) -> None:
        buffer, self.buffer = self.buffer, None
        if buffer is None:
            return
        account, self._account = self._account, None
        if account is not None:
            account.outstanding -= 1
            account._sites.pop(id(self), None)
        self._pool.release(buffer)

    def __enter__(self) -> bytearray:
        if self.buffer is None:
            raise RuntimeError("lease already released")
        return self.buffer

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BufferPool:
    """Fixed-size ``bytearray`` buffers with a bounded free list.

    Buffers returned while the free list is full are dropped, so the pool never
    holds more than ``max_free`` idle buffers, however large a burst was.
    """

    def __init__(self, buffer_size: int = 65536, max_free: int = 64, *,
                 leak_detection: str | None = None) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be positive")
        if max_free < 0:
            raise ValueError("max_free must not be negative")
        self.buffer_size = buffer_size
        self.max_free = max_free
        level = (leak_detection or os.environ.get(LEAK_DETECTION_ENV) or "simple").lower()
        if level not in ("simple", "paranoid"):
            raise ValueError(f"{LEAK_DETECTION_ENV} must be 'simple' or 'paranoid', not {level!r}")
        self.paranoid = level == "paranoid"
        self._free: deque[bytearray] = deque()
        self._lock = threading.Lock()
        self._acquired, self._released = itertools.count(), itertools.count()
        self._hits, self._misses = itertools.count(), itertools.count()
        self._dropped, self._pinned = itertools.count(), itertools.count()
        self._leaks = 0

    def acquire(self) -> bytearray:
        """Take a buffer; the caller must :meth:`release` it (prefer :meth:`lease`)."""
        # deque.pop/append and itertools.count are atomic under the GIL: no lock on
        # the path every recv() takes.
        next(self._acquired)
        try:
            buffer = self._free.pop()
        except IndexError:
            next(self._misses)
            return bytearray(self.buffer_size)
        next(self._hits)
        return buffer

    def release(self, buffer: bytearray) -> None:
        """Return a buffer; one still exported by a ``memoryview`` is reported, not reused."""
        next(self._released)
        if len(buffer) != self.buffer_size:
            # Resized by its user (clear(), +=, slicing in place): reusing it would
            # make every later recv_into() short or fail. Drop it.
            next(self._dropped)
            log.warning("a pooled buffer came back resized to %d bytes (not %d); it was "
                        "dropped, not reused", len(buffer), self.buffer_size)
        elif not _unexported(buffer):
            next(self._pinned)
            log.warning("a buffer came back to the pool while a memoryview of it was still "
                        "alive; it was dropped, not reused (copy data out with bytes(), do not "
                        "keep views)")
        elif len(self._free) < self.max_free:
            self._free.append(buffer)
        else:
            next(self._dropped)

    def lease(self, account: LeaseAccount | None = None, *, stacklevel: int = 1) -> BufferLease:
        """Lease a buffer, accounted to ``account`` (a connection's) with the call site.

        ``stacklevel`` works as in :func:`warnings.warn`: 2 names the caller's caller.
        """
        lease = BufferLease(self, self.acquire(), account)
        if account is not None:
            account.outstanding += 1
            if self.paranoid:
                site = "".join(traceback.format_stack(sys._getframe(stacklevel), limit=16))
            else:
                frame = sys._getframe(stacklevel)
                site = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
            account._sites[id(lease)] = site
        return lease

    def check_account(self, account: LeaseAccount, owner: str) -> int:
        """Report leases ``owner`` still holds at its end; return how many."""
        leaked = account.outstanding
        if leaked:
            with self._lock:
                self._leaks += leaked
            log.error("%s ended holding %d buffer lease(s), taken at:\n%s",
                      owner, leaked, "\n".join(account.sites()))
        return leaked

    def statistics(self) -> PoolStatistics:
        acquired, released = _value(self._acquired), _value(self._released)
        misses, dropped, pinned = _value(self._misses), _value(self._dropped), _value(self._pinned)
        with self._lock:
            leaks = self._leaks
        return PoolStatistics(
            buffer_size=self.buffer_size, allocated=misses - dropped - pinned,
            free=len(self._free), leased=acquired - released, hits=_value(self._hits),
            misses=misses, dropped=dropped, leaks_detected=leaks, pinned=pinned)


def _value(counter: itertools.count) -> int:
    """How many times ``next()`` was called on a counter started at 0."""
    return int(repr(counter)[6:-1])   # "count(42)"; itertools has no public getter


def _unexported(buffer: bytearray) -> bool:
    """True if no memoryview exports ``buffer``: only then can it be resized."""
    try:
        buffer.append(0)
    except BufferError:
        return False
    buffer.pop()
    return True
