"""HandlerThreadPool: spares ahead of demand, FIFO hand-off, bounded by max_threads."""

from __future__ import annotations

import threading

from connserver.testing import wait_for
from connserver.core.threads import HandlerThreadPool


def test_jobs_run_with_spares_ahead_and_never_past_max_threads():
    """Spare threads are kept ready, but the total never exceeds max_threads."""
    release = threading.Event()
    started = []

    def run(job):
        started.append(job)
        release.wait(10)

    pool = HandlerThreadPool(run, min_spare=4, max_spare=8, spare_timeout=5.0, max_threads=3)
    pool.start()
    try:
        assert wait_for(lambda: pool.statistics() == (0, 3))   # spares capped at max_threads
        for job in range(3):
            pool.submit(job)
        assert wait_for(lambda: len(started) == 3)
        threads = [t for t in threading.enumerate() if t.name.startswith("connserver-spare")]
        assert len(threads) == 3
    finally:
        release.set()
        assert pool.shutdown(timeout=10.0) == []
    assert sorted(started) == [0, 1, 2]


def test_queued_jobs_get_threads_even_at_the_limit():
    """Jobs queued before any thread exists are all run (no deadlock at max_threads)."""
    done = threading.Semaphore(0)
    pool = HandlerThreadPool(lambda job: done.release(), min_spare=0, max_spare=2,
                             spare_timeout=0.5, max_threads=2)
    pool.submit("a")
    pool.submit("b")
    try:
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        assert pool.shutdown(timeout=10.0) == []

