"""WebSocket (RFC 6455), sans-I/O: the HTTP/1.1 upgrade and the frames, bounded.

Bytes in, events out, bytes to send; no socket. The parsing is wsproto's (and
h11's for the upgrade request); this module adds what a server facing hostile
peers needs and wsproto leaves to its caller:

- **Bounded input.** The upgrade request may hold ``max_handshake_size`` bytes
  (h11's bound on an incomplete request head). A message is bounded by
  ``max_message_size``: each frame's announced length is checked against what
  the message may still hold the moment its header is parsed, before any of
  its payload is kept (:class:`~connserver.protocols.websocket_frames.Bounds`),
  so a fragmented message is reassembled within the same bound and an
  ``0x7fff...`` length costs nothing (close code 1009).
- **Failures as events, in order.** A protocol violation (1002), invalid UTF-8
  in a text message or a close reason (1007) or an oversized message (1009)
  comes out as a :class:`Failure` after the messages that preceded it, so the
  caller handles those, then sends the close frame and ends.
- **Knowing what is pending.** ``pending`` says whether a message (or a frame
  header) has begun, so the caller can hold it to a read deadline from its
  first byte, as the framing codecs do.

permessage-deflate is declined unless asked for (``compression="deflate"``):
wsproto inflates without an output bound, so it is done here by
:mod:`connserver.protocols.websocket_deflate`, which refuses a message that
would inflate past ``max_message_size`` (1009) before it costs more than that.
Negotiated, the messages we send are compressed too; a broadcast's shared frame
(:func:`message_frame`) is not (an uncompressed message is always allowed).

**The common frame without wsproto.** A whole, final, unfragmented, masked
text or binary frame arriving between messages is parsed by
:func:`~connserver.protocols.websocket_frames.whole_frames` (0.9 µs for 64
bytes, against wsproto's 8); anything else goes to wsproto from that frame's
first byte, as before. wsproto's frame connection (with its event deque) is
made only when such input arrives, and dropped once it is back between
messages, so an idle connection keeps none: 0.12 KiB of protocol state instead
of 2.09 (``benchmarks/ws_state.py``). Making and dropping it costs about 3 µs
on each unusual message (a ping: 10 µs instead of 7). Not with
permessage-deflate: the inflater's context lasts from message to message, and
compressed frames are wsproto's, so its connection is kept from the upgrade on.

Frames to the client are built here (server frames are never masked), so a
binary message goes out as a header and the caller's own buffer, uncopied;
:func:`message_frame` builds a whole frame once, for a broadcast that shares
the same ``bytes`` among every subscriber.

A ``GET`` that is not an upgrade at all (no ``Upgrade: websocket``) comes out as
an :class:`HttpRequest`, so the same port can serve a page (:meth:`respond`);
a caller with nothing to serve refuses it like any malformed upgrade.
"""

from __future__ import annotations

import dataclasses
import http
import struct
from typing import Iterable, Union

import h11
from wsproto.connection import Connection as _FrameConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, Pong,
                            RejectConnection, TextMessage)
from wsproto.extensions import Extension
from wsproto.frame_protocol import Opcode
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as _WsprotoRemoteError

from ..errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from .websocket_deflate import BoundedDeflate, DeflateTooBig
from .websocket_frames import Bounds, TooBig, whole_frames

__all__ = [
    "WebSocketProtocol", "HttpRequest", "UpgradeRequest", "HttpResponse", "PingReceived", "PongReceived", "CloseReceived",
    "Failure", "HandshakeFailed", "close_frame", "frame_header", "message_frame",
    "NORMAL_CLOSURE", "GOING_AWAY", "PROTOCOL_ERROR", "UNSUPPORTED_DATA", "NO_STATUS",
    "ABNORMAL_CLOSURE", "INVALID_DATA", "POLICY_VIOLATION", "MESSAGE_TOO_BIG", "INTERNAL_ERROR",
]

