"""Lab 6's limiters on their own, and the project's pytest plugin on its two handlers."""

from __future__ import annotations

import socket
import threading

import pytest

from connserver import TokenBucket
from connserver.lab.rate_limiter import (BucketLimitedEcho, TickerLimitedEcho, TickerRateLimiter,
                                         Tickers)
from connserver.testing import FakeClock, LeakError, assert_no_leaks, wait_for

# Threads are what this lab is about; the memory verdict's pympler census would cost seconds.
QUICK = dict(cycles=3, warmup=1, settle_timeout=0.5, noise_blocks=10**9)
REQUESTS = 5   # within the burst both limiters start with: no cycle waits for a token


def _tickers_alive() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.endswith("(_tick)")]


def _end_tickers(tickers: Tickers) -> None:
    tickers.close()
    for thread in _tickers_alive():
        thread.join(10)
    assert not _tickers_alive()


def test_every_ticker_limiter_leaves_its_thread_running():
    """Three limiters used and dropped: three ticker threads still tick, until the bound stops them."""
    tickers = Tickers(max_tickers=10)
    try:
        for _ in range(3):
            limiter = TickerRateLimiter(5, tickers)
            for _ in range(5):
                limiter.acquire()   # the burst: nothing waits
            del limiter
        assert wait_for(lambda: tickers.live == 3)
        assert len(_tickers_alive()) == 3
    finally:
        _end_tickers(tickers)


def test_a_token_bucket_needs_no_thread_and_refills_at_its_rate():
    """TokenBucket(20, burst=20): no thread; the burst, then 20 tokens for each second that passes."""
    clock = FakeClock()
    before = threading.active_count()
    bucket = TokenBucket(20, burst=20, clock=clock)
    assert bucket.acquire_nowait(20) and not bucket.acquire_nowait(1)
    clock.advance(0.5)
    assert bucket.acquire_nowait(10) and not bucket.acquire_nowait(1)
    assert threading.active_count() == before


def _workload(server):
    def workload():
        with socket.create_connection(server.server_address[:2], timeout=10) as client:
            with client.makefile("rb") as replies:
                for n in range(REQUESTS):
                    client.sendall(f"ping {n}\n".encode())
                    assert replies.readline() == f"ping {n}\n".encode()
    return workload


def test_the_plugin_fails_the_ticker_limited_handler(connserver_server):
    """assert_no_leaks names the ticker thread each connection of TickerLimitedEcho left behind."""
    server = connserver_server(TickerLimitedEcho, min_spare_threads=0, max_spare_threads=0)
    try:
        with pytest.raises(LeakError, match=r"thread 'Thread-\* \(_tick\)'"):
            assert_no_leaks(_workload(server), **QUICK)
    finally:
        _end_tickers(server.resource("lab-tickers", lambda: Tickers(0)))


def test_the_plugin_passes_the_bucket_limited_handler(connserver_server):
    """The same workload against BucketLimitedEcho leaves nothing behind."""
    server = connserver_server(BucketLimitedEcho, min_spare_threads=0, max_spare_threads=0)
    assert_no_leaks(_workload(server), **QUICK)
