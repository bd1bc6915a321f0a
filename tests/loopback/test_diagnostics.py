"""Diagnostics: census, memory tracking, footprint, stuck-thread reports."""

from __future__ import annotations

import gc
import logging
import sys
import types

import pytest

from connserver.operations import diagnostics
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_server import roundtrip


def test_census_counts_threads_by_role_fds_and_memory(serve):
    """census() sees the server's threads by role, its connections, fds and RSS."""
    server = serve(EchoHandler, min_spare_threads=2)
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
        look = wait_for(lambda: (c := diagnostics.census(server)).threads_by_role.get("spare") == 2 and c)
        assert look.threads_by_role["conn"] == 1
        assert look.threads_by_role["watchdog"] == 1 and look.threads_by_role["accept"] == 1
        assert look.connections == 1 and look.pool_leases == 0
        assert look.fds > 0 and look.rss_bytes > 1_000_000 and look.allocated_blocks > 0
    wait_closed(server, 1)


def test_thread_role_names():
    """Roles come from the thread-name prefix; numbers are ids, not roles."""
    assert diagnostics.thread_role("connserver-conn-42") == "conn"
    assert diagnostics.thread_role("connserver-admin-conn-3") == "admin-conn"
    assert diagnostics.thread_role("connserver-watchdog") == "watchdog"
    assert diagnostics.thread_role("MainThread") == "other"


@pytest.mark.usefixtures("frozen_heap")
def test_memory_tracker_names_the_type_that_grew():
    """MemoryTracker reports growth by type since its baseline."""
    class LeakyThing:
        pass

    tracker = diagnostics.MemoryTracker()
    tracker.set_baseline()
    kept = [LeakyThing() for _ in range(5000)]
    grown = {row.type_name: row for row in tracker.growth(50)}
    assert any("LeakyThing" in name and row.count >= 5000 for name, row in grown.items())
    assert tracker.top(5)
    del kept


def test_footprint_of_one_connection_excludes_shared_state(serve):
    """footprint(handler, conn) is a few KiB, not the whole server."""
    sizes = []

    class Measured(EchoHandler):
        def setup(self):
            sizes.append(diagnostics.footprint(self, self.conn))

    server = serve(Measured)
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
    wait_closed(server, 1)
    assert 1000 < sizes[0] < 64 * 1024


def test_a_handler_that_ignores_cancellation_is_reported_stuck(serve, caplog, stubborn):
    """A cancelled connection whose handler keeps running is logged with its stack and counted."""
    caplog.set_level(logging.WARNING, logger="connserver.server")
    server = serve(stubborn.handler, stuck_thread_timeout=0.2)
    with connect(server):
        assert stubborn.entered.wait(10)
        conn_id = server.connections()[0].id
        assert server.cancel(conn_id)
        assert wait_for(lambda: server.stats().stuck_threads == 1)
        # Counted first, then its stack is taken and logged: wait for the line too.
        assert wait_for(lambda: any("does not check for cancellation" in r.getMessage()
                                    and "release.wait" in r.getMessage() for r in caplog.records))
        stubborn.release.set()
    wait_closed(server, 1)
    assert server.stats().stuck_threads == 0


def _count_heap_walks(monkeypatch) -> list[int]:
    """Each listing of the garbage collector's objects (a heap walk) appends to the list."""
    walks: list[int] = []
    real = gc.get_objects

    def counting(*args, **kwargs):
        walks.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gc, "get_objects", counting)
    return walks


def test_an_admin_endpoint_does_not_walk_the_heap_until_memory_is_asked(serve, monkeypatch):
    """Starting the admin endpoint walks no heap (every object in the process: seconds
    with a test session's heap); the first memory question does, once."""
    walks = _count_heap_walks(monkeypatch)
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    assert walks == []
    server.attachment("admin").memory.top(limit=1)
    assert walks == [1]


def test_a_memory_baseline_walks_the_heap_once(monkeypatch):
    """A baseline is one heap walk (pympler's SummaryTracker walked twice: once when made)."""
    walks = _count_heap_walks(monkeypatch)
    diagnostics.MemoryTracker().set_baseline()
    assert walks == [1]


@pytest.mark.usefixtures("frozen_heap")
def test_heap_summary_gives_pymplers_rows():
    """heap_summary names and counts objects as pympler's summarize(muppy.get_objects()) does."""
    from pympler import muppy, summary

    class Counted:
        pass

    def made_here():
        pass

    kept = [Counted() for _ in range(3000)]
    module = types.ModuleType("made_in_this_test")
    name = f"{__name__}.{Counted.__qualname__}"
    ours = {row[0]: row for row in diagnostics.heap_summary()}
    theirs = {row[0]: row for row in summary.summarize(muppy.get_objects())}
    assert ours[name] == theirs[name] == [name, 3000, 3000 * sys.getsizeof(kept[0])]
    assert ours["function (made_here)"][1] == theirs["function (made_here)"][1] >= 1
    assert ours["module(made_in_this_test)"] == theirs["module(made_in_this_test)"] == \
        ["module(made_in_this_test)", 1, sys.getsizeof(module)]
