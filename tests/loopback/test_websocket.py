"""WebSocketHandler on a real server, threaded and parked, against real clients.

The ``websockets`` library's clients (sync and asyncio) for what a conforming
peer does; raw sockets for what a hostile one does (the RFC 6455 table of
tests/unit/test_websocket_protocol.py, replayed over the wire), and for the
deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
import time

import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import (ConnectionClosed, ConnectionClosedError, ConnectionClosedOK,
                                   InvalidStatus)
from websockets.sync.client import connect

import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler
from connserver.testing import wait_for
from tests.conftest import Recorder, connect as tcp_connect, wait_closed
from tests.unit.test_websocket_protocol import (CLOSE, CONTINUATION, LIMIT, PING, TEXT,
                                                VIOLATIONS, client_frame, close_payload)

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked

SAFETY = 10.0   # a safety net around what should happen at once


def url(server: connserver.Server, path: str = "/") -> str:
    host, port = server.server_address[:2]
    return f"ws://{host}:{port}{path}"


def client(server: connserver.Server, path: str = "/", **options):
    options.setdefault("open_timeout", SAFETY)
    options.setdefault("close_timeout", SAFETY)
    return connect(url(server, path), **options)


# --- raw sockets --------------------------------------------------------------------------

def upgrade_request(path: str = "/", extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
            b"\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n")


class Raw:
    """A raw-socket WebSocket client: it sends what it is told, and reads server frames."""

    def __init__(self, server: connserver.Server, upgrade: bool = True,
                 sock: socket.socket | None = None) -> None:
        self.sock = sock or tcp_connect(server, timeout=SAFETY)   # sock: a TLS client, say
        self.buffer = b""
        if upgrade:
            self.sock.sendall(upgrade_request())
            assert self.response().startswith(b"HTTP/1.1 101 ")

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return chunk

    def response(self) -> bytes:
        """The HTTP response head (what follows it stays buffered)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._more(), f"closed inside the response: {self.buffer!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._more(), "closed inside a frame"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """One server frame: (opcode, payload); it must be final and unmasked."""
        first, second = self.exactly(2)
        assert first & 0x80 and not first & 0x70 and not second & 0x80, (first, second)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self.exactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self.exactly(8))
        return first & 0x0F, self.exactly(size)

    def at_end(self) -> bool:
        """Whether the server closed the stream (nothing more buffered, then EOF or reset)."""
        if self.buffer:
            return False
        try:
            return self._more() == b""
        except ConnectionResetError:
            return True

    def close_code(self) -> int:
        """The server's close frame's code, then the end of the stream."""
        opcode, payload = self.frame()
        assert opcode == CLOSE, (opcode, payload)
        assert self.at_end()
        return struct.unpack("!H", payload[:2])[0]


class Limited(WebSocketEchoHandler):
    max_message_size = LIMIT


# --- a conforming client ------------------------------------------------------------------

def test_text_and_binary_echo_as_they_came(serve):
    """Text comes back as text, binary as binary, empty ones too."""
    server = serve(WebSocketEchoHandler)
    with client(server) as ws:
        for message in ("héllo ✓", b"\x00\xff" * 10, "", b""):
            ws.send(message)
            assert ws.recv(timeout=SAFETY) == message
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_one_mebibyte_messages_round_trip(serve):
    """Messages of 1 MiB (the default limit) go both ways, text and binary."""
    server = serve(WebSocketEchoHandler)
    with client(server, max_size=None) as ws:
        binary = os.urandom(1 << 20)
        ws.send(binary)
        assert ws.recv(timeout=SAFETY) == binary
        text = "ж" * (1 << 19)   # 2 bytes each in UTF-8
        ws.send(text)
        assert ws.recv(timeout=SAFETY) == text
    wait_closed(server, 1)


def test_fragmented_messages_are_reassembled(serve):
    """A message sent in fragments is handled once, whole."""
    recorder = Recorder()

    class Recording(WebSocketEchoHandler):
        def handle_message(self, message):
            recorder.add(message)
            return message

    server = serve(Recording)
    with client(server) as ws:
        ws.send(["frag", "men", "ted ✓"])
        assert ws.recv(timeout=SAFETY) == "fragmented ✓"
        ws.send([b"\x01" * 70_000, b"\x02" * 3])
        assert ws.recv(timeout=SAFETY) == b"\x01" * 70_000 + b"\x02" * 3
    assert recorder.items == ["fragmented ✓", b"\x01" * 70_000 + b"\x02" * 3]
    wait_closed(server, 1)


def test_ping_is_answered_with_a_pong(serve):
    """A client's ping gets its pong, with the same payload."""
    server = serve(WebSocketEchoHandler)
    with client(server) as ws:
        latency = ws.ping(b"are you there").wait(SAFETY)
        assert latency is not False
    wait_closed(server, 1)


