"""Leak diagnostics: a census of threads, fds and memory, and pympler summaries.

``census()`` is cheap (a few /proc reads) and safe to call often. The
:class:`MemoryTracker` walks every object in the heap, which takes a noticeable
fraction of a second on a big heap: call it on demand (the admin endpoint, a
test), never on the hot path, and never while holding a server lock.

The walk is :func:`heap_summary`: the rows pympler's ``summarize(muppy.get_objects())``
gives (the same objects, the same names), found with one ``gc.get_referents``
call and named once per type, where pympler makes Python calls and runs two
regular expressions for every object: 0.6 s instead of 4-6 s for a heap of a
million objects, and a test session's heap made one baseline (which pympler's
SummaryTracker walks twice) cost several seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import re
import sys
import threading
import types
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..core.report import stack_of, thread_stacks

if TYPE_CHECKING:
    from ..core.server import Server

__all__ = ["Census", "census", "thread_role", "thread_stacks", "stack_of", "MemoryTracker", "TypeGrowth",
           "heap_summary", "footprint", "open_fd_count", "rss_bytes"]

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
    size: int       # change in bytes (shallow sizes, sys.getsizeof)


# pympler's names: "<class 'a.B'>" -> "a.B"; a function or module is named one by one.
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_CLASS_NAME = re.compile(r"^<(?:type|class) '(\S+)'>$")


def _type_name(kind: type) -> str:
    text = _ADDRESS.sub("", str(kind))
    match = _CLASS_NAME.match(text)
    return match.group(1) if match else text


def _object_name(obj: Any) -> str:
    if type(obj) is types.FunctionType:
        return _ADDRESS.sub("", f"function ({obj.__name__})")
    return _ADDRESS.sub("", "module(%s)" % getattr(obj, "__name__", getattr(
        obj, "__file__", "nameless, id: %d" % id(obj))))


def _is_walked(obj: Any) -> bool:
    """Frames are left out (as pympler does), and so is a weak proxy whose object is gone."""
    try:
        return not isinstance(obj, types.FrameType)
    except ReferenceError:
        return False


def heap_summary() -> list[list[Any]]:
    """Every object in the heap as rows ``[type name, count, total shallow size]``.

    The objects are those ``pympler.muppy.get_objects()`` finds (what the garbage
    collector tracks, frames excepted, and the untracked objects they refer to),
    and the rows are those of ``pympler.summary.summarize``; what costs time here
    runs in C (one ``gc.get_referents`` call), so a heap of a million objects
    takes a fraction of a second instead of several.
    """
    gc.collect()
    containers = [obj for obj in gc.get_objects() if _is_walked(obj)]
    untracked = {id(ref): ref for ref in gc.get_referents(*containers) if not gc.is_tracked(ref)}
    counts: dict[Any, int] = {}
    sizes: dict[Any, int] = {}
    named_one_by_one = (types.FunctionType, types.ModuleType)
    getsizeof = sys.getsizeof
    objects: Iterable[Any]
    for objects in (containers, untracked.values()):
        for obj in objects:
            kind = type(obj)
            key = _object_name(obj) if kind in named_one_by_one else kind
            if key in counts:
                counts[key] += 1
                sizes[key] += getsizeof(obj)
            else:
                counts[key] = 1
                sizes[key] = getsizeof(obj)
    rows: dict[str, list[Any]] = {}
    for key, count in counts.items():
        # Two types may print alike (a class made twice): one row, as in pympler.
        name = key if isinstance(key, str) else _type_name(key)
        row = rows.setdefault(name, [name, 0, 0])
        row[1] += count
        row[2] += sizes[key]
    return list(rows.values())


class MemoryTracker:
    """Which types grew, by count and size, since a baseline (heap summaries).

    Nothing is walked until the first question: an admin endpoint must not cost a
    server's start-up a walk of the heap (seconds with a large one) when nobody
    asks for memory.
    """

    def __init__(self) -> None:
        self._baseline: str | None = None
        self._previous: str | None = None

    def _summary(self) -> str:
        """A heap summary, frozen into one string: a kept list of rows would itself
        show up as thousands of lists and strings in the next comparison."""
        return json.dumps(heap_summary())

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
