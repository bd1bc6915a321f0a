"""Framing codecs, sans-I/O: feed bytes in, get complete frames out.

No socket is touched here, so every rule is tested at memory speed. Both
decoders bound the memory they hold by their limit: a length prefix is checked
against ``max_frame_size`` the moment the header is complete, before any of the
body is buffered (an ``0xFFFFFFFF`` prefix costs nothing), and a line longer
than ``max_line`` is refused as soon as that many bytes arrived without a
newline.
"""

from __future__ import annotations

import struct
from typing import Protocol

from ..errors import FrameTooLarge, LocalProtocolError

__all__ = ["Codec", "LengthPrefixed", "Lines", "LineTooLong"]


def _copy_spans(buffer: bytearray, spans: list[tuple[int, int]]) -> list[bytes]:
    """Each span of ``buffer`` as ``bytes``, copied once (``bytes(buffer[a:b])`` copies twice).

    The view is released before returning, so the buffer can be resized again.
    """
    if not spans:
        return []
    with memoryview(buffer) as view:
        return [bytes(view[start:end]) for start, end in spans]


class Codec(Protocol):
    """What a connection needs to read and write frames."""

    max_frame_size: int

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames they completed (maybe none)."""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 at a frame boundary)."""

    def frame_parts(self, payload: bytes) -> tuple[bytes, ...]:
        """The buffers that make ``payload`` one frame on the wire (no copy of it)."""


class LengthPrefixed:
    """Frames preceded by a big-endian length header (``struct`` format, default ``!I``)."""

    def __init__(self, max_frame_size: int, header: str = "!I") -> None:
        if max_frame_size < 0:
            raise ValueError("max_frame_size must not be negative")
        self._header = struct.Struct(header)
        if self._header.format[-1:] not in ("B", "H", "I", "L", "Q") or len(self._header.format.lstrip("!<>=@")) != 1:
            raise ValueError(f"header must be one unsigned integer format such as '!I', not {header!r}")
        self.max_frame_size = max_frame_size
        self._max_encodable = (1 << (8 * self._header.size)) - 1
        self._buffer = bytearray()
        self._expected: int | None = None   # body size of the frame being read

    @property
    def header_size(self) -> int:
        return self._header.size

    @property
    def pending(self) -> int:
        """Bytes of the frame in progress, its header included (0 between frames)."""
        if self._expected is None:
            return len(self._buffer)
        return self._header.size + len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        spans: list[tuple[int, int]] = []
        header_size = self._header.size
        offset = 0
        while True:
            if self._expected is None:
                if len(buffer) - offset < header_size:
                    break
                (size,) = self._header.unpack_from(buffer, offset)
                if size > self.max_frame_size:
                    # Refuse before buffering any of the body.
                    buffer.clear()
                    raise FrameTooLarge(size, self.max_frame_size)
                offset += header_size
                self._expected = size
            end = offset + self._expected
            if len(buffer) < end:
                break
            spans.append((offset, end))
            offset = end
            self._expected = None
        frames = _copy_spans(buffer, spans)
        if offset:
            del buffer[:offset]
        return frames

    def frame_parts(self, payload: bytes) -> tuple[bytes, ...]:
        size = len(payload)
        if size > self._max_encodable:
            raise LocalProtocolError(
                f"a {size}-byte frame does not fit a {self._header.size}-byte length header")
        return (self._header.pack(size), payload)


class LineTooLong:
    """Stands in the output of ``Lines(..., discard_long=True)`` for a line it dropped."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size   # bytes seen of the line (at least the limit + 1)

    def __repr__(self) -> str:
        return f"LineTooLong({self.size})"


class Lines:
    """Lines ending with ``newline``; a trailing ``\\r`` is dropped when it is ``\\n``.

    A line longer than ``max_line`` raises :class:`~connserver.FrameTooLarge`, or,
    with ``discard_long=True``, is skipped up to its newline and reported by a
    :class:`LineTooLong` in the output, so the connection can carry on.
    """

    def __init__(self, max_line: int, newline: bytes = b"\n", *, discard_long: bool = False) -> None:
        if max_line <= 0:
            raise ValueError("max_line must be positive")
        if not newline:
            raise ValueError("newline must not be empty")
        self.max_frame_size = max_line
        self.newline = newline
        self.discard_long = discard_long
        self._buffer = bytearray()
        self._scanned = 0        # bytes already searched for a newline
        self._discarding = 0     # > 0: inside an over-long line, this many bytes dropped

    @property
    def pending(self) -> int:
        return len(self._buffer) + self._discarding

    def feed(self, data: bytes) -> list:
        newline = self.newline
        lines: list = []
        if self._discarding:
            index = data.find(newline)
            if index < 0:
                self._discarding += len(data)
                return lines
            self._discarding = 0
            data = data[index + len(newline):]
        buffer = self._buffer
        buffer += data
        start = 0
        search_from = max(0, self._scanned - len(newline) + 1)
        while True:
            index = buffer.find(newline, search_from)
            if index < 0:
                break
            end = index
            if newline == b"\n" and index > start and buffer[index - 1] == 13:   # "\r"
                end -= 1   # the "\r" of "\r\n" is not part of the line, nor of its size
            if end - start > self.max_frame_size:
                self._too_long(lines, end - start)
            else:
                lines.extend(_copy_spans(buffer, [(start, end)]))
            start = search_from = index + len(newline)
        if start:
            del buffer[:start]
        # An incomplete line may hold max_line bytes, then a newline's first bytes (or
        # the "\r" of "\r\n") before it is known to be too long.
        limit = self.max_frame_size + len(newline) - 1
        if newline == b"\n" and buffer.endswith(b"\r"):
            limit += 1
        if len(buffer) > limit:
            size = len(buffer)
            buffer.clear()
            self._scanned = 0
            self._too_long(lines, size)
            self._discarding = size
            return lines
        self._scanned = len(buffer)
        return lines

    def _too_long(self, lines: list, size: int) -> None:
        if not self.discard_long:
            self._buffer.clear()
            self._scanned = 0
            raise FrameTooLarge(size, self.max_frame_size)
        lines.append(LineTooLong(size))

    def frame_parts(self, payload: bytes) -> tuple[bytes, ...]:
        if self.newline in payload:
            raise LocalProtocolError("a line to send must not contain the newline sequence")
        return (payload, self.newline)
