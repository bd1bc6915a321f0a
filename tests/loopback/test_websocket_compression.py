"""permessage-deflate over the wire, both modes: off by default, negotiated with the
``websockets`` client when asked for, and a decompression bomb refused with 1009."""

from __future__ import annotations

import struct

import pytest

import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler
from tests.conftest import wait_closed
from tests.loopback.test_websocket import SAFETY, Raw, client, upgrade_request
from tests.unit.test_websocket_deflate import RSV1, bomb
from tests.unit.test_websocket_protocol import BINARY, CLOSE, client_frame

pytestmark = pytest.mark.both_modes


class Compressing(WebSocketEchoHandler):
    compression = "deflate"


def test_compression_is_off_by_default(serve):
    """The client's permessage-deflate offer is declined; messages still go both ways."""
    server = serve(WebSocketEchoHandler)
    with client(server, compression="deflate") as ws:
        assert ws.protocol.extensions == []
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send("plain " * 1000)
        assert ws.recv(timeout=SAFETY) == "plain " * 1000
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_compressed_messages_round_trip(serve):
    """compression="deflate": negotiated with the websockets client; 1 MiB of text and
    binary go both ways compressed (a few KiB on the wire each way)."""
    server = serve(Compressing)
    with client(server, compression="deflate", max_size=None) as ws:
        assert [ext.name for ext in ws.protocol.extensions] == ["permessage-deflate"]
        text = "compress me " * 87_381   # ~1 MiB
        binary = bytes(range(256)) * 4096
        ws.send(text)
        assert ws.recv(timeout=SAFETY) == text
        ws.send(binary)
        assert ws.recv(timeout=SAFETY) == binary
        ws.send("short")
        assert ws.recv(timeout=SAFETY) == "short"
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"eof": 1}
    assert stats.bytes_received < 100_000 and stats.bytes_sent < 100_000, stats


def test_decompression_bomb_gets_1009_at_once(serve):
    """100 MiB of zeros deflated to ~100 KiB, in one frame: the server answers 1009
    (reason frame_too_large) once past 1 MiB inflated, without inflating the rest."""
    server = serve(Compressing)
    frame = client_frame(BINARY, bomb(100 << 20), rsv=RSV1)
    with Raw(server, upgrade=False) as raw:
        raw.sendall(upgrade_request(extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n"))
        assert b"permessage-deflate" in raw.response()
        try:
            raw.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server may have closed before taking all of it
        opcode, payload = raw.frame()
    assert opcode == CLOSE and struct.unpack("!H", payload[:2])[0] == 1009
    assert b"exceeds the limit of 1048576 bytes" in payload
    assert wait_closed(server, 1).close_reasons == {"frame_too_large": 1}


def test_decompression_bomb_from_the_websockets_client(serve):
    """The same through the websockets client (its limit raised): it sees close 1009."""
    from websockets.exceptions import ConnectionClosedError
    server = serve(Compressing)
    with client(server, compression="deflate", max_size=None) as ws:
        assert ws.protocol.extensions   # negotiated: the 8 MiB go compressed
        ws.send(bytes(8 << 20))   # 8 MiB of zeros: 8 KiB compressed
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=SAFETY)
    assert closed.value.rcvd.code == 1009
    assert wait_closed(server, 1).close_reasons == {"frame_too_large": 1}


@pytest.mark.parametrize("setting, negotiated", [("deflate", True), ("off", False), ("default", False)])
def test_the_server_setting_overrides_the_handler_class(serve, setting, negotiated):
    """websocket_compression (--websocket-compression): deflate turns it on for the built-in
    echo, off turns it off for a class that asks for it, default leaves the class's."""
    handler = Compressing if setting == "off" else WebSocketEchoHandler
    server = serve(handler, websocket_compression=setting)
    with client(server, compression="deflate") as ws:
        assert bool(ws.protocol.extensions) is negotiated
        ws.send("hello " * 100)
        assert ws.recv(timeout=SAFETY) == "hello " * 100
    assert wait_closed(server, 1).close_reasons == {"eof": 1}
