"""permessage-deflate, sans-I/O: negotiated only when asked for, inflation held to
max_message_size (a decompression bomb costs about that much, not what it inflates to)."""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from connserver.protocols import websocket as ws
from tests.unit.test_websocket_protocol import BINARY, CONTINUATION, REQUEST, TEXT, client_frame

RSV1 = 4   # client_frame's rsv argument: the RSV1 bit


def deflate(data: bytes, bits: int = 12) -> bytes:
    """A message compressed as a client does it (RFC 7692, 7.2.1: the sync tail removed)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def bomb(size: int, bits: int = 15) -> bytes:
    """``size`` zero bytes, deflated (about 1,000 to 1), built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -bits)
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(size >> 20)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH)[:-4])
    return b"".join(parts)


def opened(limit: int, compression: str | None = "deflate",
           request: bytes = REQUEST) -> tuple[ws.WebSocketProtocol, bytes]:
    protocol = ws.WebSocketProtocol(limit, compression=compression)
    [upgrade] = protocol.feed(request)
    assert isinstance(upgrade, ws.UpgradeRequest)
    return protocol, protocol.accept()


def test_offer_is_declined_by_default_and_accepted_when_asked():
    """compression=None declines the client's offer; "deflate" accepts it, asking the
    client for a 4 KiB window since its offer allows a smaller one."""
    protocol, response = opened(100, compression=None)
    assert b"permessage-deflate" not in response and not protocol.compressed
    protocol, response = opened(100)
    assert b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=12" in response
    assert protocol.compressed


def test_an_offer_without_client_window_bits_keeps_the_clients_15():
    """A client that did not offer client_max_window_bits compresses with 15 bits: we
    inflate with 15 (a smaller window would fail on its back references)."""
    request = REQUEST.replace(b"permessage-deflate; client_max_window_bits",
                              b"permessage-deflate")
    protocol, response = opened(1 << 20, request=request)
    assert b"client_max_window_bits" not in response
    message = bytes(range(256)) * 64 + b"tail" + bytes(range(256)) * 64   # reaches back 16 KiB
    assert protocol.feed(client_frame(BINARY, deflate(message, bits=15), rsv=RSV1)) == [message]


def test_compressed_messages_inflate_and_ours_are_compressed():
    """Compressed text and binary come out whole (fragments too); what we send is a
    compressed frame (RSV1) the client can inflate; an uncompressed message still passes."""
    protocol, _ = opened(1 << 20)
    text = "héllo " * 1000
    packed = deflate(text.encode())
    assert protocol.feed(client_frame(TEXT, packed, rsv=RSV1)) == [text]
    binary = b"\x01\x02" * 5000
    packed = deflate(binary)
    assert protocol.feed(client_frame(BINARY, packed[:10], rsv=RSV1, fin=False)
                         + client_frame(CONTINUATION, packed[10:])) == [binary]
    assert protocol.feed(client_frame(BINARY, b"plain")) == [b"plain"]
    frame = protocol.text_frame(text)
    assert frame[0] == 0x80 | 0x40 | TEXT and len(frame) < 100
    header, payload = protocol.frame_parts(binary)
    assert header[0] == 0x80 | 0x40 | BINARY and inflate(payload) == binary


def test_message_inflating_to_exactly_the_limit_passes():
    """A message that inflates to max_message_size bytes is handled; one byte more is 1009."""
    protocol, _ = opened(1000)
    assert protocol.feed(client_frame(BINARY, deflate(b"a" * 1000), rsv=RSV1)) == [b"a" * 1000]
    [failure] = protocol.feed(client_frame(BINARY, deflate(b"a" * 1001), rsv=RSV1))
    assert isinstance(failure, ws.Failure) and failure.code == ws.MESSAGE_TOO_BIG
    assert failure.limit == 1000 and failure.size > 1000


def test_fragments_inflating_past_the_limit_together_get_1009():
    """The bound is on the message: fragments that inflate to 600 + 600 bytes fail at 1000."""
    protocol, _ = opened(1000)
    packed = deflate(b"b" * 1200)
    half = len(packed) // 2
    events = protocol.feed(client_frame(BINARY, packed[:half], rsv=RSV1, fin=False)
                           + client_frame(CONTINUATION, packed[half:]))
    assert [type(event) for event in events] == [ws.Failure]
    assert events[0].code == ws.MESSAGE_TOO_BIG


def test_decompression_bomb_costs_about_the_limit_not_what_it_inflates_to():
    """100 MiB of zeros deflated to ~100 KiB: 1009 with a peak of memory near the 1 MiB
    limit (wsproto's own inflater would have held all 100 MiB)."""
    limit = 1 << 20
    payload = bomb(100 << 20)
    assert len(payload) < 200_000
    frame = client_frame(BINARY, payload, rsv=RSV1)
    protocol, _ = opened(limit)
    tracemalloc.start()
    try:
        events = protocol.feed(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [failure] = events
    assert isinstance(failure, ws.Failure) and failure.code == ws.MESSAGE_TOO_BIG
    assert "exceeds the limit of 1048576 bytes" in failure.reason
    assert peak < 4 * limit, f"peak {peak} bytes"


def test_invalid_deflate_data_is_a_protocol_error():
    """Bytes that are not deflate data fail the connection (1007, as wsproto reports it)."""
    protocol, _ = opened(1000)
    [failure] = protocol.feed(client_frame(BINARY, b"\xff\xff\xff\xff", rsv=RSV1))
    assert isinstance(failure, ws.Failure) and failure.code in (ws.PROTOCOL_ERROR, ws.INVALID_DATA)


def test_unknown_compression_is_refused():
    """Only None and "deflate" are compressions."""
    with pytest.raises(ValueError, match="compression"):
        ws.WebSocketProtocol(100, compression="gzip")
