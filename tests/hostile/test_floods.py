"""Many connections at once or one after another: caps hold and nothing accumulates."""

from __future__ import annotations

import gc
import logging
import select
import socket
import sys
import threading
import time
import weakref

import pytest

import connserver
from connserver.apps.echo import EchoHandler
from connserver.testing import open_fds, wait_for
from tests.conftest import connect, wait_closed

from .support import (CONN_PREFIX, SPARE_PREFIX, assert_no_leftovers, assert_shutdown_clean,
                      conn_threads, leak_snapshot, read_exactly, rss_bytes)

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked


def roundtrip(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert read_exactly(sock, len(data)) == data


def non_spare_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if not t.name.startswith(SPARE_PREFIX)}


class PeakSampler:
    """Samples the handler-thread counts on a thread of its own until stopped."""

    def __init__(self, server: connserver.Server) -> None:
        self.server = server
        self.peak_threads = 0       # threads serving a connection (connserver-conn-*)
        self.peak_pool = 0          # the handler pool's threads: serving or spare
        self.peak_handlers = 0      # the server's own count of busy handler threads
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler")

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_threads = max(self.peak_threads, len(conn_threads()))
            pool = [t for t in threading.enumerate()
                    if t.name.startswith((CONN_PREFIX, SPARE_PREFIX))]
            self.peak_pool = max(self.peak_pool, len(pool))
            self.peak_handlers = max(self.peak_handlers, self.server.stats().handler_threads)
            self.samples += 1

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10.0)
        assert not self._thread.is_alive()


def test_flood_past_max_connections_never_exceeds_the_cap(serve):
    """5x max_connections at once, 50 rounds: never over the cap, extras refused fast (limit)."""
    cap, rounds, per_round = 10, 50, 50
    before = leak_snapshot()
    server = serve(EchoHandler, max_connections=cap, idle_timeout=30.0)
    baseline = leak_snapshot()
    slowest_refusal = 0.0
    with PeakSampler(server) as sampler:
        baseline_threads = non_spare_threads()
        for round_ in range(rounds):
            clients: list[socket.socket] = []
            try:
                started = time.monotonic()
                clients.extend(connect(server) for _ in range(per_round))
                # The extras are closed by the server at once: they see the end of stream.
                refused: set[socket.socket] = set()
                deadline = started + 10.0
                while len(refused) < per_round - cap and time.monotonic() < deadline:
                    readable, _, _ = select.select([c for c in clients if c not in refused],
                                                   [], [], 0.5)
                    for client in readable:
                        assert client.recv(1) == b""
                        refused.add(client)
                slowest_refusal = max(slowest_refusal, time.monotonic() - started)
                assert len(refused) == per_round - cap
                served = [c for c in clients if c not in refused]
                for client in served:
                    roundtrip(client)
                # A refusal is counted just after its socket is closed: wait for the count.
                rejected = (per_round - cap) * (round_ + 1)
                assert wait_for(lambda: server.stats().connections_rejected == rejected)
                stats = server.stats()
                assert stats.connections_active == cap and stats.handler_threads == cap
            finally:
                for client in clients:
                    client.close()
            # Back to baseline after every round.
            stats = wait_closed(server, per_round * (round_ + 1))
            assert stats.close_reasons == {"limit": (per_round - cap) * (round_ + 1),
                                           "eof": cap * (round_ + 1)}
            assert wait_for(lambda: not conn_threads() and non_spare_threads() == baseline_threads)
            assert wait_for(lambda: open_fds() <= baseline.fds)
    print(f"flood: {rounds} rounds of {per_round} connections at a cap of {cap}: peak "
          f"{sampler.peak_threads} connection threads ({sampler.peak_handlers} by the server's "
          f"count), {sampler.peak_pool} pool threads with the spare ones ({sampler.samples} "
          f"samples); slowest round to refuse its {per_round - cap} extras: "
          f"{slowest_refusal * 1000:.1f} ms")
    assert sampler.peak_threads <= cap and sampler.peak_handlers <= cap
    # Spare threads wait for connections that the cap will refuse anyway: bounded, not more.
    assert sampler.peak_pool <= cap + server.config.min_spare_threads
    assert slowest_refusal < 2.0   # 50 connects and 40 refusals; a deadline would be 30 s
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


def test_per_ip_cap_applies_to_one_address_and_its_table_empties(serve):
    """max_connections_per_ip refuses 127.0.0.2's extras (limit); 127.0.0.3 is unaffected."""
    before = leak_snapshot()
    server = serve(EchoHandler, max_connections_per_ip=2, idle_timeout=30.0)
    baseline = leak_snapshot()
    capped: list[socket.socket] = []
    others: list[socket.socket] = []
    try:
        capped.extend(connect(server, source="127.0.0.2") for _ in range(2))
        for client in capped:
            roundtrip(client)
        for _ in range(3):
            started = time.monotonic()
            with connect(server, source="127.0.0.2") as extra:
                assert extra.recv(1) == b""
            assert time.monotonic() - started < 1.0
        # While 127.0.0.2 is at its cap, 127.0.0.3 gets its own two.
        others.extend(connect(server, source="127.0.0.3") for _ in range(2))
        for client in others:
            roundtrip(client)
        assert server.limiter.addresses_tracked() == 2
        assert server.stats().connections_active == 4
        # A slot freed on 127.0.0.2 is usable again.
        capped.pop().close()
        assert wait_for(lambda: server.stats().connections_active == 3)
        capped.append(connect(server, source="127.0.0.2"))
        roundtrip(capped[-1])
        with connect(server, source="127.0.0.2") as extra:
            assert extra.recv(1) == b""
        for client in capped + others:
            roundtrip(client)
    finally:
        for client in capped + others:
            client.close()
    stats = wait_closed(server, 9)
    assert stats.close_reasons == {"limit": 4, "eof": 5}
    assert stats.connections_rejected == 4
    assert server.limiter.addresses_tracked() == 0
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)


