"""The fast path for the common frame (connserver.protocols.websocket): whole, final, masked
text and binary frames are parsed without wsproto, with the same messages, failures and
close codes as wsproto gives, however the stream is split; and between messages no wsproto
state is kept."""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest

from connserver.protocols import websocket as ws
from tests.unit.test_websocket_protocol import (BINARY, CONTINUATION, PING, TEXT, client_frame,
                                                close_payload, opened)

LIMIT = 1000

# Common frames of every length encoding the fast path takes, text with multi-byte characters,
# an empty message, and a message of exactly the limit (16-bit length).
MESSAGES = [b"a" * 64, "héllo wörld ✓", b"", "", os.urandom(126), "é" * 200, os.urandom(LIMIT)]


def frame_of(message: str | bytes) -> bytes:
    if isinstance(message, str):
        return client_frame(TEXT, message.encode())
    return client_frame(BINARY, message)


STREAM = b"".join(frame_of(message) for message in MESSAGES)


def feed_all(protocol: ws.WebSocketProtocol, *chunks: bytes) -> list:
    events = []
    for chunk in chunks:
        events += protocol.feed(chunk)
    return events


def test_a_stream_split_at_every_byte_boundary_gives_the_same_messages():
    """Cut anywhere, in a header, a mask or a payload, the messages come out whole and in order."""
    for cut in range(len(STREAM) + 1):
        protocol = opened(LIMIT)
        assert feed_all(protocol, STREAM[:cut], STREAM[cut:]) == MESSAGES, cut
        assert protocol.pending == 0 and protocol.open


def test_a_whole_frame_then_part_of_the_next():
    """The whole frame is handed out at once; the partial one is pending until its rest comes,
    and the frames after it are handled as before."""
    first, second, third = (frame_of(message) for message in (b"one", "twó" * 50, b"three"))
    for cut in range(1, len(second)):
        protocol = opened(LIMIT)
        assert protocol.feed(first + second[:cut]) == [b"one"]
        assert protocol.pending > 0
        assert protocol.feed(second[cut:]) == ["twó" * 50] and protocol.pending == 0
        assert protocol.feed(third) == [b"three"]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 1023, 1024, 1025, 1026, 4099, 70_001])
def test_payloads_unmask_at_every_size(size):
    """Unmasking is right for every remainder mod 4, on both sides of the int/translate switch."""
    payload = os.urandom(size)
    protocol = opened(1 << 20)
    assert protocol.feed(client_frame(BINARY, payload) + client_frame(BINARY, payload[::-1])) == [
        payload, payload[::-1]]


@pytest.mark.parametrize("limit", [125, 300, 70_000])
def test_the_limit_is_inclusive_for_every_length_encoding(limit):
    """A message of exactly max_message_size passes; one byte more is 1009 (size and limit),
    whether its length takes 7 bits, 16 or 64."""
    protocol = opened(limit)
    assert protocol.feed(client_frame(BINARY, b"x" * limit)) == [b"x" * limit]
    events = protocol.feed(client_frame(BINARY, b"x" * (limit + 1)))
    assert len(events) == 1 and isinstance(events[0], ws.Failure)
    assert (events[0].code, events[0].size, events[0].limit) == (1009, limit + 1, limit)


@pytest.mark.parametrize("bad, code", [
    (client_frame(TEXT, b"ok \xc3\x28" * 30), 1007),            # invalid UTF-8, 16-bit length
    (client_frame(TEXT, b"\xed\xa0\x80"), 1007),                # a surrogate: not UTF-8
    (client_frame(BINARY, b"hi", masked=False), 1002),          # mask bit missing
    (client_frame(BINARY, b"x" * 200, masked=False), 1002),
    (client_frame(BINARY, b"hi", width=2), 1002),               # length not minimally encoded
    (client_frame(BINARY, b"x" * 200, width=8), 1002),
    (client_frame(BINARY, b"hi", rsv=4), 1002),                 # RSV1 with no extension
    (client_frame(0x3, b"hi"), 1002),                           # reserved opcode
    (client_frame(CONTINUATION, b"hi"), 1002),
    (client_frame(BINARY, b"x" * (LIMIT + 1)), 1009),
])
def test_a_frame_the_fast_path_leaves_fails_as_wsproto_says_after_the_messages_before(bad, code):
    """Whole messages before it in the same chunk come first; then the Failure with wsproto's
    close code; nothing after it is parsed."""
    protocol = opened(LIMIT)
    events = protocol.feed(frame_of("first") + frame_of(b"second") + bad + frame_of(b"after"))
    assert events[:2] == ["first", b"second"]
    assert len(events) == 3 and isinstance(events[2], ws.Failure) and events[2].code == code
    assert not protocol.open and protocol.feed(frame_of(b"more")) == []


def test_fragments_and_control_frames_go_to_wsproto_and_the_fast_path_resumes():
    """A fragmented message with a ping inside is reassembled as before; the next whole
    frame, in the same chunk or the next, comes out after it."""
    protocol = opened(LIMIT)
    events = protocol.feed(frame_of(b"before")
                           + client_frame(TEXT, b"frag", fin=False) + client_frame(PING, b"p")
                           + client_frame(CONTINUATION, b"ment") + frame_of("next"))
    assert events == [b"before", ws.PingReceived(b"p"), "fragment", "next"]
    assert protocol.feed(frame_of(b"again")) == [b"again"] and protocol.pending == 0
    [closed] = protocol.feed(client_frame(0x8, close_payload(1000)))
    assert closed == ws.CloseReceived(1000, "")


def test_after_our_close_whole_data_frames_are_dropped():
    """While our close awaits the peer's, a common frame is discarded, not delivered."""
    protocol = opened(LIMIT)
    protocol.close(1000)
    assert protocol.feed(frame_of(b"late") + frame_of("later")) == []
    assert protocol.feed(client_frame(0x8, close_payload(1000))) == [ws.CloseReceived(1000, "")]


def _heap_per_protocol(count: int, make) -> float:
    make()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(count)]
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == count
    return used / count


def test_an_idle_protocol_keeps_no_wsproto_state():
    """Between messages (after common frames, a fragmented message and a ping alike) the
    protocol holds no frame parser: a few hundred bytes, not wsproto's 1.7 KiB."""
    def idle() -> ws.WebSocketProtocol:
        protocol = opened(LIMIT)
        protocol.feed(frame_of(b"x" * 64) + client_frame(PING, b"p")
                      + client_frame(BINARY, b"a", fin=False) + client_frame(CONTINUATION, b"b"))
        assert protocol.pending == 0
        return protocol

    assert _heap_per_protocol(300, idle) < 400


def test_common_frames_never_reach_wsproto(monkeypatch):
    """The stream of common frames, whole or split at frame boundaries, is parsed without a
    wsproto frame connection (the fast path is what makes the per-message cost; a condition
    that quietly sent every frame to wsproto would pass every other test here)."""
    made = []

    class Counted(ws._FrameConnection):
        def __init__(self, *args, **kwargs) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ws, "_FrameConnection", Counted)
    protocol = opened(LIMIT)
    assert protocol.feed(STREAM) == MESSAGES
    assert feed_all(protocol, *(frame_of(message) for message in MESSAGES)) == MESSAGES
    assert made == []
    assert protocol.feed(client_frame(PING, b"p")) == [ws.PingReceived(b"p")] and made == [1]
