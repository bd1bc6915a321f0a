"""The pytest plugin as a user sees it: fixture, marker, assert_no_leaks, FakeClock."""

from __future__ import annotations

import socket
import threading

import pytest

from connserver.apps.echo import EchoHandler
from connserver.testing import LeakError, assert_no_leaks

pytest_plugins = ["pytester"]


def test_assert_no_leaks_passes_a_clean_workload(serve):
    """Round trips against a correct handler leak nothing."""
    server = serve(EchoHandler, min_spare_threads=0, max_spare_threads=0)

    def workload():
        for _ in range(20):
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"x")
                assert client.recv(1) == b"x"

    assert_no_leaks(workload, cycles=4, warmup=1)


def test_assert_no_leaks_names_what_grew():
    """A workload that keeps objects alive fails, naming their type."""
    class Retained:
        pass

    kept = []

    def workload():
        kept.extend(Retained() for _ in range(2000))

    with pytest.raises(LeakError, match="Retained"):
        assert_no_leaks(workload, cycles=3, warmup=1)


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
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=60")
    result.assert_outcomes(passed=3, errors=1)   # the leak fails at teardown
    result.stdout.fnmatch_lines(["*thread 'forgotten' still alive*"])
