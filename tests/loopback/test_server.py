"""Servers on 127.0.0.1 port 0: lifecycle, deadlines, cancellation, limits, failures."""

from __future__ import annotations

import errno
import gc
import logging
import socket
import threading
import time
import weakref

import pytest

import connserver
from connserver import CloseReason
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for
from tests.conftest import Recorder, connect, unavailable, wait_closed


def roundtrip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_echo_round_trip_and_stats(serve, caplog):
    """A client is served, counted, and logged once on connserver.access when it leaves."""
    caplog.set_level(logging.INFO, logger="connserver.access")
    server = serve(EchoHandler)
    with connect(server) as client:
        assert roundtrip(client, b"hello") == b"hello"
        infos = wait_for(lambda: [i for i in server.connections() if i.operation == "idle"])
        assert infos[0].bytes_in == 5 and infos[0].bytes_out == 5
        assert infos[0].deadline_remaining is not None
        names = [t.name for t in threading.enumerate()]
        assert f"connserver-conn-{infos[0].id}" in names
        assert "connserver-watchdog" in names and "connserver-accept" in names
    stats = wait_closed(server, 1)
    assert stats.connections_total == 1 and stats.close_reasons == {"eof": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "connserver.access"]
    assert len(lines) == 1 and "reason=eof" in lines[0] and "bytes_in=5" in lines[0]


def test_handler_exception_is_logged_once_and_stays_local(serve, caplog):
    """A raising handler ends only its connection (reason error); others keep working."""
    class Faulty(connserver.Handler):
        def handle(self):
            if self.conn.recv() == b"boom":
                raise ValueError("handler bug")
            self.conn.sendall(b"fine")

    server = serve(Faulty)
    with connect(server) as good, connect(server) as bad:
        bad.sendall(b"boom")
        assert bad.recv(10) == b""
        good.sendall(b"hi")
        assert good.recv(10) == b"fine"
    stats = wait_closed(server, 2)
    assert stats.close_reasons["error"] == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "connserver.conn"
    assert errors[0].exc_info and "handler bug" in str(errors[0].exc_info[1])


def test_peer_reset_is_an_ordinary_close_without_traceback(serve, caplog):
    """A peer RST while the handler writes is reason reset, logged at INFO, no traceback."""
    started = threading.Event()

    class Streamer(connserver.Handler):
        def handle(self):
            self.conn.recv()
            started.set()
            while True:
                self.conn.sendall(b"x" * 65536)

    caplog.set_level(logging.INFO)
    server = serve(Streamer)
    client = connect(server)
    client.sendall(b"go")
    assert started.wait(10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"reset": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_silent_peer_is_closed_at_idle_timeout(serve):
    """A peer that never sends is closed with reason idle, close to idle_timeout."""
    server = serve(EchoHandler, idle_timeout=0.2)
    with connect(server) as client:
        started = time.monotonic()
        assert client.recv(1) == b""
        assert 0.15 <= time.monotonic() - started < 1.5
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"idle": 1}
    assert stats.deadline_hits == {"idle": 1}


def test_slowloris_is_closed_at_the_read_deadline(serve):
    """One byte every 0.2 s inside a message: closed at read_timeout (read_deadline)."""
    class Fixed(connserver.Handler):
        def handle(self):
            while message := self.conn.recv_exactly(100):
                self.conn.sendall(message)

    server = serve(Fixed, idle_timeout=5.0, read_timeout=0.5)
    with connect(server) as client:
        assert wait_for(lambda: server.stats().connections_active == 1)
        started = time.monotonic()
        client.sendall(b"x")
        closed_at = None
        for _ in range(20):   # at most 4 s of trickling
            if wait_for(lambda: server.stats().connections_active == 0, 0.2):
                closed_at = time.monotonic()
                break
            try:
                client.sendall(b"x")
            except OSError:
                break
        stats = wait_closed(server, 1)
        closed_at = closed_at or time.monotonic()
    assert stats.close_reasons == {"read_deadline": 1}
    assert 0.5 <= closed_at - started < 1.2


def test_peer_that_never_reads_meets_the_write_deadline(serve):
    """A zero-window peer stops a writer at write_timeout (write_deadline)."""
    class Flood(connserver.Handler):
        def handle(self):
            self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.conn.recv()
            self.conn.sendall(b"x" * (16 * 1024 * 1024))

    server = serve(Flood, write_timeout=0.3)
    with connect(server) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"go")
        stats = wait_closed(server, 1)
    assert stats.close_reasons == {"write_deadline": 1}


