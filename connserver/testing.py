"""Test helpers and the pytest plugin (registered through the ``pytest11`` entry point).

- :class:`FakeClock`: a clock to inject into deadlines and rate limiters.
- :func:`leak_snapshot` / :func:`find_leaks`: threads and fds that a piece of
  code left behind, waiting a bounded time for them to go.
- fixture ``connserver_server``: ``connserver_server(HandlerClass, **config)``
  starts a server on 127.0.0.1 port 0; it is shut down and checked at teardown.
- marker ``@pytest.mark.connserver_leakcheck``: fail the test if it leaves a
  thread or an fd behind, listing the survivors with their stacks (and, for
  servers from the fixture, a live connection or an outstanding buffer lease).
- :func:`assert_no_leaks`: run a workload repeatedly and fail, naming what
  grew, if threads or fds do not come back or memory grows on every cycle.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

__all__ = ["FakeClock", "LeakSnapshot", "leak_snapshot", "find_leaks", "wait_for",
           "assert_no_leaks", "LeakError", "server_leaks"]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now += seconds


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005) -> Any:
    """Poll ``condition`` until it returns something truthy or ``timeout`` passes.

    For conditions nothing signals (a thread count, an fd count); returns the last
    value, so callers assert on it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@dataclasses.dataclass(frozen=True)
class LeakSnapshot:
    threads: frozenset[int]
    fds: frozenset[int]


def open_fds() -> frozenset[int]:
    """The process's open file descriptors (from /proc/self/fd)."""
    try:
        names = os.listdir("/proc/self/fd")
    except FileNotFoundError:   # not Linux: fd checks are skipped
        return frozenset()
    return frozenset(int(name) for name in names)


def leak_snapshot() -> LeakSnapshot:
    return LeakSnapshot(threads=frozenset(t.ident for t in threading.enumerate() if t.ident),
                        fds=open_fds())


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _new_threads(before: LeakSnapshot) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before.threads and t.is_alive()]


def find_leaks(before: LeakSnapshot, timeout: float = 5.0) -> list[str]:
    """What exists now that did not at ``before``: threads (with stacks) and fds.

    Waits up to ``timeout`` for threads to exit and fds to close, since a handler
    thread finishes its cleanup just after its client sees the socket close.
    """
    wait_for(lambda: not _new_threads(before) and not (open_fds() - before.fds), timeout)
    from .diagnostics import stack_of

    problems = []
    for thread in _new_threads(before):
        problems.append(f"thread {thread.name!r} still alive:\n{stack_of(thread.ident)}")
    for fd in sorted(open_fds() - before.fds):
        # The listing itself opens an fd briefly; it is closed by the time we look.
        target = _fd_target(fd)
        if target != "?":
            problems.append(f"fd {fd} still open -> {target}")
    return problems


class LeakError(AssertionError):
    """What assert_no_leaks found; the message names what grew."""


def server_leaks(server: Any) -> list[str]:
    """Connections, per-address entries or buffer leases a stopped server still holds."""
    problems = []
    live = server.connections()
    if live:
        problems.append(f"{len(live)} connection(s) still registered: {[i.id for i in live]}")
    if server.limiter.addresses_tracked():
        problems.append(f"{server.limiter.addresses_tracked()} per-address limit entries left")
    leased = server.buffer_pool.statistics().leased
    if leased:
        problems.append(f"{leased} pooled buffer(s) still leased")
    return problems


def assert_no_leaks(workload: Callable[[], Any], cycles: int = 5, warmup: int = 2,
                    settle_timeout: float = 5.0, noise_blocks: int = 10) -> None:
    """Run ``workload()`` ``warmup + cycles`` times; fail if anything leaks.

    Threads and fds must come back to what they were after the warm-up (waiting up
    to ``settle_timeout`` each cycle for handler threads to finish). Memory is
    judged the way CPython's refleak hunter judges it: allocated blocks must not
    grow on *every* cycle, so noise passes and a steady leak does not. A cycle
    counts as growth only above ``noise_blocks`` (the interpreter's own caches
    grow by a block now and then); make a cycle do enough work that one leaked
    object per unit of work stands out. When they grow, pympler names the types.
    """
    import gc

    from .diagnostics import MemoryTracker

    for _ in range(warmup):
        workload()
    gc.collect()
    before = leak_snapshot()
    tracker = MemoryTracker()
    tracker.set_baseline()
    gc.collect()
    blocks = [sys.getallocatedblocks()]
    for _ in range(cycles):
        workload()
        wait_for(lambda: not _new_threads(before) and not (open_fds() - before.fds), settle_timeout)
        gc.collect()
        blocks.append(sys.getallocatedblocks())
    problems = find_leaks(before, timeout=settle_timeout)
    deltas = [after - prior for prior, after in zip(blocks, blocks[1:])]
    if cycles >= 2 and all(delta > noise_blocks for delta in deltas):
        rows = [row for row in tracker.growth(60) if row.count > 0]
        # Classes (module-qualified names) tell more than the dicts and locks they own.
        classes = [row for row in rows if "." in row.type_name and not row.type_name.startswith(
            ("collections.", "_thread.", "socket.", "builtins.", "_io."))]
        named = ", ".join(f"{row.type_name} +{row.count} ({row.size:+d} B)"
                          for row in (classes + [r for r in rows if r not in classes])[:10])
        problems.append(f"allocated blocks grew on every cycle {deltas}; types that grew: "
                        f"{named or 'none named'}")
    if problems:
        raise LeakError("workload leaks:\n" + "\n".join(problems))


# --- the pytest plugin ---------------------------------------------------------------

try:
    import pytest
except ImportError:  # the plugin part is only for test runs
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def pytest_configure(config: Any) -> None:
        config.addinivalue_line(
            "markers", "connserver_leakcheck: fail the test if it leaves a thread or fd behind")

    @pytest.fixture(autouse=True)
    def _connserver_leakcheck(request: Any) -> Iterator[None]:
        if request.node.get_closest_marker("connserver_leakcheck") is None:
            yield
            return
        before = leak_snapshot()
        yield
        problems = find_leaks(before)
        for server in getattr(request.node, "_connserver_servers", ()):
            problems.extend(server_leaks(server))
        if problems:
            pytest.fail("test left resources behind:\n" + "\n".join(problems), pytrace=False)

    @pytest.fixture
    def connserver_server(request: Any) -> Iterator[Callable[..., Any]]:
        """Factory: ``connserver_server(HandlerClass, **config)`` -> a running Server."""
        from .config import Config
        from .server import Server

        servers: list[Server] = []
        request.node._connserver_servers = servers   # for the leak-check marker

        def start(handler: type, address: tuple[str, int] = ("127.0.0.1", 0), **config: Any) -> Server:
            server = Server(address, handler, Config(**config))
            servers.append(server)
            server.start()
            return server

        yield start
        stuck = []
        for server in servers:
            report = server.shutdown(grace=2.0)
            server.server_close()
            stuck.extend(report.stuck)
        # A test may provoke a stuck handler on purpose; it must have ended it by now.
        names = {thread.name for thread in stuck}
        survivors = wait_for(lambda: not [t for t in threading.enumerate() if t.name in names])
        if not survivors:
            pytest.fail("handler threads still alive after shutdown:\n" +
                        "\n".join(f"{t.name}:\n{t.stack}" for t in stuck), pytrace=False)