# Close codes (RFC 6455, 7.4.1) that connserver sends or reports.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005          # reported when the peer's close frame had no code; never sent
ABNORMAL_CLOSURE = 1006   # reported when the connection ended without a close frame; never sent
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

_MAX_CONTROL_PAYLOAD = 125
_RSV1 = 0x40   # a compressed message's first frame (RFC 7692, 6)
COMPRESSIONS = (None, "deflate")
_HANDSHAKE, _OPEN, _LOCAL_CLOSING, _CLOSED = "handshake", "open", "closing", "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class HttpRequest:
    """A plain ``GET`` (not a WebSocket upgrade): a page may be served for it.

    ``headers`` keeps every header in order, names in lower case, values
    decoded as Latin-1 (HTTP's own charset); :meth:`header` finds one.
    """

    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    @property
    def origin(self) -> str | None:
        return self.header("origin")

    @property
    def host(self) -> str | None:
        return self.header("host")


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeRequest(HttpRequest):
    """The client's upgrade request: what an accept hook decides on."""

    subprotocols: tuple[str, ...]
    extensions: tuple[str, ...]

    def trimmed(self) -> "UpgradeRequest":
        """The request less the headers the handshake itself used up (``Upgrade``,
        ``Connection``, ``Sec-WebSocket-*``: what they offered stays in ``subprotocols``
        and ``extensions``), to keep for the connection's life: loadgen's five headers
        held 0.9 KiB per idle WebSocket, four of them these."""
        kept = tuple(header for header in self.headers if header[0] not in _HANDSHAKE_HEADERS)
        return dataclasses.replace(self, headers=kept)


