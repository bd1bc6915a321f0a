"""Framing codecs without sockets: limits before allocation, any split gives the same frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connserver import FrameTooLarge, LocalProtocolError
from connserver.framing import LengthPrefixed, Lines


def encode(frames: list[bytes], header: str = "!I") -> bytes:
    codec = LengthPrefixed(1 << 20, header)
    return b"".join(b"".join(codec.frame_parts(frame)) for frame in frames)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), max_size=20),
       cuts=st.lists(st.integers(min_value=0, max_value=7000), max_size=30))
def test_length_prefixed_any_split_gives_the_same_frames(frames, cuts):
    """However the byte stream is cut, the decoder yields the same frames."""
    decoder = LengthPrefixed(300)
    received = []
    for piece in split_at(encode(frames), cuts):
        received.extend(decoder.feed(piece))
    assert received == frames and decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=100).filter(lambda b: b"\n" not in b and not b.endswith(b"\r")),
                      max_size=20),
       cuts=st.lists(st.integers(min_value=0, max_value=2500), max_size=30))
def test_lines_any_split_gives_the_same_lines(lines, cuts):
    """However the byte stream is cut, the line decoder yields the same lines."""
    decoder = Lines(100)
    data = b"".join(line + b"\n" for line in lines)
    received = []
    for piece in split_at(data, cuts):
        received.extend(decoder.feed(piece))
    assert received == lines


def test_oversized_prefix_is_refused_before_the_body():
    """A 0xFFFFFFFF prefix raises at once and nothing of it is buffered."""
    decoder = LengthPrefixed(1024)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 10)
    assert info.value.size == 0xFFFFFFFF and decoder.pending == 0
    with pytest.raises(FrameTooLarge):
        LengthPrefixed(1024).feed(struct.pack("!I", 1025))
    assert LengthPrefixed(1024).feed(struct.pack("!I", 1024)) == []


def test_decoder_memory_is_bounded_by_the_limit():
    """A frame in progress holds at most header + limit bytes."""
    decoder = LengthPrefixed(100)
    decoder.feed(struct.pack("!I", 100) + b"x" * 99)
    assert decoder.pending == 103
    assert decoder.feed(b"x") == [b"x" * 100] and decoder.pending == 0


def test_long_line_without_newline_is_refused():
    """A line longer than max_line raises as soon as that many bytes arrived."""
    decoder = Lines(10)
    assert decoder.feed(b"0123456789") == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"A")
    assert decoder.pending == 0
    assert Lines(10).feed(b"hello\r\nworld\n") == [b"hello", b"world"]


@pytest.mark.parametrize("chunks", [[b"0123456789\r\n"], [b"0123456789\r", b"\n"],
                                    [b"0123456789", b"\r", b"\n"]])
def test_line_of_max_line_bytes_with_crlf_is_accepted(chunks):
    """A line of exactly max_line bytes is accepted whether it ends in "\\n" or "\\r\\n"."""
    decoder = Lines(10)
    lines = [line for chunk in chunks for line in decoder.feed(chunk)]
    assert lines == [b"0123456789"] and decoder.pending == 0
    with pytest.raises(FrameTooLarge):
        Lines(10).feed(b"0123456789A\r\n")
    with pytest.raises(FrameTooLarge):
        Lines(10).feed(b"0123456789\rA")


def test_frame_parts_do_not_copy_the_payload():
    """Encoding returns the payload object itself beside its header (for sendmsg)."""
    payload = b"x" * 1000
    header, body = LengthPrefixed(2000).frame_parts(payload)
    assert body is payload and header == struct.pack("!I", 1000)
    with pytest.raises(LocalProtocolError):
        LengthPrefixed(1 << 20, "!H").frame_parts(b"x" * 70000)
    with pytest.raises(LocalProtocolError):
        Lines(10).frame_parts(b"a\nb")
    with pytest.raises(ValueError):
        LengthPrefixed(10, "!i")
