"""Shared fixtures. Every test in this suite runs under the leak check."""

from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

import connserver
from connserver.testing import wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # connserver's own suite holds itself to the plugin's leak check, every test.
    for item in items:
        item.add_marker(pytest.mark.connserver_leakcheck)


@pytest.fixture
def socketpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def serve(connserver_server):
    """serve(HandlerClass, **config) -> started Server on 127.0.0.1:0 (the plugin's fixture)."""
    return connserver_server


def connect(server: connserver.Server, source: str | None = None, timeout: float = 10.0) -> socket.socket:
    """A client socket to ``server`` with a safety-net timeout."""
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    return sock


def wait_closed(server: connserver.Server, total: int, timeout: float = 10.0) -> connserver.ServerStatistics:
    """Wait until ``total`` connections have ended; return the stats."""
    def done():
        stats = server.stats()
        return stats if sum(stats.close_reasons.values()) >= total and \
            stats.connections_active == 0 else None
    stats = wait_for(done, timeout)
    assert stats, f"connections did not end: {server.stats()}"
    return stats


class Recorder:
    """Collects what handlers report, from their threads, for assertions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list = []
        self.event = threading.Event()

    def add(self, item) -> None:
        with self.lock:
            self.items.append(item)
        self.event.set()