_HANDSHAKE_HEADERS = frozenset({"upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                                "sec-websocket-protocol", "sec-websocket-extensions"})


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    """An HTTP response to a plain request; sent with ``Connection: close`` and its length."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class PingReceived:
    payload: bytes


@dataclasses.dataclass(frozen=True)
class PongReceived:
    payload: bytes


@dataclasses.dataclass(frozen=True)
class CloseReceived:
    """The peer's close frame (``code`` 1005 when it carried none)."""

    code: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Failure:
    """The peer broke a rule: the connection must be closed with ``code``.

    ``size`` and ``limit`` are set for 1009 (message too big).
    """

    code: int
    reason: str
    size: int = 0
    limit: int = 0

    def error(self) -> RemoteProtocolError:
        """The connserver error that ends the connection (its close reason counted)."""
        if self.code == MESSAGE_TOO_BIG:
            return FrameTooLarge(self.size, self.limit)
        return RemoteProtocolError(f"WebSocket close {self.code}: {self.reason}")


class HandshakeFailed(RemoteProtocolError):
    """The upgrade request was malformed or not a WebSocket upgrade (HTTP ``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"WebSocket upgrade refused with HTTP {self.status}: {self.message}"


Event = Union[str, bytes, HttpRequest, UpgradeRequest, PingReceived, PongReceived, CloseReceived, Failure]


def frame_header(opcode: int, size: int, fin: bool = True, compressed: bool = False) -> bytes:
    """A server frame's header (unmasked) for a payload of ``size`` bytes."""
    first = (0x80 if fin else 0) | (_RSV1 if compressed else 0) | opcode
    if size <= _MAX_CONTROL_PAYLOAD:
        return struct.pack("!BB", first, size)
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit 123 bytes, whole characters)."""
    encoded = reason.encode("utf-8")
    if len(encoded) > _MAX_CONTROL_PAYLOAD - 2:
        encoded = encoded[:_MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    payload = struct.pack("!H", code) + encoded
    return frame_header(Opcode.CLOSE, len(payload)) + payload


def message_frame(message: str | bytes) -> bytes:
    """One whole unfragmented server frame: text for ``str``, binary for ``bytes``.

    Built once and shared: a hub puts the same object on every subscriber's queue."""
    if isinstance(message, str):
        payload, opcode = message.encode("utf-8"), Opcode.TEXT
    else:
        payload, opcode = bytes(message), Opcode.BINARY
    return frame_header(opcode, len(payload)) + payload


class WebSocketProtocol:
    """One server-side WebSocket connection, sans-I/O (see the module docstring).

    Also a :class:`~connserver.framing.Codec`: ``feed`` returns events (complete
    messages as ``str`` or ``bytes``, :class:`UpgradeRequest`, :class:`PingReceived`,
    :class:`PongReceived`, :class:`CloseReceived`, :class:`Failure`), ``pending``
    says whether a message has begun, ``frame_parts`` frames a binary message.

    States: ``handshake`` → (:meth:`accept`) ``open`` → ``closing`` (we sent a
    close, :meth:`close`) → ``closed``; the peer's close frame, a failure or a
    :meth:`reject` close it straight away.
    """

    # One per connection, kept while it idles: slots, not a dict (about 60 bytes less).
    __slots__ = ("compression", "_deflate", "max_frame_size", "_http", "_handshake", "_frames",
                 "_bounds", "_parts", "_unread", "state")

    def __init__(self, max_message_size: int, max_handshake_size: int = 16384,
                 compression: str | None = None) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must not be negative")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.compression = compression
        self._deflate: BoundedDeflate | None = None   # once negotiated
        self.max_frame_size = max_message_size   # the Codec's name for the bound
        self._http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=max_handshake_size)
        self._handshake: H11Handshake | None = H11Handshake(ConnectionType.SERVER)
        # wsproto's frame connection and the bounds it reports to: made when input the
        # fast path leaves arrives, None while between messages (see the module docstring).
        self._frames: _FrameConnection | None = None
        self._bounds: Bounds | None = None
        self._parts: list | None = None   # the fragments of the message in progress
        self._unread = b""                # bytes that came behind the upgrade request
        self.state = _HANDSHAKE

    @property
    def open(self) -> bool:
        """Messages may be sent (the upgrade is done and no close was sent or received)."""
        return self.state == _OPEN

    @property
    def pending(self) -> int:
        """Bytes of a message or frame begun and not complete (0 between messages)."""
        if self.state == _HANDSHAKE:
            assert self._http is not None
            return len(self._http.trailing_data[0])
        bounds = self._bounds
        if bounds is None:
            return 0   # the fast path takes only whole frames
        return bounds.unparsed + bounds.message_size + (1 if bounds.in_message else 0)

    # --- input --------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return the events they completed, in order.

        During the handshake the one event is the :class:`UpgradeRequest` (or a
        :class:`HandshakeFailed` is raised); answer it with :meth:`accept` or
        :meth:`reject` before feeding more. ``feed(b"")`` after :meth:`accept`
        processes what came behind the request.
        """
        state = self.state
        if state == _HANDSHAKE:
            return self._feed_handshake(data)
        if state == _CLOSED:
            return []
        if self._unread:
            data, self._unread = self._unread + data, b""
        frames = self._frames
        if frames is None:
            if state == _OPEN:
                messages, used = whole_frames(data, self.max_frame_size)
                if used == len(data):
                    return messages
                data = data[used:]
            else:
                messages = []
                if not data:
                    return messages
            frames = self._start_frames()
        else:
            messages = []
        if data:
            assert self._bounds is not None
            self._bounds.fed += len(data)
            frames.receive_data(data)
        messages += self._events()
        bounds = self._bounds
        if (self.state == _OPEN and self._deflate is None and bounds is not None
                and not bounds.in_message and not bounds.unparsed):
            self._frames = self._bounds = None   # between messages: the fast path again
        return messages

    def _start_frames(self) -> _FrameConnection:
        """wsproto's frame connection, for input at a frame boundary; with the bounds
        (which see each frame as it came, compressed) and the inflater, if negotiated."""
        self._bounds = Bounds(self.max_frame_size)
        extensions: list[Extension] = [self._bounds]
        if self._deflate is not None:
            extensions.append(self._deflate)
        self._frames = _FrameConnection(ConnectionType.SERVER, extensions)
        return self._frames

    def _feed_handshake(self, data: bytes) -> list[Event]:
        http = self._http
        assert http is not None
        try:
            http.receive_data(data)
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeFailed(exc.error_status_hint, f"bad HTTP request: {exc}") from None
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return []
        if not isinstance(event, h11.Request):
            raise HandshakeFailed(400, "the connection ended inside the upgrade request")
        assert self._handshake is not None
        if event.method != b"GET":
            raise HandshakeFailed(405, f"method {event.method.decode('latin-1')} is not GET")
        headers = tuple((name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in event.headers)
        path = event.target.decode("latin-1")
        if "websocket" not in _split(value.lower() for name, value in headers if name == "upgrade"):
            return [HttpRequest(path=path, headers=headers)]
        try:
            self._handshake.initiate_upgrade_connection(event.headers, event.target)
        except _WsprotoRemoteError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            raise HandshakeFailed(status, str(exc)) from None
        request = UpgradeRequest(
            path=path, headers=headers,
            subprotocols=tuple(_split(value for name, value in headers
                                      if name == "sec-websocket-protocol")),
            extensions=tuple(_split(value for name, value in headers
                                    if name == "sec-websocket-extensions")))
        return [request]

    def accept(self, subprotocol: str | None = None,
               extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
        """Accept the upgrade; return the ``101 Switching Protocols`` response to send."""
        if self.state != _HANDSHAKE or self._handshake is None or self._http is None:
            raise LocalProtocolError(f"cannot accept a WebSocket in state {self.state}")
        deflate = BoundedDeflate(self.max_frame_size) if self.compression == "deflate" else None
        try:
            response = self._handshake.send(AcceptConnection(
                subprotocol=subprotocol, extensions=[deflate] if deflate else [],
                extra_headers=[(name.encode("latin-1"), value.encode("latin-1"))
                               for name, value in extra_headers]))
        except Exception as exc:   # wsproto's LocalProtocolError: a subprotocol not offered
            raise LocalProtocolError(f"cannot accept the upgrade: {exc}") from None
        self._unread = self._http.trailing_data[0]
        self._http = None   # the request head is not needed again
        self._handshake = None
        if deflate is not None and deflate.enabled():
            # The inflater's context lasts from message to message, and compressed
            # frames are wsproto's: its frame connection is kept from now on.
            self._deflate = deflate
            self._start_frames()
        self.state = _OPEN
        return response

    def reject(self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> bytes:
        """Refuse the upgrade with HTTP ``status``; return the response to send.

        Also for a request that could not be parsed (after :class:`HandshakeFailed`):
        the response is written here, not by h11, which answers only what it parsed.
        """
        fields = tuple(headers)
        if status == 426:
            fields += (("Sec-WebSocket-Version", "13"),)
        return self.respond(HttpResponse(status, body, headers=fields))

    def respond(self, response: HttpResponse) -> bytes:
        """Answer the request (an :class:`HttpRequest`, or a refused upgrade) with
        ``response`` and close; return the bytes to send."""
        if self.state != _HANDSHAKE:
            raise LocalProtocolError(f"cannot answer HTTP on a WebSocket in state {self.state}")
        self.state = _CLOSED
        self._http = self._handshake = None
        status = response.status
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Refused" if status >= 400 else "OK"
        fields = [*response.headers, ("Connection", "close"),
                  ("Content-Type", response.content_type),
                  ("Content-Length", str(len(response.body)))]
        head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields) + "\r\n"
        return head.encode("latin-1") + response.body

    def _events(self) -> list[Event]:
        frames = self._frames
        assert frames is not None
        events: list[Event] = []
        try:
            for event in frames.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    if self.state != _OPEN:
                        continue   # after our close: the peer's data is discarded (RFC 6455, 1.4)
                    parts = self._parts
                    if event.message_finished and not parts:
                        events.append(event.data)
                    elif not event.message_finished:
                        if parts is None:
                            parts = self._parts = []
                        parts.append(event.data)
                    else:
                        assert parts is not None
                        parts.append(event.data)
                        self._parts = None
                        joiner = "" if isinstance(event, TextMessage) else b""
                        events.append(joiner.join(parts))
                elif isinstance(event, Ping):
                    events.append(PingReceived(bytes(event.payload)))
                elif isinstance(event, Pong):
                    events.append(PongReceived(bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    events.append(self._closed_by(event))
                    break
        except (TooBig, DeflateTooBig) as exc:
            if isinstance(exc, DeflateTooBig):
                size, limit = exc.size, exc.limit
            else:
                assert self._bounds is not None
                size, limit = self._bounds.too_big or (0, self._bounds.max_message_size)
            events.append(self._fail(MESSAGE_TOO_BIG, f"message of {size} bytes exceeds "
                                     f"the limit of {limit} bytes", size, limit))
        return events

    def _closed_by(self, event: CloseConnection) -> Event:
        # wsproto reports its own parse failures as a CloseConnection too, leaving its
        # state as it was; only a close frame from the peer moves it.
        if self._frames is not None and self._frames.state not in (
                ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
            return self._fail(int(event.code), event.reason or "protocol error")
        self._parts = None
        self.state = _CLOSED
        return CloseReceived(int(event.code), event.reason or "")

    def _fail(self, code: int, reason: str, size: int = 0, limit: int = 0) -> Failure:
        self._parts = None
        self._frames = None   # nothing more is parsed
        self.state = _CLOSED
        return Failure(code, reason, size, limit)

    # --- output -------------------------------------------------------------------

    def frame_parts(self, payload: bytes) -> tuple[bytes, ...]:
        """A binary message as the buffers to send: its header and ``payload`` itself."""
        self._require_open()
        if self._deflate is not None:
            payload = self._deflate.compress(bytes(payload))
            return (frame_header(Opcode.BINARY, len(payload), compressed=True), payload)
        return (frame_header(Opcode.BINARY, len(payload)), payload)

    def text_frame(self, text: str) -> bytes:
        """A text message, framed."""
        self._require_open()
        encoded = text.encode("utf-8")
        if self._deflate is not None:
            encoded = self._deflate.compress(encoded)
            return frame_header(Opcode.TEXT, len(encoded), compressed=True) + encoded
        return frame_header(Opcode.TEXT, len(encoded)) + encoded

    @property
    def compressed(self) -> bool:
        """permessage-deflate was negotiated."""
        return self._deflate is not None

    def pong(self, payload: bytes) -> bytes:
        return frame_header(Opcode.PONG, len(payload)) + payload

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping (at most 125 bytes of payload), for keepalive."""
        if len(payload) > _MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError("a ping's payload must not exceed 125 bytes")
        self._require_open()
        return frame_header(Opcode.PING, len(payload)) + payload

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> bytes:
        """Start the close handshake (we wait for the peer's close); the frame to send."""
        self._require_open()
        if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
                or 3000 <= code <= 4999):
            raise LocalProtocolError(f"{code} is not a close code an endpoint may send")
        self.state = _LOCAL_CLOSING
        return close_frame(code, reason)

    def reply_to_close(self, received: CloseReceived) -> bytes:
        """The close frame answering the peer's (its code echoed, RFC 6455 5.5.1)."""
        if received.code == NO_STATUS:
            return frame_header(Opcode.CLOSE, 0)
        return close_frame(received.code)

    def _require_open(self) -> None:
        if self.state != _OPEN:
            raise LocalProtocolError(f"the WebSocket is {self.state}: nothing more can be sent")


def _split(values: Iterable[str]) -> list[str]:
    """The comma-separated items of every value, stripped (header lists, RFC 9110 5.6.1)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]
