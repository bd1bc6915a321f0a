"""Rate limits wired into the server: per connection, per address, close or wait."""

from __future__ import annotations

import pytest

import time

import connserver
from connserver.apps.echo import EchoHandler
from tests.conftest import connect, wait_closed

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked


class Upper(connserver.LineHandler):
    def handle_line(self, line):
        return line.upper()


def read_lines(sock, count):
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.splitlines()


def test_close_policy_ends_a_flooding_connection(serve):
    """Past its burst, a line client is closed with reason rate_limited."""
    server = serve(Upper, rate=1.0, burst=3, on_rate_limit="close")
    with connect(server) as client:
        client.sendall(b"a\nb\nc\nd\ne\n")
        assert read_lines(client, 5) == [b"A", b"B", b"C"]
    assert wait_closed(server, 1).close_reasons == {"rate_limited": 1}


def test_wait_policy_paces_messages(serve):
    """With on_rate_limit='wait', messages over the burst are served at the rate."""
    server = serve(Upper, rate=20.0, burst=1, on_rate_limit="wait")
    with connect(server) as client:
        started = time.monotonic()
        client.sendall(b"a\nb\nc\nd\ne\n")
        assert read_lines(client, 5) == [b"A", b"B", b"C", b"D", b"E"]
        assert 0.18 <= time.monotonic() - started < 2.0
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_byte_rate_for_raw_recv(serve):
    """A raw handler is limited in bytes per second."""
    server = serve(EchoHandler, rate=20_000.0, burst=10_000, on_rate_limit="wait")
    with connect(server) as client:
        started = time.monotonic()
        client.sendall(b"x" * 30_000)
        received = 0
        while received < 30_000:
            received += len(client.recv(65536))
        assert 0.9 <= time.monotonic() - started < 3.0
    wait_closed(server, 1)


def test_ip_rate_is_shared_by_an_address_and_the_table_empties(serve):
    """Two connections from one address share its budget; other addresses have their own."""
    server = serve(Upper, ip_rate=2.0, on_rate_limit="close")
    a1 = connect(server, source="127.0.0.2")
    a2 = connect(server, source="127.0.0.2")
    b1 = connect(server, source="127.0.0.3")
    try:
        a1.sendall(b"x\ny\n")
        assert read_lines(a1, 2) == [b"X", b"Y"]
        a2.sendall(b"z\n")
        assert a2.recv(10) == b""
        b1.sendall(b"q\n")
        assert read_lines(b1, 1) == [b"Q"]
    finally:
        for sock in (a1, a2, b1):
            sock.close()
    stats = wait_closed(server, 3)
    assert stats.close_reasons.get("rate_limited") == 1
