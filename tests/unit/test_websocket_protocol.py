"""WebSocketProtocol, sans-I/O: the RFC 6455 framing and close rules, at memory speed.

The table of violations (``VIOLATIONS``) is also played over real sockets
against a server, in both modes, by tests/loopback/test_websocket.py.
"""

from __future__ import annotations

import os
import struct

import pytest

from connserver import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from connserver.protocols import websocket as ws

REQUEST = (b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nOrigin: https://example.com\r\n"
           b"Sec-WebSocket-Protocol: chat.v2, chat.v1\r\n"
           b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 masked: bool = True, length: int | None = None, width: int | None = None) -> bytes:
    """A client frame, masked unless told otherwise; ``length`` overrides the announced size,
    ``width`` (1, 2 or 8 bytes) its encoding (default: the shortest, as RFC 6455 5.2 requires)."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if width is None:
        width = 1 if size <= 125 else 2 if size <= 0xFFFF else 8
    if width == 1:
        head += bytes([mask_bit | size])
    elif width == 2:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# (name, bytes the client sends after the upgrade, the close code the server must send)
VIOLATIONS = [
    ("unmasked frame", client_frame(TEXT, b"hi", masked=False), 1002),
    ("control frame over 125 bytes", client_frame(PING, b"x" * 126), 1002),
    ("fragmented ping", client_frame(PING, b"x", fin=False), 1002),
    ("fragmented close", client_frame(CLOSE, close_payload(1000), fin=False), 1002),
    ("rsv1 without an extension", client_frame(TEXT, b"hi", rsv=4), 1002),
    ("rsv2", client_frame(TEXT, b"hi", rsv=2), 1002),
    ("rsv3", client_frame(BINARY, b"hi", rsv=1), 1002),
    ("reserved data opcode 0x3", client_frame(0x3, b"hi"), 1002),
    ("reserved control opcode 0xB", client_frame(0xB, b"hi"), 1002),
    ("continuation with nothing to continue", client_frame(CONTINUATION, b"hi"), 1002),
    ("new message inside a fragmented one",
     client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"), 1002),
    ("close with a 1-byte payload", client_frame(CLOSE, b"\x03"), 1002),
    ("close code 999", client_frame(CLOSE, close_payload(999)), 1002),
    ("close code 1004 (reserved)", client_frame(CLOSE, close_payload(1004)), 1002),
    ("close code 1005 (never sent)", client_frame(CLOSE, close_payload(1005)), 1002),
    ("close code 1006 (never sent)", client_frame(CLOSE, close_payload(1006)), 1002),
    ("close code 1016 (unassigned)", client_frame(CLOSE, close_payload(1016)), 1002),
    ("close code 5000", client_frame(CLOSE, close_payload(5000)), 1002),
    ("close reason not UTF-8", client_frame(CLOSE, close_payload(1000, b"\xff")), 1007),
    ("text not UTF-8", client_frame(TEXT, b"ok \xc3\x28"), 1007),
    ("text not UTF-8 across fragments",
     client_frame(TEXT, b"\xce", fin=False) + client_frame(CONTINUATION, b"\x41"), 1007),
    ("text ending inside a character", client_frame(TEXT, b"\xe2\x82"), 1007),
    ("message over the limit", client_frame(BINARY, b"x" * 101), 1009),
    ("fragments adding up over the limit",
     client_frame(BINARY, b"x" * 60, fin=False) + client_frame(CONTINUATION, b"x" * 41), 1009),
    ("an announced 2**62 bytes", client_frame(BINARY, b"", length=1 << 62), 1009),
    ("length in 2 bytes where 1 would do", client_frame(BINARY, b"hi", width=2), 1002),
    ("length in 8 bytes where 2 would do", client_frame(TEXT, b"hi", width=8), 1002),
    ("8-byte length with its top bit set", client_frame(BINARY, b"", length=1 << 63), 1002),
]
LIMIT = 100   # max_message_size the table assumes


def opened(limit: int = LIMIT) -> ws.WebSocketProtocol:
    protocol = ws.WebSocketProtocol(limit)
    [request] = protocol.feed(REQUEST)
    assert isinstance(request, ws.UpgradeRequest)
    protocol.accept()
    return protocol


@pytest.mark.parametrize("name, data, code", VIOLATIONS, ids=[case[0] for case in VIOLATIONS])
def test_each_violation_fails_with_its_close_code(name, data, code):
    """Every rule broken (RFC 6455 5.1-5.5, 7.4, 8.1) yields a Failure with the right close code."""
    protocol = opened()
    events = protocol.feed(data)
    assert events and isinstance(events[-1], ws.Failure), events
    assert events[-1].code == code
    assert not protocol.open and protocol.feed(client_frame(TEXT, b"more")) == []


@pytest.mark.parametrize("name, data, code", VIOLATIONS, ids=[case[0] for case in VIOLATIONS])
def test_each_violation_is_found_when_bytes_come_one_at_a_time(name, data, code):
    """Split anywhere (down to single bytes), a violation is still found, with the same code."""
    protocol = opened()
    events = []
    for index in range(len(data)):
        events += protocol.feed(data[index:index + 1])
        if events:
            break
    assert [type(event) for event in events] == [ws.Failure] and events[0].code == code


def test_failure_comes_after_the_messages_before_it():
    """Messages complete before a violation in the same chunk are delivered first, in order."""
    protocol = opened()
    events = protocol.feed(client_frame(TEXT, b"one") + client_frame(BINARY, b"two")
                           + client_frame(TEXT, b"\xff"))
    assert events[:2] == ["one", b"two"] and events[2].code == 1007


def test_oversized_announcement_is_refused_before_its_payload():
    """The 1009 comes from the header alone: none of the payload needs to arrive."""
    protocol = opened()
    header = client_frame(BINARY, b"", length=10_000)   # header and mask, no payload
    [failure] = protocol.feed(header)
    assert (failure.code, failure.size, failure.limit) == (1009, 10_000, LIMIT)
    assert isinstance(failure.error(), FrameTooLarge)


def test_fragments_reassemble_with_control_frames_between():
    """Pings and pongs inside a fragmented message come out at once; the message whole, after."""
    protocol = opened()
    events = protocol.feed(client_frame(TEXT, "é".encode()[:1], fin=False)
                           + client_frame(PING, b"p1")
                           + client_frame(CONTINUATION, "é".encode()[1:] + b"-", fin=False)
                           + client_frame(PONG, b"p2")
                           + client_frame(CONTINUATION, b"end"))
    assert events == [ws.PingReceived(b"p1"), ws.PongReceived(b"p2"), "é-end"]


def test_message_of_exactly_the_limit_passes():
    """max_message_size is inclusive, for one frame and for fragments."""
    protocol = opened()
    assert protocol.feed(client_frame(BINARY, b"x" * LIMIT)) == [b"x" * LIMIT]
    assert protocol.feed(client_frame(BINARY, b"x" * 50, fin=False)
                         + client_frame(CONTINUATION, b"y" * 50)) == [b"x" * 50 + b"y" * 50]


def test_pending_counts_a_begun_header_frame_and_message():
    """pending is 0 only at a message boundary: a header byte, a partial frame, a fragment count."""
    protocol = opened()
    assert protocol.pending == 0
    frame = client_frame(BINARY, b"abcdef")
    assert protocol.feed(frame[:1]) == [] and protocol.pending > 0
    assert protocol.feed(frame[1:8]) == [] and protocol.pending > 0
    assert protocol.feed(frame[8:]) == [b"abcdef"] and protocol.pending == 0
    assert protocol.feed(client_frame(TEXT, b"", fin=False)) == [] and protocol.pending > 0
    assert protocol.feed(client_frame(PING)) == [ws.PingReceived(b"")] and protocol.pending > 0
    assert protocol.feed(client_frame(CONTINUATION, b"z")) == ["z"] and protocol.pending == 0


def test_upgrade_request_is_parsed():
    """Path, headers, origin, offered subprotocols and extensions reach the accept hook."""
    protocol = ws.WebSocketProtocol(LIMIT)
    [request] = protocol.feed(REQUEST)
    assert request.path == "/chat?room=1" and request.host == "example.com"
    assert request.origin == "https://example.com"
    assert request.subprotocols == ("chat.v2", "chat.v1")
    assert request.extensions == ("permessage-deflate; client_max_window_bits",)
    response = protocol.accept("chat.v1")
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response
    assert b"Sec-WebSocket-Protocol: chat.v1" in response
    assert b"permessage-deflate" not in response   # declined: see the module docstring


def test_accepting_a_subprotocol_not_offered_is_our_error():
    """Choosing a subprotocol the client did not offer is a LocalProtocolError."""
    protocol = ws.WebSocketProtocol(LIMIT)
    protocol.feed(REQUEST)
    with pytest.raises(LocalProtocolError):
        protocol.accept("chat.v3")


def test_bytes_behind_the_request_are_kept_for_after_the_upgrade():
    """A frame sent along with the request is not lost: feed(b"") after accept() returns it."""
    protocol = ws.WebSocketProtocol(LIMIT)
    [request] = protocol.feed(REQUEST + client_frame(TEXT, b"early"))
    protocol.accept()
    assert protocol.feed(b"") == ["early"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", 426),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
    (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
])
def test_malformed_upgrades_are_refused_with_a_status(request_bytes, status):
    """Not a WebSocket upgrade: HandshakeFailed with the HTTP status to answer."""
    protocol = ws.WebSocketProtocol(LIMIT)
    with pytest.raises(ws.HandshakeFailed) as failed:
        protocol.feed(request_bytes)
    assert failed.value.status == status
    assert isinstance(failed.value, RemoteProtocolError)


def test_request_head_over_max_handshake_size_is_refused():
    """An endless header block is refused once it passes max_handshake_size (431)."""
    protocol = ws.WebSocketProtocol(LIMIT, max_handshake_size=1024)
    protocol.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ws.HandshakeFailed) as failed:
        for _ in range(100):
            protocol.feed(b"X-Filler: " + b"a" * 50 + b"\r\n")
    assert failed.value.status == 431


def test_close_handshake_from_the_peer_and_from_us():
    """The peer's close is answered with its code; ours waits for the peer's and drops data."""
    protocol = opened()
    [received] = protocol.feed(client_frame(CLOSE, close_payload(1001, b"bye")))
    assert received == ws.CloseReceived(1001, "bye")
    assert protocol.reply_to_close(received) == ws.close_frame(1001)
    assert protocol.reply_to_close(ws.CloseReceived(1005, "")) == b"\x88\x00"

    protocol = opened()
    assert protocol.close(4000, "done") == b"\x88\x06\x0f\xa0done"
    assert protocol.feed(client_frame(TEXT, b"late")) == []   # discarded while closing
    assert protocol.feed(client_frame(CLOSE, close_payload(4000))) == [ws.CloseReceived(4000, "")]
    with pytest.raises(LocalProtocolError):
        protocol.text_frame("after the close")


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 2000, 5000])
def test_codes_an_endpoint_may_not_send_are_refused(code):
    """close() refuses codes reserved for reporting or unassigned (RFC 6455 7.4)."""
    with pytest.raises(LocalProtocolError):
        opened().close(code)


@pytest.mark.parametrize("size, header", [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"),
    (65535, b"\x82\x7e\xff\xff"), (65536, b"\x82\x7f" + struct.pack("!Q", 65536)),
])
def test_server_frames_use_the_shortest_length_and_no_mask(size, header):
    """Frames to the client: FIN set, never masked, minimal length encoding (RFC 6455 5.2)."""
    assert opened(1 << 20).frame_parts(b"x" * size) == (header, b"x" * size)


def test_close_reason_is_cut_to_fit_a_control_frame_on_a_character_boundary():
    """A long close reason is cut to 123 bytes without splitting a UTF-8 character."""
    frame = ws.close_frame(1000, "é" * 100)
    assert len(frame) <= 2 + 125
    frame[4:].decode("utf-8")   # whole characters only


@pytest.mark.parametrize("status, phrase", [(400, b"Bad Request"), (403, b"Forbidden"),
                                            (426, b"Upgrade Required"), (499, b"Refused")])
def test_reject_writes_a_complete_response_even_for_an_unparsed_request(status, phrase):
    """reject() answers with a whole HTTP response (status, length, close), parsed or not."""
    protocol = ws.WebSocketProtocol(LIMIT)
    protocol.feed(b"GET / HT")   # not even a request line yet
    response = protocol.reject(status, b"no\n")
    head, body = response.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d %s" % (status, phrase)) and body == b"no\n"
    assert b"Content-Length: 3" in head and b"Connection: close" in head
    assert (b"Sec-WebSocket-Version: 13" in head) == (status == 426)
    assert protocol.feed(b"more") == []


@pytest.mark.parametrize("upgrade", [b"", b"Upgrade: h2c\r\nConnection: Upgrade\r\n"])
def test_a_plain_get_is_an_http_request_event(upgrade):
    """A GET without Upgrade: websocket comes out as an HttpRequest (path, headers), not a failure."""
    protocol = ws.WebSocketProtocol(LIMIT)
    [request] = protocol.feed(b"GET /page?x=1 HTTP/1.1\r\nHost: a:1\r\n" + upgrade +
                              b"Accept: text/html\r\n\r\n")
    assert type(request) is ws.HttpRequest
    assert request.path == "/page?x=1" and request.host == "a:1"
    assert request.header("ACCEPT") == "text/html"
    assert protocol.state == "handshake" and not protocol.open


def test_respond_answers_a_plain_request_and_closes():
    """respond() writes status, Content-Type, Content-Length, Connection: close and the body."""
    protocol = ws.WebSocketProtocol(LIMIT)
    protocol.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    response = protocol.respond(ws.HttpResponse(200, b"<p>hi</p>", "text/html; charset=utf-8",
                                                (("Cache-Control", "no-cache"),)))
    head, body = response.split(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 200 OK", b"Cache-Control: no-cache",
                                     b"Connection: close", b"Content-Type: text/html; charset=utf-8",
                                     b"Content-Length: 9"]
    assert body == b"<p>hi</p>"
    assert protocol.feed(b"GET / HTTP/1.1\r\n\r\n") == []   # closed: nothing more is parsed
    with pytest.raises(LocalProtocolError):
        protocol.respond(ws.HttpResponse(200))


@pytest.mark.parametrize("message, opcode", [("héllo", TEXT), (b"\x00\x01", BINARY),
                                             ("x" * 200, TEXT), (b"y" * 70000, BINARY)])
def test_message_frame_is_one_whole_server_frame(message, opcode):
    """message_frame() builds an unmasked final frame, text for str and binary for bytes."""
    frame = ws.message_frame(message)
    payload = message.encode() if isinstance(message, str) else message
    assert frame[0] == 0x80 | opcode and not frame[1] & 0x80
    assert frame == ws.frame_header(opcode, len(payload)) + payload