def test_client_close_is_answered_and_counted_as_eof(serve):
    """The client's close is echoed; on_close sees its code and reason; reason eof."""
    recorder = Recorder()

    class Closing(WebSocketEchoHandler):
        def on_close(self, code, reason):
            recorder.add((code, reason))

    server = serve(Closing)
    with client(server) as ws:
        ws.close(4001, "done here")
        assert ws.protocol.close_rcvd.code == 4001   # the server answered with the client's code
    assert wait_closed(server, 1).close_reasons == {"eof": 1}
    assert recorder.items == [(4001, "done here")]


def test_server_close_runs_the_close_handshake(serve):
    """close() from the handler: the client sees our code and reason; reason closed."""
    recorder = Recorder()

    class Bye(WebSocketEchoHandler):
        def handle_message(self, message):
            if message == "bye":
                self.close(4002, "as asked")
                return "never sent"
            return message

        def on_close(self, code, reason):
            recorder.add((code, reason))

    server = serve(Bye)
    with client(server) as ws:
        ws.send("hi")
        assert ws.recv(timeout=SAFETY) == "hi"
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=SAFETY)
        assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (4002, "as asked")
    assert wait_closed(server, 1).close_reasons == {"closed": 1}
    assert recorder.items == [(4002, "as asked")]   # the client's answer echoes ours


def test_server_close_not_answered_is_cut_after_close_timeout(serve):
    """A peer that never answers our close frame is cut after close_timeout (read_deadline)."""
    class Bye(WebSocketEchoHandler):
        close_timeout = 0.3

        def on_connect(self):
            self.close(1000, "go")

    server = serve(Bye, read_timeout=30.0, idle_timeout=30.0)
    with Raw(server) as sock:
        started = time.monotonic()
        opcode, payload = sock.frame()
        assert (opcode, payload) == (CLOSE, struct.pack("!H", 1000) + b"go")
        assert sock.at_end()   # we never answered: the server shut the socket
        assert 0.25 <= time.monotonic() - started < 5.0
    assert wait_closed(server, 1).close_reasons == {"read_deadline": 1}


def test_message_over_the_limit_gets_1009(serve):
    """A message over max_message_size, in one frame or in fragments, is closed with 1009."""
    server = serve(Limited)
    for message in (b"x" * (LIMIT + 1), [b"x" * 60, b"x" * 41]):
        with client(server) as ws:
            ws.send(b"x" * LIMIT)
            assert ws.recv(timeout=SAFETY) == b"x" * LIMIT
            # Fragments go out non-final, then an empty final frame: the 1009 that the
            # second fragment's header earns may arrive before that last frame is sent.
            with pytest.raises(ConnectionClosedError):
                ws.send(message)
                ws.recv(timeout=SAFETY)
            assert ws.protocol.close_rcvd.code == 1009
    assert wait_closed(server, 2).close_reasons == {"frame_too_large": 2}


def test_asyncio_client_talks_to_the_server_too(serve):
    """The asyncio client: text, binary, fragments, ping and close, like the sync one."""
    server = serve(WebSocketEchoHandler)

    async def talk():
        async with async_connect(url(server), open_timeout=SAFETY, close_timeout=SAFETY) as ws:
            await ws.send("text")
            assert await asyncio.wait_for(ws.recv(), SAFETY) == "text"
            await ws.send(b"bin")
            assert await asyncio.wait_for(ws.recv(), SAFETY) == b"bin"
            await ws.send(["a", "b"])
            assert await asyncio.wait_for(ws.recv(), SAFETY) == "ab"
            await asyncio.wait_for(await ws.ping(), SAFETY)

    asyncio.run(talk())
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_allowed_origins_refuse_others_with_403(serve):
    """An Origin not in allowed_origins gets 403 and reason rejected; a listed one passes."""
    class Guarded(WebSocketEchoHandler):
        allowed_origins = ("https://good.example",)

    server = serve(Guarded)
    with client(server, origin="https://good.example") as ws:
        ws.send("in")
        assert ws.recv(timeout=SAFETY) == "in"
    for origin in ("https://evil.example", None):   # no Origin: not listed, so refused
        with pytest.raises(InvalidStatus) as refused, client(server, origin=origin):
            pass
        assert refused.value.response.status_code == 403
    assert wait_closed(server, 3).close_reasons == {"eof": 1, "rejected": 2}