def test_operator_cancel_wakes_a_blocked_handler(serve):
    """server.cancel(id) ends a connection blocked in recv at once (reason cancelled)."""
    recorder = Recorder()

    class Waiter(connserver.Handler):
        def handle(self):
            self.conn.recv()

        def connection_closed(self, reason):
            recorder.add(reason)

    server = serve(Waiter, idle_timeout=60.0)
    with connect(server) as client:
        info = wait_for(lambda: [i for i in server.connections() if i.operation == "idle"])
        started = time.monotonic()
        assert server.cancel(info[0].id)
        assert recorder.event.wait(10)
        assert time.monotonic() - started < 0.1
        assert client.recv(1) == b""
    assert recorder.items == [CloseReason.CANCELLED]
    assert not server.cancel(info[0].id)


def test_max_lifetime_recycles_connections(serve):
    """A connection older than max_lifetime is cancelled with reason lifetime."""
    server = serve(EchoHandler, idle_timeout=60.0, max_lifetime=0.2, lifetime_jitter=0.0)
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
        started = time.monotonic()
        assert client.recv(1) == b""
        assert time.monotonic() - started < 1.0
    assert wait_closed(server, 1).close_reasons == {"lifetime": 1}


def test_max_connections_rejects_extras_at_once(serve):
    """Past max_connections, new clients are closed at once and counted as limit."""
    server = serve(EchoHandler, max_connections=2)
    clients = [connect(server) for _ in range(2)]
    try:
        for client in clients:
            assert roundtrip(client) == b"ping"
        extras = [connect(server) for _ in range(3)]
        for extra in extras:
            assert extra.recv(1) == b""
            extra.close()
        stats = server.stats()
        assert stats.connections_rejected == 3 and stats.close_reasons["limit"] == 3
        assert stats.handler_threads <= 2
        assert roundtrip(clients[0]) == b"ping"
    finally:
        for client in clients:
            client.close()
    wait_closed(server, 5)


def test_on_limit_wait_leaves_clients_in_the_backlog(serve):
    """With on_limit='wait', a client over the cap is served once a slot frees."""
    server = serve(EchoHandler, max_connections=1, on_limit="wait")
    first = connect(server)
    assert roundtrip(first) == b"ping"
    with connect(server) as second:
        second.sendall(b"queued")
        second.settimeout(0.2)
        with pytest.raises(socket.timeout):
            second.recv(10)
        first.close()
        second.settimeout(10)
        assert second.recv(10) == b"queued"
    assert server.stats().connections_rejected == 0
    wait_closed(server, 2)


def test_per_ip_limit_is_per_address_and_its_table_empties(serve):
    """max_connections_per_ip counts each address apart; the table drops empty entries."""
    server = serve(EchoHandler, max_connections_per_ip=1)
    a1 = connect(server, source="127.0.0.2")
    b1 = connect(server, source="127.0.0.3")
    try:
        assert roundtrip(a1) == b"ping" and roundtrip(b1) == b"ping"
        with connect(server, source="127.0.0.2") as a2:
            assert a2.recv(1) == b""
        assert server.limiter.addresses_tracked() == 2
    finally:
        a1.close()
        b1.close()
    wait_closed(server, 3)
    assert server.limiter.addresses_tracked() == 0


def test_graceful_shutdown_lets_handlers_say_goodbye(serve):
    """shutdown() closes the listener at once, cancels with reason shutdown, drains."""
    recorder = Recorder()

    class Polite(connserver.Handler):
        def handle(self):
            try:
                while data := self.conn.recv():
                    self.conn.sendall(data)
            except connserver.Cancelled:
                self.conn.send_goodbye(b"bye\n")
                raise

        def connection_closed(self, reason):
            recorder.add(reason)

    server = serve(Polite, idle_timeout=60.0)
    address = server.server_address
    clients = [connect(server) for _ in range(3)]
    try:
        for client in clients:
            assert roundtrip(client) == b"ping"
        report = server.shutdown(grace=5.0)
        assert report.connections_at_start == 3 and report.drained == 3
        assert report.forced == 0 and report.clean and report.duration < 1.0
        for client in clients:
            assert client.recv(10) == b"bye\n"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
    finally:
        for client in clients:
            client.close()
    assert recorder.items == [CloseReason.SHUTDOWN] * 3
    assert threading.active_count() == 1 or not [
        t for t in threading.enumerate() if t.name.startswith("connserver-")]


