"""The server's long-lived threads survive what one connection's work throws at them.

A server must never look alive while a thread it needs is dead: the accept
loop, the watchdog, a hub's writer and the shutdown each get a fault they did
not expect (including the huge-timeout overflows that used to kill them) and
must carry on, with the fault logged once and counted in ``internal_errors``.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import connserver
from connserver import CancelToken, CloseReason, Hub, Watchdog
from connserver.apps.echo import EchoHandler
from connserver.core.faults import Faults
from connserver.testing import FakeClock, wait_for
from tests.conftest import connect


class Target:
    """What the watchdog needs from a connection, and nothing else."""

    def __init__(self) -> None:
        self.cancel_token = CancelToken()
        self.operation = None
        self.aborted = threading.Event()

    def abort(self, force: bool = False) -> bool:
        self.aborted.set()
        return False


def test_faults_are_logged_once_per_kind_and_always_counted(caplog):
    """The same fault twice: one ERROR with a traceback, one DEBUG line, two counts."""
    counted = []
    faults = Faults("test", logging.getLogger("connserver.test"), counted.append)
    for _ in range(2):
        try:
            {}["missing"]
        except KeyError as exc:
            faults.record(exc)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and faults.count == 2
    assert counted == ["test", "test"]


def test_a_far_future_expiry_does_not_kill_the_watchdog():
    """A lifetime 1e10 s away (past threading.TIMEOUT_MAX) leaves the watchdog working."""
    watchdog = Watchdog(name="connserver-watchdog-test")
    watchdog.start()
    try:
        far, near = Target(), Target()
        watchdog.watch(far, 1e10)
        watchdog.poke()
        near.cancel_token = CancelToken(on_cancel=lambda: watchdog.abort_soon(near))
        near.cancel_token.cancel()
        assert near.aborted.wait(10), "the watchdog stopped serving"
    finally:
        assert watchdog.stop(10)


def test_the_watchdog_survives_a_fault_and_counts_it():
    """An exception escaping the watchdog's own bookkeeping is counted; it keeps going."""
    clock = FakeClock()
    calls = {"n": 0}

    def flaky_clock() -> float:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("clock glitch")
        return clock()

    counted = []
    watchdog = Watchdog(name="connserver-watchdog-test", clock=flaky_clock,
                        on_fault=counted.append)
    watchdog.start()
    try:
        targets = [Target() for _ in range(3)]
        for target in targets:
            watchdog.watch(target, clock() + 1)
        clock.advance(2)
        for _ in range(3):   # the fault may swallow one wake-up: poke again
            watchdog.poke()
            if wait_for(lambda: all(t.cancel_token.cancelled for t in targets), 1):
                break
        assert all(t.cancel_token.reason is CloseReason.LIFETIME for t in targets)
        assert counted == ["watchdog"] and watchdog.faults.count == 1
    finally:
        assert watchdog.stop(10)


@pytest.mark.parametrize("error", [OverflowError, RuntimeError])
def test_the_accept_loop_survives_a_fault_admitting_one_connection(serve, monkeypatch, error):
    """A non-OSError while admitting one connection (OverflowError: the timeval of a
    huge timeout; RuntimeError: any bug) loses that connection, not the accept loop."""
    from connserver.core import accepting as server_module

    real = server_module.set_kernel_timeouts
    failures = iter([True])

    def fail_once(sock, receive, send):
        if next(failures, False):
            raise error("injected")
        real(sock, receive, send)

    monkeypatch.setattr(server_module, "set_kernel_timeouts", fail_once)
    server = serve(EchoHandler)
    with connect(server) as first:
        try:
            first.sendall(b"x")
            assert first.recv(10) == b""   # refused without an echo
        except ConnectionResetError:
            pass
    with connect(server) as second:
        second.sendall(b"ping")
        assert second.recv(10) == b"ping"
    if error is RuntimeError:   # unexpected: logged and counted as an internal error
        assert server.stats().internal_errors == {"accept": 1}


def test_a_writer_blocked_for_a_huge_write_timeout_keeps_serving_others():
    """A hub whose write_timeout is 1e10 s: a blocked subscriber must not kill the writer
    (epoll's timeout overflowed); the other subscriber still gets every message."""
    config = connserver.Config()
    pool = connserver.BufferPool(4096, 1)
    pairs = [socket.socketpair() for _ in range(2)]
    stalled_side, stalled_client = pairs[0]
    stalled_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stalled_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conns = [connserver.Connection(side, "peer", id=i, config=config, pool=pool)
             for i, (side, _) in enumerate(pairs)]
    hub = Hub(name="huge", max_queue_bytes=1 << 22, write_timeout=1e10)
    try:
        with hub.subscribe(conns[0]), hub.subscribe(conns[1]):
            reader = pairs[1][1]
            reader.settimeout(10)
            for index in range(200):
                hub.publish(b"%04d" % index + b"x" * 996)
                received = b""
                while len(received) < 1000:
                    received += reader.recv(1000 - len(received))
                assert received.startswith(b"%04d" % index)
            assert hub.faults.count == 0
    finally:
        assert hub.close()
        for conn in conns:
            conn.close()
        for _, client in pairs:
            client.close()


def test_a_huge_grace_does_not_crash_the_shutdown(serve):
    """shutdown(grace=1e10) waits for the live connection, then returns a report."""
    server = serve(EchoHandler)
    client = connect(server)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    reports = []
    errors = []

    def drain():
        try:
            reports.append(server.shutdown(grace=1e10))
        except BaseException as exc:   # the old overflow: recorded, so the test can say so
            errors.append(exc)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        assert client.recv(1) == b""   # cancelled by the drain
    finally:
        client.close()
        thread.join(10)
    assert not thread.is_alive() and not errors, errors
    assert reports[0].drained == 1