def test_subprotocol_is_negotiated(serve):
    """The server's first preference among the client's offers is chosen and confirmed."""
    class Chat(WebSocketEchoHandler):
        subprotocols = ("chat.v2", "chat.v1")

        def on_connect(self):
            self.send(f"speaking {self.subprotocol}")

    server = serve(Chat)
    with client(server, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.recv(timeout=SAFETY) == "speaking chat.v2"
    with client(server, subprotocols=["other"]) as ws:
        assert ws.subprotocol is None
        assert ws.recv(timeout=SAFETY) == "speaking None"
    wait_closed(server, 2)


def test_check_request_refuses_with_its_status(serve):
    """check_request() sees path, headers and peer; its status is the answer."""
    seen = Recorder()

    class Routed(WebSocketEchoHandler):
        def check_request(self, request):
            seen.add((request.path, request.header("X-Token"), self.peer[0]))
            return None if request.path == "/ok" else 404

    server = serve(Routed)
    with client(server, "/ok", additional_headers={"X-Token": "t1"}) as ws:
        ws.send("fine")
        assert ws.recv(timeout=SAFETY) == "fine"
    with pytest.raises(InvalidStatus) as refused, client(server, "/nope"):
        pass
    assert refused.value.response.status_code == 404
    assert seen.items == [("/ok", "t1", "127.0.0.1"), ("/nope", None, "127.0.0.1")]
    assert wait_closed(server, 2).close_reasons == {"eof": 1, "rejected": 1}


def test_upgrade_kept_after_the_handshake_drops_only_the_handshake_headers(serve):
    """check_request() sees every header; once open, ``upgrade`` keeps the path, the
    subprotocols offered and every header but Upgrade, Connection and Sec-WebSocket-*."""
    seen = Recorder()

    class Kept(WebSocketEchoHandler):
        subprotocols = ("chat.v1",)

        def check_request(self, request):
            seen.add(("hook", request.header("sec-websocket-key") is not None))
            return None

        def on_connect(self):
            upgrade = self.upgrade
            seen.add(("open", upgrade.path, upgrade.header("x-token"), upgrade.host,
                      upgrade.subprotocols, sorted(name for name, _ in upgrade.headers)))

    server = serve(Kept)
    with client(server, "/room?x=1", subprotocols=["chat.v1"],
                additional_headers={"X-Token": "t1"}) as ws:
        ws.send("hi")
        assert ws.recv(timeout=SAFETY) == "hi"
    host = f"{server.server_address[0]}:{server.server_address[1]}"
    assert seen.items[0] == ("hook", True)
    _, path, token, kept_host, offered, names = seen.items[1]
    assert (path, token, kept_host, offered) == ("/room?x=1", "t1", host, ("chat.v1",))
    assert not any(name in ("upgrade", "connection") or name.startswith("sec-websocket-")
                   for name in names), names
    assert "x-token" in names and "host" in names
    wait_closed(server, 1)


def test_shutdown_says_going_away(serve, caplog):
    """A server shutting down closes open WebSockets with 1001 (reason shutdown), a clean
    close handshake for the client (ConnectionClosedOK: 1001 received, its answer sent),
    counted in close_codes and on the access-log line (ws_close=1001)."""
    caplog.set_level(logging.INFO, logger="connserver.access")
    server = serve(WebSocketEchoHandler)
    with client(server) as ws:
        ws.send("x")
        assert ws.recv(timeout=SAFETY) == "x"
        server.shutdown(grace=SAFETY)
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=SAFETY)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1001
    stats = server.stats()
    assert stats.close_reasons == {"shutdown": 1} and stats.close_codes == {1001: 1}
    [line] = [r.getMessage() for r in caplog.records if r.name == "connserver.access"]
    assert "reason=shutdown" in line and line.endswith(" ws_close=1001"), line


# --- raw sockets: the rules, and the deadlines --------------------------------------------

@pytest.mark.parametrize("name, data, code", VIOLATIONS, ids=[case[0] for case in VIOLATIONS])
def test_each_violation_over_the_wire_gets_its_close_code(serve, name, data, code):
    """Each RFC 6455 violation of the table: the server sends the close code, then closes."""
    server = serve(Limited)
    with Raw(server) as sock:
        sock.sendall(data)
        assert sock.close_code() == code
    expected = {1002: "protocol_error", 1007: "protocol_error", 1009: "frame_too_large"}[code]
    assert wait_closed(server, 1).close_reasons == {expected: 1}


def test_pings_inside_a_fragmented_message_are_answered_at_once(serve):
    """Interleaved pings get their pongs before the message is complete; the echo follows."""
    server = serve(WebSocketEchoHandler)
    with Raw(server) as sock:
        sock.sendall(client_frame(TEXT, b"one ", fin=False) + client_frame(PING, b"p1"))
        assert sock.frame() == (0xA, b"p1")
        sock.sendall(client_frame(CONTINUATION, b"two", fin=False) + client_frame(PING, b"p2"))
        assert sock.frame() == (0xA, b"p2")
        sock.sendall(client_frame(CONTINUATION, b" three"))
        assert sock.frame() == (TEXT, b"one two three")
        sock.sendall(client_frame(CLOSE, close_payload(1000)))
        assert sock.close_code() == 1000
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_a_message_sent_with_the_request_is_answered(serve):
    """Bytes right behind the upgrade request are handled once the upgrade is done."""
    server = serve(WebSocketEchoHandler)
    with tcp_connect(server, timeout=SAFETY) as sock:
        sock.sendall(upgrade_request() + client_frame(TEXT, b"eager"))
        data = b""
        while not data.endswith(b"eager"):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
    wait_closed(server, 1)


