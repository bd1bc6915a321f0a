"""Leak diagnostics: a census of threads, fds and memory, and pympler summaries.

``census()`` is cheap (a few /proc reads) and safe to call often. The
:class:`MemoryTracker` walks every object in the heap with pympler, which takes
a noticeable fraction of a second on a big heap: call it on demand (the admin
endpoint, a test), never on the hot path, and never while holding a server lock.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Mapping

from ..core.report import stack_of, thread_stacks

if TYPE_CHECKING:
    from ..core.server import Server

__all__ = ["Census", "census", "thread_role", "thread_stacks", "stack_of", "MemoryTracker", "TypeGrowth",
           "footprint", "open_fd_count", "rss_bytes"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass(frozen=True)
class Census:
    """One look at the process (and a server, if given)."""

    threads: int
    threads_by_role: Mapping[str, int]   # "conn", "spare", "watchdog", ... and "other"
    fds: int                             # -1 where /proc is not available
    rss_bytes: int                       # -1 where /proc is not available
    allocated_blocks: int                # sys.getallocatedblocks()
    gc_counts: tuple[int, int, int]      # objects waiting per generation
    gc_collections: int                  # collections run so far
    connections: int                     # live connections of the server (0 without one)
    pool_leases: int                     # buffers leased from its pool now

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def thread_role(name: str) -> str:
    """``connserver-conn-42`` -> ``conn``; ``connserver-admin-conn-3`` -> ``admin-conn``."""
    if not name.startswith("connserver-"):
        return "other"
    parts = name[len("connserver-"):].split("-")
    while parts and parts[-1].isdigit():
        parts.pop()
    return "-".join(parts) or "other"


def open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1   # minus the fd listdir itself opened
    except OSError:
        return -1


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as file:
            return int(file.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return -1


def census(server: "Server | None" = None) -> Census:
    threads = threading.enumerate()
    roles = collections.Counter(thread_role(thread.name) for thread in threads)
    connections = leases = 0
    if server is not None:
        connections = len(server.connections())
        leases = server.buffer_pool.statistics().leased
    return Census(
        threads=len(threads), threads_by_role=dict(roles), fds=open_fd_count(),
        rss_bytes=rss_bytes(), allocated_blocks=sys.getallocatedblocks(),
        gc_counts=gc.get_count(), gc_collections=sum(s["collections"] for s in gc.get_stats()),
        connections=connections, pool_leases=leases)


@dataclasses.dataclass(frozen=True)
class TypeGrowth:
    type_name: str
    count: int      # change in the number of objects
    size: int       # change in bytes (pympler's shallow sizes)


class MemoryTracker:
    """Which types grew, by count and size, since a baseline (pympler summaries)."""

    def __init__(self) -> None:
        # Made at the first question, not here: a SummaryTracker walks every object in
        # the process when it is made, and an admin endpoint must not cost a server's
        # start-up that walk (seconds with a large heap) when nobody asks for memory.
        self._tracker: Any = None
        self._baseline: str | None = None
        self._previous: str | None = None

    def _summary(self) -> str:
        """A pympler summary, frozen into one string: a kept list of rows would itself
        show up as thousands of lists and strings in the next comparison."""
        if self._tracker is None:
            from pympler import tracker   # imported lazily: only diagnostics need it

            # SummaryTracker leaves its own summaries out of each count, so the
            # bookkeeping of the comparison does not show up as growth.
            self._tracker = tracker.SummaryTracker()
        gc.collect()
        return json.dumps(self._tracker.create_summary())

    def set_baseline(self) -> None:
        self._baseline = self._previous = self._summary()

    def top(self, limit: int = 20) -> list[TypeGrowth]:
        """The largest types now, by total size."""
        rows = sorted(json.loads(self._summary()), key=lambda row: -row[2])[:limit]
        return [TypeGrowth(row[0], row[1], row[2]) for row in rows]

    def growth(self, limit: int = 20) -> list[TypeGrowth]:
        """Types that grew the most since the baseline (set one first if there is none)."""
        if self._baseline is None:
            self.set_baseline()
            return []
        return self._diff(self._baseline, self._summary(), limit)

    def growth_since_last(self, limit: int = 20) -> list[TypeGrowth]:
        """Types that grew since the previous call (the first call sets the baseline)."""
        current = self._summary()
        previous, self._previous = self._previous, current
        if self._baseline is None:
            self._baseline = current
        return [] if previous is None else self._diff(previous, current, limit)

    @staticmethod
    def _diff(before: str, after: str, limit: int) -> list[TypeGrowth]:
        from pympler import summary

        rows = [row for row in summary.get_diff(json.loads(before), json.loads(after))
                if row[1] or row[2]]
        rows.sort(key=lambda row: (-row[2], -row[1]))
        return [TypeGrowth(row[0], row[1], row[2]) for row in rows[:limit]]


def footprint(*objects: Any) -> int:
    """Deep size in bytes of ``objects`` together (e.g. a handler and its connection).

    What they share with every other connection — the server and everything it
    holds directly (config, pool, registry, watchdog, hubs) — is excluded, so
    the figure is what one more connection costs in Python objects. Its thread's
    stack comes on top (see the RSS per connection in the benchmarks).
    """
    from pympler import asizeof

    shared: list[Any] = []
    for obj in objects:
        server = getattr(obj, "server", None)
        if server is not None:
            shared.append(server)
            shared.extend(vars(server).values())
        for attribute in ("config", "hub"):
            value = getattr(obj, attribute, None)
            if value is not None:
                shared.append(value)
        shared_by_all = getattr(obj, "shared_objects", None)
        if shared_by_all is not None:
            shared.extend(shared_by_all())
    sizer = asizeof.Asizer()
    if shared:
        sizer.exclude_objs(*shared)
    return sizer.asizeof(*objects)
