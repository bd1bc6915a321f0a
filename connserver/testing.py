"""Test helpers and the pytest plugin (registered through the ``pytest11`` entry point).

- :class:`FakeClock`: a clock to inject into deadlines and rate limiters.
- :func:`leak_snapshot` / :func:`find_leaks`: threads and fds that a piece of
  code left behind, waiting a bounded time for them to go.
- fixture ``connserver_server``: ``connserver_server(HandlerClass, **config)``
  starts a server on 127.0.0.1 port 0; it is shut down and checked at teardown.
- marker ``@pytest.mark.connserver_leakcheck``: fail the test if it leaves a
  thread or an fd behind, listing the survivors with their stacks (and, for
  servers from the fixture, a live connection or an outstanding buffer lease);
  it waits up to the ini option ``connserver_settle_timeout`` (5 s) for them
  to go, which is also how long a leaking test takes to fail.
- :func:`assert_no_leaks`: run a workload repeatedly and fail, naming what
  grew, if threads or fds do not come back or memory grows on every cycle.

Reports group identical leaks (``20 × thread 'heartbeat' started at ...``, one
stack per group) behind a first line short enough for pytest's short summary.
A reported non-daemon thread still alive when the run exits would make the
interpreter wait forever: the plugin then ends the process (see ``_ExitGuard``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterable, Iterator

__all__ = ["FakeClock", "LeakSnapshot", "leak_snapshot", "find_leaks", "wait_for",
           "assert_no_leaks", "LeakError", "server_leaks", "EXIT_GRACE_TIMEOUT"]


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
    # The listing's own fd is among the names, closed by now; left in a baseline,
    # it would hide the next fd opened (which reuses its number).
    return frozenset(fd for fd in map(int, names) if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


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


def _settled(before: LeakSnapshot) -> bool:
    return not _new_threads(before) and not (open_fds() - before.fds)


# Every thread starts in these; the first frame after them is what it was started with.
_BOOTSTRAP_CODE = frozenset(method.__code__ for method in (
    threading.Thread._bootstrap, threading.Thread._bootstrap_inner,  # type: ignore[attr-defined]
    threading.Thread.run))


@dataclasses.dataclass(frozen=True)
class _ThreadGroup:
    """Leaked threads with the same name pattern and the same stack, shown once."""

    names: tuple[str, ...]
    origin: str     # "heartbeat (test_mine.py:12)": the function the thread was started in
    stack: str

    @property
    def label(self) -> str:
        """``20 × thread 'heartbeat'``; differing numbers in names become ``*``."""
        name = self.names[0] if len(set(self.names)) == 1 else re.sub(r"\d+", "*", self.names[0])
        count = f"{len(self.names)} × " if len(self.names) > 1 else ""
        return f"{count}thread {name!r}"

    def describe(self) -> str:
        return f"{self.label} started at {self.origin}, stack:\n{self.stack}"


def _thread_stack(thread: threading.Thread) -> tuple[str, str] | None:
    """(origin, stack) of a live thread, without threading.py's bootstrap frames."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return None
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    while len(frames) > 1 and frames[0].f_code in _BOOTSTRAP_CODE:
        frames.pop(0)
    entry = frames[0].f_code
    origin = f"{entry.co_name} ({os.path.basename(entry.co_filename)}:{entry.co_firstlineno})"
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
    return origin, "".join(summary.format())


def _group_threads(threads: list[threading.Thread]) -> list[_ThreadGroup]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for thread in threads:
        described = _thread_stack(thread)
        if described is None:   # it ended while we looked
            continue
        origin, stack = described
        groups.setdefault((re.sub(r"\d+", "*", thread.name), origin, stack), []).append(thread.name)
    return [_ThreadGroup(tuple(names), origin, stack)
            for (_, origin, stack), names in groups.items()]


def _fd_groups(fds: list[int]) -> list[tuple[str, list[int]]]:
    """Open fds grouped by what they point at, without inode numbers: (kind, fds)."""
    groups: dict[str, list[int]] = {}
    for fd in fds:
        target = _fd_target(fd)
        # The listing itself opens an fd briefly; it is closed by the time we look.
        if target != "?":
            groups.setdefault(re.sub(r":\[\d+\]$", "", target), []).append(fd)
    return list(groups.items())


