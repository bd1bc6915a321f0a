"""Regression tests for lifecycle edge cases found in review."""

from __future__ import annotations

import signal
import threading
import time

import connserver
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_server import roundtrip


def test_shutdown_from_a_signal_handler_in_the_serving_thread():
    """A daemon's SIGALRM/SIGTERM handler may call shutdown() while serve_forever runs."""
    server = connserver.Server(("127.0.0.1", 0), EchoHandler)
    reports = []

    def on_alarm(signum, frame):
        reports.append(server.shutdown(grace=1.0))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        server.serve_forever()
        assert time.monotonic() - started < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        server.server_close()
    assert reports and reports[0].clean
    assert server.socket.fileno() == -1


def test_a_failed_thread_start_does_not_stop_accepting(serve, monkeypatch):
    """If a handler thread cannot start, that client is refused and the next one served."""
    server = serve(EchoHandler)
    acceptor = server._acceptor
    real_submit = acceptor._submit
    calls = []

    def failing_once(job):
        calls.append(job)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        real_submit(job)

    monkeypatch.setattr(acceptor, "_submit", failing_once)
    with connect(server) as refused:
        assert refused.recv(1) == b""
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
    assert server.stats().connections_rejected == 1
    wait_closed(server, 2)


def test_a_handler_may_shut_its_own_server_down(serve):
    """shutdown() from a handler thread drains the others and does not wait for itself."""
    reports = []

    class Stopper(connserver.Handler):
        def handle(self):
            if self.conn.recv() == b"stop":
                reports.append(self.server.shutdown(grace=2.0))
            else:
                while self.conn.recv():
                    pass

    server = serve(Stopper, idle_timeout=30.0)
    with connect(server) as other, connect(server) as stopper:
        other.sendall(b"x")
        assert wait_for(lambda: server.stats().connections_active == 2)
        started = time.monotonic()
        stopper.sendall(b"stop")
        assert other.recv(1) == b""
        assert wait_for(lambda: reports, 10)
        assert time.monotonic() - started < 2.0
    assert reports[0].clean and reports[0].drained == 1
    assert wait_for(lambda: not [t for t in threading.enumerate()
                                 if t.name == "connserver-watchdog"])


def test_stuck_threads_share_one_join_deadline(serve):
    """Shutdown with several stuck handlers is bounded, not N times the join timeout."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    class Stubborn(connserver.Handler):
        def handle(self):
            entered.release()
            release.wait(10)

    server = serve(Stubborn)
    clients = [connect(server) for _ in range(6)]
    try:
        for _ in clients:
            assert entered.acquire(timeout=10)
        started = time.monotonic()
        report = server.shutdown(grace=0.1)
        assert len(report.stuck) == 6
        assert time.monotonic() - started < 3.0
    finally:
        release.set()
        for client in clients:
            client.close()
        wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("connserver-conn-")])


def test_recovering_from_a_deadline_does_not_decide_the_close_reason(serve):
    """A handler that catches an idle deadline and carries on ends with what came later."""
    class Heartbeat(connserver.Handler):
        def handle(self):
            try:
                self.conn.recv()
            except connserver.DeadlineExceeded:
                self.conn.sendall(b"ping")
            while self.conn.recv():
                pass

    server = serve(Heartbeat, idle_timeout=0.2)
    with connect(server) as client:
        assert client.recv(4) == b"ping"
        client.sendall(b"pong")
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_connection_closed_raising_cancelled_keeps_the_books_right(serve):
    """Even a BaseException from connection_closed() leaves counts consistent."""
    class Odd(EchoHandler):
        def connection_closed(self, reason):
            raise connserver.Cancelled("cancelled")

    server = serve(Odd)
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
    wait_closed(server, 1)
    assert wait_for(lambda: server.stats().handler_threads == 0)
