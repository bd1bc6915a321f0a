"""The WebSocket close code in the books, both modes: the access-log line carries
``ws_close=<code>`` (a handler's extra access-log field) and the stats and /metrics
count connections by it (``close_codes``)."""

from __future__ import annotations

import json
import logging

import pytest
from websockets.exceptions import ConnectionClosed

import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler
from tests.conftest import connect as tcp_connect, wait_closed
from tests.loopback.test_admin import get
from tests.loopback.test_websocket import SAFETY, client

pytestmark = pytest.mark.both_modes


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "connserver.access"]


def test_client_close_code_is_logged_and_counted(serve, caplog):
    """The client's close code (4001) and a server close() (4002) each end up as
    ws_close=... on the access-log line and in stats().close_codes."""
    caplog.set_level(logging.INFO, logger="connserver.access")

    class Bye(WebSocketEchoHandler):
        def handle_message(self, message):
            if message == "bye":
                self.close(4002, "as asked")
                return None
            return message

    server = serve(Bye)
    with client(server) as ws:
        ws.close(4001, "done")
    with client(server) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=SAFETY)
    stats = wait_closed(server, 2)
    assert stats.close_codes == {4001: 1, 4002: 1}
    lines = access_lines(caplog)
    assert len(lines) == 2
    assert any("reason=eof" in line and line.endswith(" ws_close=4001") for line in lines), lines
    assert any("reason=closed" in line and line.endswith(" ws_close=4002") for line in lines), lines


def test_close_codes_in_stats_and_metrics_endpoints(serve):
    """/stats has close_codes by code; /metrics has connserver_close_codes_total{code=...};
    a connection that never became a WebSocket, or a plain handler, counts no code."""
    server = serve(WebSocketEchoHandler, admin_address="127.0.0.1:0")
    with client(server) as ws:
        ws.close(1000)
    with tcp_connect(server) as sock:   # not an upgrade: HTTP 400, no close code
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    stats = wait_closed(server, 2)
    assert stats.close_codes == {1000: 1}
    status, _, body = get(server, "/stats")
    assert status == 200 and json.loads(body)["close_codes"] == {"1000": 1}
    status, _, body = get(server, "/metrics")
    assert status == 200 and 'connserver_close_codes_total{code="1000"} 1\n' in body


def test_handlers_without_a_close_code_log_no_extra_field(serve, caplog):
    """A line handler's access-log line is as before: no ws_close, no close_codes."""
    caplog.set_level(logging.INFO, logger="connserver.access")

    class Echo(connserver.LineHandler):
        def handle_line(self, line):
            return line

    server = serve(Echo)
    with tcp_connect(server) as sock:
        sock.sendall(b"hi\n")
        assert sock.recv(10) == b"hi\n"
    assert wait_closed(server, 1).close_codes == {}
    [line] = access_lines(caplog)
    assert line.endswith("reason=eof"), line
