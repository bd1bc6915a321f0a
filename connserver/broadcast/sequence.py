"""The backplane's envelope and gap counting: at-most-once delivery, made observable.

Redis pub/sub delivers a message to the subscribers connected at that moment,
at most once, and says nothing about what it did not deliver (a subscriber
reconnecting, one cut by its output-buffer limit, a publisher's outbound queue
dropping while Redis was away). So every message carries where it came from and
its place in that origin's stream for its channel, and the receiver counts the
holes, as Centrifugo does with its offset and epoch:

    cs1 <origin> <channel> <seq>\\n<payload>

``origin`` is unique per process run (so a restarted process is a new stream,
never mistaken for a gap or a replay); ``seq`` counts from 1 per (origin,
channel). A receiver that sees ``seq`` jump ahead counts the missing ones as
lost; one that sees an old ``seq`` again (a retried publish) drops it. The first
message of a stream sets its start: what an origin said before this process
subscribed was never owed to it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import socket

__all__ = ["Envelope", "Gap", "SequenceTracker", "new_origin", "encode", "decode", "MalformedEnvelope"]

_MAGIC = b"cs1"


class MalformedEnvelope(ValueError):
    """A message on a backplane channel that no connserver process wrote."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    origin: str
    channel: str
    seq: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class Gap:
    """``missing`` messages from ``origin`` on ``channel`` never arrived here."""

    origin: str
    channel: str
    missing: int


def new_origin() -> str:
    """A name for this process's stream: host and pid to read, random to be unique."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}.{os.getpid()}.{secrets.token_hex(4)}"


def check_token(kind: str, value: str) -> None:
    """Origins and channel names travel in the header: no spaces, no line breaks."""
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"a backplane {kind} must be non-empty without whitespace: {value!r}")


def encode(origin: str, channel: str, seq: int, payload: bytes) -> bytes:
    return b"%s %s %s %d\n%s" % (_MAGIC, origin.encode(), channel.encode(), seq, payload)


def decode(data: bytes) -> Envelope:
    """The envelope of ``data`` (MalformedEnvelope if it is not one)."""
    head, newline, payload = data.partition(b"\n")
    fields = head.split(b" ")
    if not newline or len(fields) != 4 or fields[0] != _MAGIC:
        raise MalformedEnvelope(f"not a connserver backplane message: {head[:60]!r}")
    try:
        seq = int(fields[3])
        origin, channel = fields[1].decode(), fields[2].decode()
    except (ValueError, UnicodeDecodeError):
        raise MalformedEnvelope(f"bad backplane header: {head[:60]!r}") from None
    if seq < 1:
        raise MalformedEnvelope(f"bad backplane sequence number {seq}")
    return Envelope(origin, channel, seq, payload)


class SequenceTracker:
    """The last sequence number seen per (origin, channel); says what went missing.

    Bounded: at most ``max_streams`` streams are remembered, the least recently
    heard from forgotten first (an origin that went away must not cost memory
    for ever; if it speaks again its next message just starts a stream).
    Not thread-safe: one receiving thread owns it.
    """

    def __init__(self, max_streams: int = 10_000) -> None:
        self.max_streams = max_streams
        self._last: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self.gaps = 0          # times a stream jumped ahead
        self.lost = 0          # messages those jumps skipped
        self.duplicates = 0    # messages seen before (dropped)

    def check(self, envelope: Envelope) -> tuple[bool, Gap | None]:
        """Whether to deliver ``envelope``, and the gap before it if there was one."""
        key = (envelope.origin, envelope.channel)
        last = self._last.get(key)
        seq = envelope.seq
        if last is not None and seq <= last:
            self.duplicates += 1
            return False, None
        self._last[key] = seq
        self._last.move_to_end(key)
        if len(self._last) > self.max_streams:
            self._last.popitem(last=False)
        if last is None or seq == last + 1:
            return True, None
        missing = seq - last - 1
        self.gaps += 1
        self.lost += missing
        return True, Gap(envelope.origin, envelope.channel, missing)

    @property
    def streams(self) -> int:
        return len(self._last)
