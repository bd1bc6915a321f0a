"""The pytest plugin as a user sees it: fixture, marker, assert_no_leaks, FakeClock."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from connserver.apps.echo import EchoHandler
from connserver.testing import LeakError, assert_no_leaks, find_leaks, leak_snapshot

pytest_plugins = ["pytester"]



@pytest.mark.usefixtures("frozen_heap")
def test_assert_no_leaks_passes_a_clean_workload(serve):
    """Round trips against a correct handler leak nothing."""
    server = serve(EchoHandler, min_spare_threads=0, max_spare_threads=0)

    def workload():
        for _ in range(20):
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"x")
                assert client.recv(1) == b"x"

    assert_no_leaks(workload, cycles=4, warmup=1)


@pytest.mark.usefixtures("frozen_heap")
def test_assert_no_leaks_names_what_grew():
    """A workload that keeps objects alive fails, naming their type."""
    class Retained:
        pass

    kept = []

    def workload():
        kept.extend(Retained() for _ in range(2000))

    with pytest.raises(LeakError, match="Retained"):
        assert_no_leaks(workload, cycles=3, warmup=1)


@pytest.mark.usefixtures("frozen_heap")
def test_assert_no_leaks_catches_a_thread_left_running():
    """A workload that starts a thread and never stops it fails."""
    stop = threading.Event()
    started = []

    def workload():
        thread = threading.Thread(target=stop.wait, args=(10,), name="leaky-helper")
        thread.start()
        started.append(thread)

    try:
        with pytest.raises(LeakError, match="leaky-helper"):
            assert_no_leaks(workload, cycles=2, warmup=0, settle_timeout=0.2)
    finally:
        stop.set()
        for thread in started:
            thread.join(10)


def test_plugin_in_a_user_project(pytester):
    """A user's suite gets the fixture and the marker through the entry point."""
    pytester.makepyfile(test_user="""
        import socket, threading, pytest
        import connserver

        class Echo(connserver.Handler):
            def handle(self):
                while data := self.conn.recv():
                    self.conn.sendall(data)

        def test_serves(connserver_server):
            server = connserver_server(Echo, idle_timeout=5)
            with socket.create_connection(server.server_address, timeout=10) as c:
                c.sendall(b"hi")
                assert c.recv(2) == b"hi"

        stop = threading.Event()

        @pytest.mark.connserver_leakcheck
        def test_leaks_a_thread():
            threading.Thread(target=stop.wait, args=(30,), name="forgotten", daemon=True).start()

        def test_fake_clock():
            from connserver.testing import FakeClock
            clock = FakeClock()
            deadline = connserver.Deadline(5, clock)
            clock.advance(5)
            assert deadline.expired()
    """)
    # The leak check waits connserver_settle_timeout for the forgotten thread, in vain.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=60",
                                           "-o", "connserver_settle_timeout=0.5")
    result.assert_outcomes(passed=3, errors=1)   # the leak fails at teardown
    result.stdout.fnmatch_lines(["*thread 'forgotten' started at*"])