def test_malformed_upgrade_gets_an_http_error(serve):
    """A plain GET, not an upgrade, is answered 400 and counted as protocol_error."""
    server = serve(WebSocketEchoHandler)
    with Raw(server, upgrade=False) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        head = sock.response()
        assert head.startswith(b"HTTP/1.1 400 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert b"Upgrade" in sock.exactly(length)   # the body says what was missing
        assert sock.at_end()
    assert wait_closed(server, 1).close_reasons == {"protocol_error": 1}


CUT_AT_A_DEADLINE = [
    # (what the client does, upgraded first?, what it sends, the timeout that must cut it,
    #  the close reason)
    ("a trickled upgrade request", False, b"GET / HTTP/1.1\r\n", "handshake_timeout",
     "handshake_deadline"),
    ("a silent client", False, b"", "handshake_timeout", "handshake_deadline"),
    ("a frame begun and never finished", True, client_frame(TEXT, b"x" * 100)[:20],
     "read_timeout", "read_deadline"),
]


@pytest.mark.parametrize("what, upgraded, data, timeout, reason", CUT_AT_A_DEADLINE,
                         ids=[case[0] for case in CUT_AT_A_DEADLINE])
def test_stalls_are_cut_at_their_deadline_not_idle_timeout(serve, what, upgraded, data, timeout,
                                                            reason):
    """The upgrade within handshake_timeout (handshake_deadline), a begun message within
    read_timeout (read_deadline)."""
    deadlines = {"handshake_timeout": 30.0, "read_timeout": 30.0, timeout: 0.3}
    server = serve(WebSocketEchoHandler, idle_timeout=30.0, **deadlines)
    with Raw(server, upgrade=upgraded) as sock:
        started = time.monotonic()
        sock.sendall(data)
        assert sock.at_end()
        assert 0.25 <= time.monotonic() - started < 5.0
    assert wait_closed(server, 1).close_reasons == {reason: 1}


def test_fragmented_message_must_complete_within_read_timeout(serve):
    """Whole frames trickled as fragments of one message do not stretch its read deadline."""
    server = serve(WebSocketEchoHandler, read_timeout=0.6, idle_timeout=30.0)
    with Raw(server) as sock:
        started = time.monotonic()
        sock.sendall(client_frame(TEXT, b"a", fin=False))
        closed = False
        for _ in range(40):   # a fragment every 0.1 s: each frame complete, the message never
            sock.sock.settimeout(0.1)
            try:
                closed = sock.at_end()
            except socket.timeout:
                sock.sendall(client_frame(CONTINUATION, b"b", fin=False))
                continue
            except ConnectionResetError:
                closed = True
            break
        assert closed
        assert 0.5 <= time.monotonic() - started < 3.0
    assert wait_closed(server, 1).close_reasons == {"read_deadline": 1}


def test_idle_websocket_is_closed_at_idle_timeout(serve):
    """No message within idle_timeout: the connection ends (reason idle), on_close gets 1006."""
    recorder = Recorder()

    class Watching(WebSocketEchoHandler):
        def on_close(self, code, reason):
            recorder.add(code)

    server = serve(Watching, idle_timeout=0.3, handshake_timeout=0.25)
    with client(server) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosedError):
            ws.recv(timeout=SAFETY)
        assert 0.25 <= time.monotonic() - started < 5.0
    assert wait_closed(server, 1).close_reasons == {"idle": 1}
    assert wait_for(lambda: recorder.items, SAFETY) == [1006]


def test_peer_vanishing_mid_message_is_a_protocol_error(serve):
    """The stream ending inside a message (no close frame) is protocol_error; on_close gets 1006."""
    recorder = Recorder()

    class Watching(WebSocketEchoHandler):
        def on_close(self, code, reason):
            recorder.add(code)

    server = serve(Watching)
    with Raw(server) as sock:
        sock.sendall(client_frame(TEXT, b"x" * 50)[:10])
    assert wait_closed(server, 1).close_reasons == {"protocol_error": 1}
    assert recorder.items == [1006]



def test_ws_echo_is_a_built_in_app():
    """`connserver serve ws-echo` loads the WebSocket echo handler."""
    from connserver.daemon.cli import load_handler

    assert load_handler("ws-echo") is WebSocketEchoHandler
    assert connserver.WebSocketHandler is WebSocketEchoHandler.__mro__[1]