class CountingHandler(logging.Handler):
    """Counts records (and those with a traceback) without keeping them alive."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_level: dict[int, int] = {}
        self.with_traceback = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.by_level[record.levelno] = self.by_level.get(record.levelno, 0) + 1
        self.with_traceback += bool(record.exc_info)


def test_handler_exception_storm_leaves_the_server_serving_and_nothing_behind(serve):
    """1,000 connections whose handler raises: each logged once, server serves on, no leak."""
    handlers: list[weakref.ref] = []

    class Faulty(connserver.Handler):
        def handle(self):
            handlers.append(weakref.ref(self))
            data = self.conn.recv()
            if data == b"boom":
                raise RuntimeError("handler bug, on purpose")
            while data:
                self.conn.sendall(data)
                data = self.conn.recv()

    # The records carry tracebacks that reach the handlers: count them here
    # instead of letting pytest's log capture keep 1,000 of them alive.
    conn_logger = logging.getLogger("connserver.conn")
    counter = CountingHandler()
    conn_logger.addHandler(counter)
    propagate, conn_logger.propagate = conn_logger.propagate, False
    try:
        before = leak_snapshot()
        server = serve(Faulty, idle_timeout=30.0)
        baseline = leak_snapshot()
        with connect(server) as honest:
            roundtrip(honest)
            for _ in range(20):   # 20 waves of 50 raising connections at once
                wave = [connect(server) for _ in range(50)]
                try:
                    for client in wave:
                        client.sendall(b"boom")
                    for client in wave:
                        assert client.recv(1) == b""
                finally:
                    for client in wave:
                        client.close()
                roundtrip(honest)
        stats = wait_closed(server, 1001)
        assert stats.close_reasons == {"error": 1000, "eof": 1}
        assert_no_leftovers(server, baseline)
    finally:
        conn_logger.removeHandler(counter)
        conn_logger.propagate = propagate
    print(f"exception storm: log records by level {counter.by_level}, "
          f"{counter.with_traceback} with a traceback")
    assert counter.by_level.get(logging.ERROR) == 1000 and counter.with_traceback == 1000
    assert not counter.by_level.get(logging.CRITICAL)
    gc.collect()
    assert len(handlers) == 1001
    assert not [ref for ref in handlers if ref() is not None], "handlers kept alive"
    assert_shutdown_clean(server, before)


def test_churn_returns_fds_threads_and_memory_to_baseline(serve):
    """10,000 connect/round-trip/close cycles: fd and thread deltas 0, memory flat."""
    cycles, batch, warmup = 10_000, 1000, 1000
    before = leak_snapshot()
    server = serve(EchoHandler, idle_timeout=30.0, spare_thread_timeout=0.5)
    baseline = leak_snapshot()
    address = server.server_address
    spare = server.config.min_spare_threads

    def settled_threads() -> int:
        # Sequential churn can leave more spare threads than min_spare_threads (a
        # client is back before its last thread is); the extras exit after
        # spare_thread_timeout. That is long enough not to churn threads meanwhile:
        # jobs go round every waiting spare (a FIFO queue), so during the churn none
        # waits more than a few connections' time plus one gc.collect() between batches.
        wait_for(lambda: not conn_threads() and server.stats().spare_threads == spare
                 and server.stats().handler_threads == 0, 10.0)
        return threading.active_count()

    def churn(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(address, timeout=10.0) as client:
                client.sendall(b"ping")
                assert client.recv(16) == b"ping"

    churn(warmup)
    wait_closed(server, warmup)
    gc.collect()
    threads_before, fds_before = settled_threads(), open_fds()
    rss_before, blocks = rss_bytes(), []
    started = time.monotonic()
    for _ in range(cycles // batch):
        churn(batch)
        gc.collect()
        blocks.append(sys.getallocatedblocks())
    elapsed = time.monotonic() - started
    stats = wait_closed(server, warmup + cycles)
    assert stats.close_reasons == {"eof": warmup + cycles}
    rss_growth = rss_bytes() - rss_before
    threads_after = settled_threads()
    wait_for(lambda: open_fds() == fds_before, 5.0)
    fds_after = open_fds()
    fd_delta = len(fds_after) - len(fds_before)
    deltas = [b - a for a, b in zip(blocks, blocks[1:])]
    print(f"churn: {cycles} cycles in {elapsed:.2f} s ({elapsed / cycles * 1e6:.0f} us each); "
          f"fd delta {fd_delta}, thread delta {threads_after - threads_before}, RSS growth "
          f"{rss_growth / 1024:.0f} KiB, allocated-blocks deltas per {batch} cycles {deltas}")
    assert fds_after == fds_before
    assert threads_after == threads_before
    # CPython's refleak rule: a leak grows in every batch, noise does not (the first
    # batch, which follows the thread settling, is its warm-up). The interpreter's
    # own noise is about one block per 1,000 cycles (untraced by tracemalloc), plus
    # swings of ~40 when a spare thread comes or goes; so a batch counts as growing
    # from one block per 100 cycles, and the total must stay under one per 20.
    noise = batch // 100
    assert not all(delta > noise for delta in deltas), f"blocks grew every batch: {deltas}"
    assert blocks[-1] - blocks[0] < len(deltas) * batch // 20, deltas
    assert rss_growth < 4 * 1024 * 1024
    assert_no_leftovers(server, baseline)
    assert_shutdown_clean(server, before)
