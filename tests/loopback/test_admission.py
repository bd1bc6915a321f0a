"""Run slots (Config.max_running): FIFO admission, the overdue valve, no slot held while blocked."""

from __future__ import annotations

import socket
import threading

import pytest

import connserver
from connserver.core.run_slots import RunGate
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for
from tests.conftest import connect
from tests.loopback.test_server import roundtrip


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size and (chunk := sock.recv(size - len(received))):
        received += chunk
    return received


def held_ticket() -> threading.Lock:
    ticket = threading.Lock()
    ticket.acquire()
    return ticket


def test_waiters_are_admitted_in_arrival_order():
    """With every slot taken, threads queue and each leave() hands the slot to the oldest."""
    gate = RunGate(1, overdue=30.0)
    gate.enter(held_ticket())                     # the slot is ours
    admitted: list[str] = []

    def worker(name: str) -> None:
        gate.enter(held_ticket())
        admitted.append(name)

    threads = []
    for count, name in enumerate("abc", start=1):
        thread = threading.Thread(target=worker, args=(name,))
        thread.start()
        threads.append(thread)
        assert wait_for(lambda: gate.statistics().waiting == count)   # queued in this order
    for count in range(1, 4):
        gate.leave()                              # hand the slot on...
        assert wait_for(lambda: len(admitted) == count)
    for thread in threads:
        thread.join(5)
    assert admitted == ["a", "b", "c"]
    stats = gate.statistics()
    assert (stats.running, stats.waiting, stats.waited, stats.overdue) == (1, 0, 3, 0)
    gate.leave()
    assert gate.statistics().running == 0


def test_a_thread_waiting_past_overdue_goes_in_anyway():
    """A slot held by code blocked elsewhere cannot stall the others for longer than overdue."""
    gate = RunGate(1, overdue=0.02)
    gate.enter(held_ticket())
    done = threading.Event()
    thread = threading.Thread(target=lambda: (gate.enter(held_ticket()), done.set()))
    thread.start()
    assert done.wait(5)
    thread.join(5)
    stats = gate.statistics()
    assert stats.overdue == 1 and stats.running == 2 and stats.waiting == 0
    gate.leave()
    gate.leave()
    assert gate.statistics().running == 0


def test_max_running_must_be_positive():
    with pytest.raises(connserver.ConfigError):
        connserver.Config(max_running=0)


def test_busy_connections_share_one_slot_and_all_are_served(serve):
    """max_running=1 with eight clients in flight: every round trip completes, slots balance."""
    server = serve(EchoHandler, max_running=1)
    server.run_gate.overdue = 30.0   # only FIFO hand-offs admit threads here
    clients = [connect(server) for _ in range(8)]
    try:
        assert wait_for(lambda: server.run_gate.connections == 8)
        for round_number in range(20):
            for client in clients:
                client.sendall(b"r%02d" % round_number)
            for client in clients:
                assert recv_exactly(client, 3) == b"r%02d" % round_number
        assert wait_for(lambda: server.run_gate.statistics().running == 0)
        stats = server.run_gate.statistics()
        assert stats.waiting == 0 and stats.overdue == 0
    finally:
        for client in clients:
            client.close()


class FloodOrEcho(connserver.Handler):
    """b"flood" makes it write far more than a non-reading client can take; else echo."""

    def handle(self) -> None:
        while data := self.conn.recv():
            self.conn.sendall(b"x" * (16 * 1024 * 1024) if data == b"flood" else data)


def test_a_write_blocked_on_a_full_window_holds_no_slot(serve):
    """One slot, and the connection holding it blocks writing to a client that never reads:
    another connection is still served at once (the slot went back before the write blocked)."""
    server = serve(FloodOrEcho, max_running=1, write_timeout=30.0)
    server.run_gate.overdue = 30.0   # so only a slot given back can let the echo through
    with connect(server) as stalled, connect(server) as honest:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert wait_for(lambda: server.run_gate.connections == 2)
        stalled.sendall(b"flood")
        assert wait_for(lambda: any(info.operation == "write" for info in server.connections()))
        honest.settimeout(10)
        assert roundtrip(honest, b"hello") == b"hello"
        assert server.run_gate.statistics().overdue == 0



SLOT_HELD_AFTER_WRITE: list[bool] = []


class BigReply(connserver.Handler):
    """Replies with more than the client's window takes at once, then notes its run slot."""

    def handle(self) -> None:
        while self.conn.recv():
            self.conn.sendall(b"y" * (16 * 1024 * 1024))
            SLOT_HELD_AFTER_WRITE.append(self.conn.run_slot.held)


def test_a_write_that_had_to_wait_takes_its_slot_back(serve):
    """The slot given back while a write waits for the peer is taken again after it."""
    SLOT_HELD_AFTER_WRITE.clear()
    server = serve(BigReply, max_running=1)
    with socket.socket() as slow, connect(server) as _other:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(10)
        slow.connect(server.server_address)
        assert wait_for(lambda: server.run_gate.connections == 2)
        slow.sendall(b"go")
        assert recv_exactly(slow, 16 * 1024 * 1024) == b"y" * (16 * 1024 * 1024)
        assert wait_for(lambda: SLOT_HELD_AFTER_WRITE == [True])
