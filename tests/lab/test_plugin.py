"""The project's pytest plugin on lab 2's handlers: it fails the broken one, passes the fixed one."""

from __future__ import annotations

import socket
import threading

import pytest

from connserver.lab.spawned_threads import BoundedWorkHandler, SpawningHandler
from connserver.testing import LeakError, assert_no_leaks, wait_for

# Eight requests a cycle, one in four lost: two lost answers per cycle.
REQUESTS = 8
# The memory verdict is left out: its pympler census of this test process's heap would
# cost seconds, and the threads are what this lab is about.
QUICK = dict(cycles=3, warmup=1, settle_timeout=0.5, noise_blocks=10**9)


class FastBoundedWork(BoundedWorkHandler):
    work_timeout = 0.02


def _workload(server):
    def workload():
        with socket.create_connection(server.server_address[:2], timeout=10) as client:
            with client.makefile("rb") as replies:
                for n in range(REQUESTS):
                    client.sendall(f"job {n}\n".encode())
                    assert replies.readline().endswith(b"\n")
    return workload


def test_the_plugin_fails_the_broken_handler(connserver_server):
    """assert_no_leaks names the threads a SpawningHandler leaves waiting on the backend."""
    server = connserver_server(SpawningHandler, min_spare_threads=0, max_spare_threads=0)
    try:
        with pytest.raises(LeakError, match=r"thread 'Thread-\* \(process\)'"):
            assert_no_leaks(_workload(server), **QUICK)
    finally:
        _close_backend(server)


def test_the_plugin_passes_the_fixed_handler(connserver_server):
    """The same workload against BoundedWorkHandler leaves nothing behind."""
    server = connserver_server(FastBoundedWork, min_spare_threads=0, max_spare_threads=0)
    assert_no_leaks(_workload(server), **QUICK)


def _close_backend(server) -> None:
    """Answer every lost call at last, so the spawned threads end before the leak check."""
    backend = server.resource("lab-backend", lambda: None)
    if backend is not None:
        backend.close()
    assert wait_for(lambda: not [t for t in threading.enumerate() if t.name.endswith("(process)")])
