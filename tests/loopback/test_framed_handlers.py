"""FramedHandler and LineHandler on a real server: frames, limits, deadlines."""

from __future__ import annotations

import pytest

import socket
import struct
import time

import connserver
from connserver.apps.echo import FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed mid-frame"
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!I", read_exactly(sock, 4))
    return read_exactly(sock, size)


def test_framed_echo_round_trips_frames_of_any_size(serve):
    """Frames come back whole, whatever their size and however they were split."""
    server = serve(FramedEchoHandler, max_frame_size=200_000)
    with connect(server) as client:
        for size in (0, 1, 100, 70_000, 200_000):
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            data = struct.pack("!I", size) + payload
            client.sendall(data[:3])
            client.sendall(data[3:])
            assert read_frame(client) == payload
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_oversized_frame_closes_with_frame_too_large_at_once(serve):
    """A prefix over max_frame_size ends the connection before any body is read."""
    server = serve(FramedEchoHandler, max_frame_size=1000)
    with connect(server) as client:
        client.sendall(b"\xff\xff\xff\xff")
        assert client.recv(1) == b""
    with connect(server) as client:
        client.sendall(struct.pack("!I", 1001))
        assert client.recv(1) == b""
    assert wait_closed(server, 2).close_reasons == {"frame_too_large": 2}


def test_stalled_frame_meets_the_read_deadline(serve):
    """A prefix that declares 1,000 bytes and delivers 10 is cut at read_timeout."""
    server = serve(FramedEchoHandler, idle_timeout=10.0, read_timeout=0.3)
    with connect(server) as client:
        assert wait_for(lambda: server.stats().connections_active == 1)
        started = time.monotonic()
        client.sendall(struct.pack("!I", 1000) + b"x" * 10)
        assert client.recv(1) == b""
        assert 0.25 <= time.monotonic() - started < 1.5
    assert wait_closed(server, 1).close_reasons == {"read_deadline": 1}
    assert server.buffer_pool.statistics().leased == 0


def test_send_frames_coalesces_with_scatter_gather(serve):
    """send_frames() writes many frames in one go, each intact."""
    class Burst(connserver.FramedHandler):
        def handle_frame(self, frame):
            count = int(frame)
            self.conn.send_frames(str(i).encode() * 3 for i in range(count))
            return None

    server = serve(Burst)
    with connect(server) as client:
        client.sendall(struct.pack("!I", 4) + b"2000")
        for i in range(2000):
            assert read_frame(client) == str(i).encode() * 3


def test_line_handler_replies_and_strips_crlf(serve):
    """LineHandler hands over decoded lines without CR/LF and sends replies as lines."""
    class Upper(connserver.LineHandler):
        max_line = 64

        def handle_line(self, line):
            return line.upper()

    server = serve(Upper)
    with connect(server) as client:
        client.sendall(b"hello\r\nwor")
        client.sendall(b"ld\n")
        received = b""
        while received.count(b"\n") < 2:
            received += client.recv(100)
        assert received == b"HELLO\nWORLD\n"
        client.sendall(b"x" * 100)
        assert client.recv(100) == b""
    assert wait_closed(server, 1).close_reasons == {"frame_too_large": 1}