@dataclasses.dataclass(frozen=True)
class _Leaks:
    """What a leak check found, grouped: one line each in the summary, one stack per group."""

    threads: list[_ThreadGroup]
    fds: list[tuple[str, list[int]]]

    def phrases(self) -> list[str]:
        """One short phrase per group, for a failure's first line."""
        return ([group.label for group in self.threads] +
                [f"{len(fds)} × fd ({kind})" if len(fds) > 1 else f"fd {fds[0]} ({kind})"
                 for kind, fds in self.fds])

    def details(self) -> list[str]:
        return ([group.describe() for group in self.threads] +
                [f"fd {fds[0]} still open -> {kind}" if len(fds) == 1 else
                 f"{len(fds)} × fd still open -> {kind}: fds {', '.join(map(str, fds))}"
                 for kind, fds in self.fds])


def _summary(phrases: list[str], shown: int = 3) -> str:
    """A first line that fits pytest's short summary: the first few groups and a count."""
    more = f" and {len(phrases) - shown} more" if len(phrases) > shown else ""
    return ", ".join(phrases[:shown]) + more


def _collect(before: LeakSnapshot, timeout: float) -> _Leaks:
    wait_for(lambda: _settled(before), timeout)
    threads = _new_threads(before)
    _exit_guard.watch(threads)
    return _Leaks(_group_threads(threads), _fd_groups(sorted(open_fds() - before.fds)))


def find_leaks(before: LeakSnapshot, timeout: float = 5.0) -> list[str]:
    """What exists now that did not at ``before``: threads (with stacks) and fds.

    Waits up to ``timeout`` for threads to exit and fds to close, since a handler
    thread finishes its cleanup just after its client sees the socket close.
    Identical leaks are grouped (``20 × thread 'heartbeat' started at ...``) with
    one stack per group.
    """
    return _collect(before, timeout).details()


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

    Threads and fds must come back to what they were after the warm-up: after
    each cycle it waits up to ``settle_timeout`` for handler threads to finish,
    until one cycle does not settle; the leak is then established, so the rest
    run without waiting and a leaking workload fails in about one
    ``settle_timeout``, however many cycles. Memory is judged the way CPython's
    refleak hunter judges it: allocated blocks must not grow on *every* cycle, so
    noise passes and a steady leak does not. A cycle counts as growth only above
    ``noise_blocks`` (the interpreter's own caches grow by a block now and then);
    make a cycle do enough work that one leaked object per unit of work stands
    out. When they grow, pympler names the types.
    """
    import gc

    from .operations.diagnostics import MemoryTracker

    for _ in range(warmup):
        workload()
    gc.collect()
    before = leak_snapshot()
    tracker = MemoryTracker()
    tracker.set_baseline()
    gc.collect()
    blocks = [sys.getallocatedblocks()]
    settled = True
    for _ in range(cycles):
        workload()
        if settled:
            settled = bool(wait_for(lambda: _settled(before), settle_timeout))
        gc.collect()
        blocks.append(sys.getallocatedblocks())
    leaks = _collect(before, timeout=settle_timeout if settled else 0.0)
    phrases, details = leaks.phrases(), leaks.details()
    deltas = [after - prior for prior, after in zip(blocks, blocks[1:])]
    if cycles >= 2 and all(delta > noise_blocks for delta in deltas):
        rows = [row for row in tracker.growth(60) if row.count > 0]
        # Classes (module-qualified names) tell more than the dicts and locks they own.
        classes = [row for row in rows if "." in row.type_name and not row.type_name.startswith(
            ("collections.", "_thread.", "socket.", "builtins.", "_io."))]
        named = ", ".join(f"{row.type_name} +{row.count} ({row.size:+d} B)"
                          for row in (classes + [r for r in rows if r not in classes])[:10])
        phrases.append("memory grew on every cycle")
        details.append(f"allocated blocks grew on every cycle {deltas}; types that grew: "
                       f"{named or 'none named'}")
    if phrases:
        raise LeakError(f"workload leaks: {_summary(phrases)}\n" + "\n".join(details))


# --- leaked threads at exit ----------------------------------------------------------

EXIT_GRACE_TIMEOUT = 1.0
"""How long a reported leaked thread may still run once the interpreter starts to exit."""


class _ExitGuard:
    """Ends the process when leaked non-daemon threads would keep it from exiting.

    At exit the interpreter joins every non-daemon thread with no timeout, so one
    leaked thread blocked on an event hangs the test run forever, after its
    report was printed. Threads are not marked daemon to hide this (they cannot
    be, once started); instead a watchdog waits for the main thread to start
    exiting (joining it: no polling), gives the threads the leak checks
    reported ``EXIT_GRACE_TIMEOUT`` more, and if any is still alive says so on
    stderr and ends the process with ``os._exit`` and a failing status.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._watchdog: threading.Thread | None = None
        self.exit_status = 1

    def watch(self, threads: Iterable[threading.Thread]) -> None:
        """Remember ``threads`` as reported leaks (weakly: a thread that ends drops out)."""
        with self._lock:
            self._threads.update(threads)

    def holding(self) -> list[threading.Thread]:
        """Reported threads that would keep the interpreter from exiting."""
        with self._lock:
            threads = list(self._threads)
        return [t for t in threads if t.is_alive() and not t.daemon]

    def arm(self) -> None:
        """Start the watchdog (once) if a reported thread would hold the exit."""
        if not self.holding():
            return
        with self._lock:
            if self._watchdog is None:
                # Daemon: it must not itself be one more thread the exit waits for.
                self._watchdog = threading.Thread(target=self._run, daemon=True,
                                                  name="connserver-leakcheck-exit")
                self._watchdog.start()

    def _run(self) -> None:
        main = threading.main_thread()
        while main.is_alive():      # the main thread counts as stopped once exit begins
            main.join(60.0)
        deadline = time.monotonic() + EXIT_GRACE_TIMEOUT
        for thread in self.holding():
            thread.join(max(0.0, deadline - time.monotonic()))
        held = self.holding()
        if not held:
            return
        status = self.exit_status
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):   # closed or gone: nothing left to lose
                pass
        groups = _summary([group.label for group in _group_threads(held)])
        os.write(2, (f"connserver.testing: {len(held)} leaked non-daemon thread(s) still alive "
                     f"at exit ({groups}); the interpreter would wait for them forever, so the "
                     f"process ends now with os._exit({status})\n").encode())
        os._exit(status)


