"""How a WebSocket's end is recorded and waited for, both modes: the access-log line
carries ``ws_close=<code>`` (a handler's extra access-log field), the stats and /metrics
count connections by it (``close_codes``), and a shutdown waits for the client's
answer to its 1001 (the close handshake) within close_timeout and the drain's grace."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler
from tests.conftest import connect as tcp_connect, wait_closed
from tests.loopback.test_admin import get
from tests.loopback.test_websocket import SAFETY, Raw, client
from tests.tls_support import ca, certs, tls_client  # noqa: F401 (fixtures)
from tests.unit.test_websocket_protocol import CLOSE, TEXT, client_frame, close_payload

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


# --- a shutdown waits for the close handshake ---------------------------------------------

@pytest.mark.parametrize("tls", [False, True])
def test_shutdown_waits_for_the_clients_close_frame(serve, tls, ca, certs):
    """After a shutdown's 1001 the server keeps the TCP connection until the client's
    answering close frame (here 0.3 s later), then closes at once; the drain counts it
    once the handshake is done. Over TLS too (the answer is decrypted while lingering)."""
    if tls:
        server = serve(WebSocketEchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
        sock = tls_client(server, ca)
    else:
        server = serve(WebSocketEchoHandler)
        sock = None
    with Raw(server, sock=sock) as raw:
        raw.sendall(client_frame(TEXT, b"x"))
        assert raw.frame() == (TEXT, b"x")
        done = threading.Event()
        stopper = threading.Thread(target=lambda: (server.shutdown(grace=SAFETY), done.set()),
                                   name="test-shutdown")
        stopper.start()
        try:
            opcode, payload = raw.frame()
            assert opcode == CLOSE and payload[:2] == b"\x03\xe9"   # 1001
            raw.sock.settimeout(0.3)   # meant to fire: the server must still be waiting
            with pytest.raises(socket.timeout):
                raw.sock.recv(1)
            assert server.stats().connections_active == 1 and not done.is_set()
            raw.sock.settimeout(SAFETY)
            raw.sendall(client_frame(CLOSE, close_payload(1001)))
            assert raw.at_end()   # the server closed right after the answer
        finally:
            stopper.join(SAFETY)
        assert not stopper.is_alive()
    stats = server.stats()
    assert stats.close_reasons == {"shutdown": 1} and stats.close_codes == {1001: 1}


def test_shutdown_stops_waiting_at_close_timeout(serve):
    """A client that never answers the 1001 is closed after close_timeout (small here),
    well within the drain's grace."""
    class Quick(WebSocketEchoHandler):
        close_timeout = 0.2

    server = serve(Quick)
    with Raw(server) as raw:
        raw.sendall(client_frame(TEXT, b"x"))
        assert raw.frame() == (TEXT, b"x")
        started = time.monotonic()
        stopper = threading.Thread(target=server.shutdown, kwargs={"grace": SAFETY},
                                   name="test-shutdown")
        stopper.start()
        try:
            assert raw.frame()[0] == CLOSE
            assert raw.at_end()
            assert time.monotonic() - started < SAFETY / 2
        finally:
            stopper.join(SAFETY)
        assert not stopper.is_alive()
    assert server.stats().close_reasons == {"shutdown": 1}