def test_shutdown_forces_and_reports_a_stuck_handler(serve, caplog, stubborn):
    """A handler that ignores cancellation is forced, then reported with its stack."""
    server = serve(stubborn.handler)
    caplog.set_level(logging.INFO, logger="connserver.access")
    with connect(server):
        assert stubborn.entered.wait(10)
        report = server.shutdown(grace=0.1)
    # Forced, and of the forced, stuck: the counts agree with each other.
    assert report.drained == 0 and report.forced == 1 and len(report.stuck) == 1
    assert report.stuck[0].name.startswith("connserver-conn-")
    assert "release.wait" in report.stuck[0].stack
    assert any("still alive after shutdown" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)
    # The stuck connection still gets its access-log line.
    assert any("reason=shutdown stuck" in r.getMessage() for r in caplog.records
               if r.name == "connserver.access")


def test_a_grace_cut_short_is_logged_as_such(serve, caplog, stubborn):
    """force() during the grace: the log says the grace was cut short, not that it ran out."""
    server = serve(stubborn.handler)
    with connect(server):
        assert stubborn.entered.wait(10)
        timer = threading.Timer(0.1, server.force)
        timer.start()
        try:
            report = server.shutdown(grace=30.0)
        finally:
            stubborn.release.set()
            timer.join(10)
    assert report.duration < 10 and report.forced == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "connserver.server"]
    assert any("grace was cut short" in m for m in messages), messages
    assert not any("after the 30.0 s grace" in m for m in messages)

def test_shutdown_wakes_the_accept_loop_at_once(serve):
    """The accept loop blocks without polling and still stops immediately."""
    server = serve(EchoHandler)
    started = time.monotonic()
    report = server.shutdown(grace=1.0)
    assert report.clean and time.monotonic() - started < 0.5
    assert not [t for t in threading.enumerate() if t.name.startswith("connserver-")]


def test_finished_handlers_and_connections_are_freed(serve):
    """Nothing keeps a finished handler or connection alive."""
    refs = []

    class Tracked(EchoHandler):
        def setup(self):
            refs.append(weakref.ref(self))
            refs.append(weakref.ref(self.conn))

    server = serve(Tracked)
    for _ in range(5):
        with connect(server) as client:
            assert roundtrip(client) == b"ping"
    wait_closed(server, 5)
    gc.collect()
    assert len(refs) == 10 and all(ref() is None for ref in refs)


def test_ipv6_loopback(serve):
    """The server listens on ::1 when given an IPv6 address."""
    if not socket.has_ipv6:
        unavailable("no IPv6 in this Python build")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        unavailable("::1 not configured on this host")
    server = serve(EchoHandler, address=("::1", 0))
    with socket.create_connection(server.server_address[:2], timeout=10) as client:
        assert roundtrip(client) == b"ping"
    wait_closed(server, 1)


def test_accept_resource_errors_back_off_and_log_once(serve, caplog, monkeypatch):
    """EMFILE from accept() is logged once per burst and waited out, never spun on."""
    server = serve(EchoHandler)
    waits = []
    monkeypatch.setattr(server._stopping, "wait", lambda timeout: waits.append(timeout))

    class Exhausted:
        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")

    for _ in range(5):
        server._acceptor.accept_burst(Exhausted())
    assert waits == [0.1] * 5
    logged = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert len(logged) == 1


def test_churn_mixed_with_deadlines_and_failures_returns_to_baseline(serve):
    """2,000 round trips, 200 idle-deadline cuts and 200 raising handlers leak nothing."""
    class Mixed(connserver.Handler):
        def handle(self):
            data = self.conn.recv()
            if data == b"raise":
                raise RuntimeError("expected failure")
            if data == b"wait":
                self.conn.recv()   # the client stays silent: idle deadline
                return
            self.conn.sendall(data)
            self.conn.recv()       # the client closes: eof

    server = serve(Mixed, idle_timeout=0.3, spare_thread_timeout=0.5, min_spare_threads=0)
    baseline_threads = {t.ident for t in threading.enumerate()}
    baseline_fds = set(connserver.testing.open_fds())
    for _ in range(2000):
        with connect(server) as client:
            assert roundtrip(client) == b"ping"
    waiting = [connect(server) for _ in range(200)]
    for client in waiting:
        client.sendall(b"wait")
    for _ in range(200):
        with connect(server) as client:
            client.sendall(b"raise")
            assert client.recv(1) == b""
    for client in waiting:
        assert client.recv(1) == b""
        client.close()
    stats = wait_closed(server, 2400)
    assert stats.close_reasons == {"eof": 2000, "idle": 200, "error": 200}
    started = time.monotonic()
    assert wait_for(lambda: {t.ident for t in threading.enumerate()} <= baseline_threads, 2.0)
    assert wait_for(lambda: set(connserver.testing.open_fds()) <= baseline_fds, 2.0)
    assert time.monotonic() - started <= 2.0
    assert server.connections() == [] and server.limiter.addresses_tracked() == 0
    assert server.buffer_pool.statistics().leased == 0