class _Release:
    """A plugin for an in-process inner session: fixture ``release``, an event its
    leaked thread waits on, which the outer test sets once the inner run is over."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @pytest.fixture
    def release(self) -> threading.Event:
        return self.event


def test_the_leak_check_waits_connserver_settle_timeout(pytester):
    """The marker waits for a leaked thread as long as the ini option says, then fails."""
    pytester.makeini("[pytest]\nconnserver_settle_timeout = 0.3\n")
    pytester.makepyfile(test_user="""
        import threading, pytest

        @pytest.mark.connserver_leakcheck
        def test_leaks_a_thread(release):
            threading.Thread(target=release.wait, args=(30,), name="forgotten", daemon=True).start()
    """)
    plugin = _Release()
    started = time.monotonic()
    try:
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", plugins=[plugin])
        elapsed = time.monotonic() - started
    finally:
        plugin.event.set()
        for thread in threading.enumerate():
            if thread.name == "forgotten":
                thread.join(10)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*thread 'forgotten' started at*"])
    assert elapsed < 3.0, elapsed     # the default, 5 s, would have been waited in full


def _leak_heartbeats(stop: threading.Event, started: list[threading.Thread]):
    """A workload that starts one 'heartbeat' thread per call and never stops it."""
    def heartbeat():
        stop.wait(30)

    def workload():
        thread = threading.Thread(target=heartbeat, name="heartbeat")
        thread.start()
        started.append(thread)
    return workload, heartbeat.__code__.co_firstlineno


def _stop_all(stop: threading.Event, started: list[threading.Thread]) -> None:
    stop.set()
    for thread in started:
        thread.join(10)
        assert not thread.is_alive(), thread.name


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize("cycles", [4, 20])
def test_assert_no_leaks_fails_within_one_settle_timeout(cycles):
    """A thread leaked every cycle fails in about one settle_timeout, not cycles × it."""
    settle_timeout = 1.0
    # The memory verdict is switched off: pympler's census would add its own seconds.
    quiet = dict(cycles=cycles, warmup=0, settle_timeout=settle_timeout, noise_blocks=10**9)
    started = time.monotonic()
    assert_no_leaks(lambda: None, **quiet)
    clean = time.monotonic() - started
    stop, threads = threading.Event(), []
    workload, _ = _leak_heartbeats(stop, threads)
    try:
        started = time.monotonic()
        with pytest.raises(LeakError, match="heartbeat"):
            assert_no_leaks(workload, **quiet)
        elapsed = time.monotonic() - started
    finally:
        _stop_all(stop, threads)
    # The old code waited a full settle_timeout after every cycle, then once more.
    assert elapsed < clean + 2 * settle_timeout, (elapsed, clean)


@pytest.mark.usefixtures("frozen_heap")
def test_assert_no_leaks_groups_identical_threads():
    """20 identical leaked threads are one line and one stack, named in a short first line."""
    stop, threads = threading.Event(), []
    workload, line = _leak_heartbeats(stop, threads)
    try:
        with pytest.raises(LeakError) as caught:
            assert_no_leaks(workload, cycles=20, warmup=0, settle_timeout=0.2)
    finally:
        _stop_all(stop, threads)
    message = str(caught.value)
    first, second = message.splitlines()[:2]
    assert first.startswith("workload leaks: 20 × thread 'heartbeat'"), first
    assert second == f"20 × thread 'heartbeat' started at heartbeat (test_plugin.py:{line}), " \
                     "stack:"
    assert message.count("stop.wait(30)") == 1, message


def test_find_leaks_groups_numbered_names_and_fds():
    """Threads whose names differ only by a number group under a pattern; fds by kind."""
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, args=(30,), name=f"beat-{i}") for i in range(3)]
    before = leak_snapshot()
    pairs = [socket.socketpair() for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        problems = find_leaks(before, timeout=0)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        _stop_all(stop, threads)
    assert len(problems) == 2, problems
    wait_line = threading.Event.wait.__code__.co_firstlineno
    assert problems[0].startswith(f"3 × thread 'beat-*' started at wait (threading.py:{wait_line}), "
                                  "stack:\n"), problems[0]
    assert problems[1].startswith("4 × fd still open -> socket: fds "), problems[1]


def test_leaked_non_daemon_thread_does_not_hang_the_run(pytester, monkeypatch):
    """A handler that leaks a thread blocked forever fails the run, which still ends."""
    monkeypatch.setenv("COLUMNS", "80")   # the short summary is cut to the terminal width
    for variable in ("CI", "BUILD_NUMBER"):   # ...except on CI, where pytest prints it whole
        monkeypatch.delenv(variable, raising=False)
    pytester.makepyfile(test_user="""
        import socket, threading, pytest
        import connserver

        stop = threading.Event()

        def heartbeat():
            stop.wait()          # the bug under test: nothing ever sets it

        class Leaky(connserver.Handler):
            def handle(self):
                threading.Thread(target=heartbeat, name="heartbeat").start()
                while data := self.conn.recv():
                    self.conn.sendall(data)

        @pytest.mark.connserver_leakcheck
        def test_leaks(connserver_server):
            server = connserver_server(Leaky, idle_timeout=5)
            for _ in range(20):
                with socket.create_connection(server.server_address, timeout=10) as c:
                    c.sendall(b"hi")
                    assert c.recv(2) == b"hi"
    """)
    # Before the fix the interpreter waited for the 20 threads forever.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=60", "-rA",
                                           "-o", "connserver_settle_timeout=0.5", timeout=30)
    assert result.ret == 1, result.stdout.str()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "20 × thread 'heartbeat' started at heartbeat (test_user.py:6), stack:",
        "ERROR test_user.py::test_leaks - Failed: left behind: 20 × thread 'heartbeat'",
    ])
    assert result.stdout.str().count("stop.wait()") == 1
    result.stderr.fnmatch_lines(["*20 leaked non-daemon thread(s) still alive at exit*os._exit(1)"])