_exit_guard = _ExitGuard()


# --- the pytest plugin ---------------------------------------------------------------

try:
    import pytest
except ImportError:  # the plugin part is only for test runs
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def pytest_addoption(parser: Any) -> None:
        parser.addini("connserver_settle_timeout",
                      "seconds the connserver_leakcheck marker waits for a test's threads to end "
                      "and its fds to close before it reports them (default 5)", default="5.0")

    def pytest_configure(config: Any) -> None:
        config.addinivalue_line(
            "markers", "connserver_leakcheck: fail the test if it leaves a thread or fd behind")

    @pytest.fixture(autouse=True)
    def _connserver_leakcheck(request: Any) -> Iterator[None]:
        if request.node.get_closest_marker("connserver_leakcheck") is None:
            yield
            return
        settle_timeout = float(request.config.getini("connserver_settle_timeout"))
        before = leak_snapshot()
        yield
        leaks = _collect(before, timeout=settle_timeout)
        held = [problem for server in getattr(request.node, "_connserver_servers", ())
                for problem in server_leaks(server)]
        phrases = leaks.phrases() + [problem.split(":")[0] for problem in held]
        if phrases:
            # The first line is what pytest's short summary shows: keep it short and whole.
            pytest.fail(f"left behind: {_summary(phrases)}\n" + "\n".join(leaks.details() + held),
                        pytrace=False)

    @pytest.fixture
    def connserver_server(request: Any) -> Iterator[Callable[..., Any]]:
        """Factory: ``connserver_server(HandlerClass, **config)`` -> a running Server."""
        from .config import Config
        from .core.server import Server

        servers: list[Server] = []
        request.node._connserver_servers = servers   # for the leak-check marker

        def start(handler: type, address: tuple[str, int] = ("127.0.0.1", 0), **config: Any) -> Server:
            server = Server(address, handler, Config(**config))
            servers.append(server)
            server.start()
            return server

        yield start
        names = set()
        for server in servers:
            report = server.shutdown(grace=2.0)
            server.server_close()
            names.update(thread.name for thread in report.stuck)
        # A test may provoke a stuck handler on purpose; it must have ended it by now.
        def alive() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if t.name in names]
        wait_for(lambda: not alive())
        survivors = alive()
        if survivors:
            _exit_guard.watch(survivors)
            groups = _group_threads(survivors)
            pytest.fail(f"{_summary([group.label for group in groups])} stuck after shutdown\n" +
                        "\n".join(group.describe() for group in groups), pytrace=False)

    def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
        # Leaked threads are a failure even in a run whose tests passed.
        _exit_guard.exit_status = int(exitstatus) or 1

    def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
        held = _exit_guard.holding()
        if held:
            groups = _summary([group.label for group in _group_threads(held)])
            terminalreporter.section("connserver: leaked threads would hang the exit", red=True)
            terminalreporter.write_line(
                f"{len(held)} leaked non-daemon thread(s) still alive ({groups}). The interpreter "
                f"waits for them forever at exit; if they are still alive {EXIT_GRACE_TIMEOUT:g} s "
                f"after it starts to exit, the process ends with os._exit({int(exitstatus) or 1}) "
                f"(atexit handlers do not run).")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(config: Any) -> None:
        _exit_guard.arm()
