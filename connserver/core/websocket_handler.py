"""WebSocketHandler: WebSocket messages on a connserver connection, threaded or parked.

A message handler like :class:`~connserver.FramedHandler`: the protocol lives in
:mod:`connserver.protocols.websocket` (sans-I/O, on wsproto); this class only
moves its bytes and calls the user's methods. Everything goes through
:meth:`MessageHandler.feed`'s contract, so the same class runs on its own
thread or parked with no thread between messages (``Config.park``), under the
same deadlines:

- the upgrade must be complete within ``handshake_timeout`` of the connection's
  start (PROXY and TLS, which come first, included): until it is, the
  handshake deadline stands where a message's read deadline would, and is
  counted as ``handshake_deadline`` (``message_phase``);
- a message must be complete within ``read_timeout`` of its first byte, a
  fragmented one too; between messages ``idle_timeout`` applies;
- every send is bounded by ``write_timeout`` (parked: queued, bounded by
  ``max_write_buffer``), as every write of a connection is;
- after :meth:`WebSocketHandler.close`, the peer has ``close_timeout`` to answer
  with its close frame before the socket is shut; after a shutdown's or a
  lifetime's 1001, the lingering close waits for that answer the same way
  (:meth:`WebSocketHandler.closing_answer`), within the linger's bound.

How each way of ending is counted (close reason in stats, and the close code):

==================================  ==========  =======================
what happened                       close code  close reason
==================================  ==========  =======================
the peer closed (its close frame)   its code    ``eof``
our ``close()``, answered           ours        ``closed``
our ``close()``, not answered       ours        ``read_deadline``
message over ``max_message_size``   1009        ``frame_too_large``
invalid UTF-8 in a text message     1007        ``protocol_error``
any other protocol violation        1002        ``protocol_error``
origin not allowed, hook refused    (HTTP 4xx)  ``rejected``
a plain GET answered (handle_http)  (HTTP any)  ``closed``
malformed upgrade request           (HTTP 4xx)  ``protocol_error``
shutdown, lifetime                  1001        ``shutdown``, ``lifetime``
TCP closed without a close frame    1006        ``eof``
upgrade not done in time            (none)      ``handshake_deadline``
idle, read or write deadline        1006        ``idle``, ``read_deadline``…
==================================  ==========  =======================
"""

from __future__ import annotations

from typing import ClassVar, Collection, Sequence

from ..errors import CloseReason, ConnServerError, LocalProtocolError, RemoteProtocolError
from ..protocols.framing import Codec
from ..protocols import websocket as ws
from .closing import Answer
from .handler import MessageHandler

__all__ = ["WebSocketHandler", "HandshakeRejected"]

_GOODBYE_CODES = {CloseReason.SHUTDOWN: ws.GOING_AWAY, CloseReason.LIFETIME: ws.GOING_AWAY,
                  CloseReason.RATE_LIMITED: ws.POLICY_VIOLATION, CloseReason.LIMIT: ws.POLICY_VIOLATION}


class HandshakeRejected(ConnServerError):
    """The server refused the upgrade (origin not allowed, or ``check_request``)."""

    close_reason = CloseReason.REJECTED

    def __init__(self, status: int, why: str) -> None:
        super().__init__(status, why)
        self.status = status
        self.why = why

    def __str__(self) -> str:
        return f"WebSocket upgrade rejected with HTTP {self.status}: {self.why}"


class KeepaliveTimeout(ConnServerError):
    """The peer did not answer a keepalive ping within ``ping_timeout``."""

    close_reason = CloseReason.KEEPALIVE


class WebSocketHandler(MessageHandler):
    """WebSocket messages: override :meth:`handle_message`; a returned value is sent back.

    Methods that may be overridden:

    - ``check_request(request)``: before accepting; return None to accept, or an
      HTTP status (401, 403, 404...) to refuse. ``request`` is an
      :class:`~connserver.protocols.websocket.UpgradeRequest` (path, headers);
      the peer is ``self.peer``.
    - ``handle_http(request)``: a plain ``GET`` that is not an upgrade (a browser
      opening the page); return an :class:`~connserver.protocols.websocket.HttpResponse`
      to answer it (then the connection closes), or None to refuse it with 400.
    - ``select_subprotocol(offered)``: the subprotocol to speak, or None.
    - ``on_connect()``: the upgrade is done; messages may be sent.
    - ``handle_message(message)``: one complete message, ``str`` (text) or
      ``bytes`` (binary); a returned ``str`` goes back as text, ``bytes`` as binary.
    - ``on_close(code, reason)``: once, when the WebSocket has closed, however it
      ended (1006 when no close frame was exchanged).
    - ``on_pong(payload)``: a pong arrived.

    Methods for the handler: :meth:`send`, :meth:`close`.

    Class variables that may be overridden: ``allowed_origins`` (None: any;
    otherwise the ``Origin`` values accepted, with None in it to accept requests
    that carry none, as non-browser clients do; others get 403),
    ``subprotocols`` (those spoken, in order of preference), ``max_message_size``
    (bytes; default ``Config.max_frame_size``), ``max_handshake_size`` (bytes of
    the upgrade request's head), ``close_timeout`` (seconds the peer has to
    answer our close), ``ping_interval`` (seconds between keepalive pings; None:
    no pings) and ``ping_timeout`` (seconds the peer has to answer one, else the
    connection ends with close code 1011 and reason ``keepalive_timeout``),
    ``compression`` (None: a client's permessage-deflate offer is declined;
    ``"deflate"``: accepted, with inflated messages held to ``max_message_size``
    — a decompression bomb gets 1009 — and the messages we send compressed).
    Pings are kept by the engine's timers (:meth:`next_timer`): no thread and no
    timer object per connection; a pong is input, so it keeps the connection
    from idling out. ``latency`` is the last ping's round trip, in seconds
    (shown in ``/connections``).

    Attributes: ``request`` is the Connection, as in every handler; the upgrade
    request is ``upgrade`` (once accepted, less the headers the handshake used up:
    ``Upgrade``, ``Connection``, ``Sec-WebSocket-*``; see
    :meth:`~connserver.protocols.websocket.UpgradeRequest.trimmed`);
    ``subprotocol`` the one chosen; ``close_code`` and ``close_reason_text`` how
    the WebSocket closed (None while open).

    Call :meth:`send` and :meth:`close` from the handler's own methods (they run
    on the connection's thread, or the pool thread serving it): a connection's
    writes are not to be interleaved from another thread.
    """

    allowed_origins: ClassVar[Collection[str | None] | None] = None
    subprotocols: ClassVar[Sequence[str]] = ()
    max_message_size: ClassVar[int | None] = None
    max_handshake_size: ClassVar[int] = 16384
    close_timeout: ClassVar[float] = 10.0
    ping_interval: ClassVar[float | None] = 20.0
    ping_timeout: ClassVar[float] = 20.0
    compression: ClassVar[str | None] = None

    upgrade: ws.UpgradeRequest | None = None
    subprotocol: str | None = None
    close_code: int | None = None
    close_reason_text: str | None = None
    _protocol: ws.WebSocketProtocol
    _close_expires_at: float | None = None
    _on_close_called = False
    latency: float | None = None          # the last keepalive ping's round trip, s
    _ping_due: float | None = None        # when the next ping goes out
    _pong_due: float | None = None        # when the ping in flight must be answered by
    _ping_sent_at = 0.0
    _pings = 0

    # --- the hooks -------------------------------------------------------------------

    def check_request(self, request: ws.UpgradeRequest) -> int | None:
        """Accept (None) or refuse with an HTTP status; called after the origin check."""
        return None

    def handle_http(self, request: ws.HttpRequest) -> ws.HttpResponse | None:
        """A plain GET on the WebSocket's port: a response to send, or None (HTTP 400)."""
        return None

    def select_subprotocol(self, offered: Sequence[str]) -> str | None:
        """The first of ``subprotocols`` the client offered, or None (none spoken)."""
        return next((name for name in self.subprotocols if name in offered), None)

    def on_connect(self) -> None:
        """The WebSocket is open (the 101 response was sent)."""

    def handle_message(self, message: str | bytes) -> str | bytes | None:
        """Handle one complete message; return a message to send back, or None."""
        raise NotImplementedError

    def on_close(self, code: int, reason: str) -> None:
        """The WebSocket closed with ``code`` (1006: without a close frame)."""

    def on_pong(self, payload: bytes) -> None:
        """A pong arrived (an answer to a ping, or unsolicited)."""

    # --- for the handler ---------------------------------------------------------------

    def send(self, message: str | bytes) -> None:
        """Send one message: ``str`` as text, ``bytes`` (or bytearray) as binary."""
        protocol = self._protocol
        if isinstance(message, str):
            self.conn.sendall(protocol.text_frame(message))
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self.conn.send_frame(message)   # header and payload by scatter-gather, uncopied
        else:
            raise TypeError(f"a WebSocket message is str or bytes, not {type(message).__name__}")

    def close(self, code: int = ws.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the close handshake: send a close frame; the peer has ``close_timeout``
        to answer before the socket is shut. Messages arriving meanwhile are dropped."""
        self.conn.sendall(self._protocol.close(code, reason))
        self.close_code, self.close_reason_text = code, reason
        self._close_expires_at = self.conn.clock() + self.close_timeout
        self._message_expires_at = self._close_expires_at

    # --- the engine's side -----------------------------------------------------------

    def _configure(self) -> None:
        """The server's websocket_* settings, where given, override the class's."""
        config = self.server.config
        if config.websocket_ping_interval is not None:
            self.ping_interval = config.websocket_ping_interval or None   # type: ignore[misc]
        if config.websocket_ping_timeout is not None:
            self.ping_timeout = config.websocket_ping_timeout             # type: ignore[misc]
        if config.websocket_compression != "default":
            self.compression = (None if config.websocket_compression == "off"  # type: ignore[misc]
                                else config.websocket_compression)

    def make_codec(self) -> Codec:
        self._configure()
        self._protocol = ws.WebSocketProtocol(
            self.max_message_size or self.server.config.max_frame_size, self.max_handshake_size,
            self.compression)
        return self._protocol

    def _prepare(self) -> None:
        super()._prepare()
        # Until the upgrade is done, the handshake deadline holds the place of a
        # message's: both modes wait for input under message_expires_at.
        self._message_expires_at = self.conn.created_at + self.server.config.handshake_timeout
        self.message_phase = "handshake"   # counted as handshake_deadline if it passes

    def feed(self, data: bytes) -> bool:
        """Handle a chunk of the stream (``b""``: its end); False once the connection ends."""
        protocol = self._protocol
        if not data:
            return self._stream_ended()
        handshaking = protocol.state == "handshake"
        try:
            events = protocol.feed(data)
        except ws.HandshakeFailed as failed:
            self._send_last(protocol.reject(failed.status, f"{failed.message}\n".encode()))
            raise
        self._handle_frames(events)
        if self._ending:
            return False
        completed = bool(events)
        if handshaking and protocol.open and self.rate_resume_at is None:
            # Just upgraded: what came behind the request is handled now, not when
            # more arrives (a client that sent a message with it waits for its reply).
            events = protocol.feed(b"")
            self._handle_frames(events)
            if self._ending:
                return False
        self._set_deadline(completed)
        return True

    def resume_held(self) -> bool:
        going = super().resume_held()
        if going:
            self._set_deadline(False)
        return going

    def _set_deadline(self, completed: bool) -> None:
        """What the next wait for input is bounded by (see the module docstring)."""
        protocol = self._protocol
        if protocol.state == "handshake":
            return   # the handshake deadline set in _prepare() stands
        if self._close_expires_at is not None:
            self._message_expires_at = self._close_expires_at
        elif not protocol.pending:
            self._message_expires_at = None
        elif completed or self._message_expires_at is None:
            self._message_expires_at = self.conn.clock() + self.server.config.read_timeout

    def _stream_ended(self) -> bool:
        protocol = self._protocol
        pending = protocol.pending and protocol.state != "handshake"
        self._closed(ws.ABNORMAL_CLOSURE, "")
        if pending:
            raise RemoteProtocolError(f"peer closed the connection {protocol.pending} bytes "
                                      "into a WebSocket message")
        return False

    def dispatch(self, event: ws.Event) -> None:
        if isinstance(event, (str, bytes)):
            protocol = self._protocol
            if not protocol.open:
                return
            reply = self.handle_message(event)
            if reply is not None and protocol.open:
                self.send(reply)
        elif isinstance(event, ws.PingReceived):
            if self._protocol.open:
                self.conn.sendall(self._protocol.pong(event.payload))
        elif isinstance(event, ws.PongReceived):
            self._pong_received(event.payload)
        elif isinstance(event, ws.CloseReceived):
            self._close_received(event)
        elif isinstance(event, ws.Failure):
            self._fail(event)
        elif isinstance(event, ws.UpgradeRequest):
            self._upgrade(event)
        elif isinstance(event, ws.HttpRequest):
            self._serve_http(event)

    def _upgrade(self, request: ws.UpgradeRequest) -> None:
        self.upgrade = request
        origins = self.allowed_origins
        if origins is not None and request.origin not in origins:
            self._reject(403, f"origin {request.origin!r} not allowed")
        status = self.check_request(request)
        if status is not None:
            self._reject(status, "refused by check_request()")
        subprotocol = self.select_subprotocol(request.subprotocols)
        if subprotocol is not None and subprotocol not in request.subprotocols:
            raise LocalProtocolError(f"select_subprotocol() chose {subprotocol!r}, "
                                     f"which the client did not offer")
        self.conn.sendall(self._protocol.accept(subprotocol))
        self.upgrade = request.trimmed()
        self.subprotocol = subprotocol
        self._message_expires_at = None
        self.message_phase = "read"
        if self.ping_interval:
            self._ping_due = self.conn.clock() + self.ping_interval
        self.on_connect()

    # --- keepalive, on the engine's timers ------------------------------------------

    def next_timer(self) -> float | None:
        due = self._pong_due if self._pong_due is not None else self._ping_due
        if due is None or self._close_expires_at is not None or not self._protocol.open:
            return None
        return due

    def on_timer(self) -> None:
        """Send the next keepalive ping; or, if the last one went unanswered, end."""
        now = self.conn.clock()
        if self._pong_due is not None:
            if now < self._pong_due:
                return
            self._send_last(ws.close_frame(ws.INTERNAL_ERROR, "keepalive ping timeout"))
            self._closed(ws.INTERNAL_ERROR, "keepalive ping timeout")
            raise KeepaliveTimeout(f"no pong within {self.ping_timeout:g} s")
        if self._ping_due is None or now < self._ping_due:
            return
        self._pings += 1
        self.conn.sendall(self._protocol.ping(b"%d" % self._pings))
        self._ping_sent_at = now
        self._pong_due = now + self.ping_timeout
        self._ping_due = None

    def _pong_received(self, payload: bytes) -> None:
        if self._pong_due is not None and payload == b"%d" % self._pings:
            now = self.conn.clock()
            self.latency = now - self._ping_sent_at
            self._pong_due = None
            if self.ping_interval:
                self._ping_due = now + self.ping_interval
        self.on_pong(payload)

    def _serve_http(self, request: ws.HttpRequest) -> None:
        response = self.handle_http(request)
        if response is None:
            failed = ws.HandshakeFailed(400, "not a WebSocket upgrade (no 'Upgrade: websocket' "
                                             "header) and handle_http() serves nothing")
            self._send_last(self._protocol.reject(400, f"{failed.message}\n".encode()))
            raise failed
        self.conn.sendall(self._protocol.respond(response))
        self.end()

    def _reject(self, status: int, why: str) -> None:
        body = f"{status} {why}\n".encode()
        self.conn.sendall(self._protocol.reject(status, body))
        raise HandshakeRejected(status, why)

    def _close_received(self, event: ws.CloseReceived) -> None:
        if self._close_expires_at is None:   # the peer began: answer, and it closed cleanly
            self.conn.sendall(self._protocol.reply_to_close(event))
            self.conn.outcome = CloseReason.EOF
        self._closed(event.code, event.reason)
        self.end()

    def _fail(self, failure: ws.Failure) -> None:
        """The peer broke a rule: close frame with its code, then end with its reason."""
        self._send_last(ws.close_frame(failure.code, failure.reason))
        self._closed(failure.code, failure.reason)
        raise failure.error()

    def _send_last(self, frame: bytes) -> None:
        """A last frame, best effort: parked, queued (the engine delivers it before closing,
        on a thread that may wait); on a thread, under ``close_timeout``."""
        if self.conn.parked:
            self.conn.sendall(frame)
        else:
            self.conn.send_goodbye(frame, timeout=self.close_timeout)

    def _closed(self, code: int, reason: str) -> None:
        if self._on_close_called or self.upgrade is None or self._protocol.state == "handshake":
            return
        self._on_close_called = True
        if self._close_expires_at is None or code != ws.ABNORMAL_CLOSURE:
            self.close_code, self.close_reason_text = code, reason
        self.on_close(code, reason)

    def framed_goodbye(self, reason: CloseReason) -> bytes | None:
        """A close frame (1001 for a shutdown or a lifetime) if the WebSocket is open.

        The engine sends it, best effort, to a connection being cancelled."""
        if not self._protocol.open:
            return None
        code = _GOODBYE_CODES.get(reason, ws.NORMAL_CLOSURE)
        frame = self._protocol.close(code, reason.value)
        self.close_code, self.close_reason_text = code, reason.value
        return frame

    def closing_answer(self) -> Answer | None:
        """Our close frame went unanswered so far (a shutdown's 1001, or ``close()``):
        the lingering close waits for the peer's, within what is left of
        ``close_timeout`` (and of the linger, which a drain's grace bounds)."""
        protocol = self._protocol
        if protocol.state != "closing":
            return None
        remaining = self.close_timeout
        if self._close_expires_at is not None:
            remaining = self._close_expires_at - self.conn.clock()
        if remaining <= 0:
            return None
        return Answer(self._take_closing_input, remaining)

    def _take_closing_input(self, data: bytes) -> bool:
        """While closing: whether ``data`` completed the peer's close frame (or broke the
        protocol, which ends the wait too). Messages in it are dropped, as after close()."""
        return any(isinstance(event, (ws.CloseReceived, ws.Failure))
                   for event in self._protocol.feed(data))

    def access_log_fields(self) -> dict[str, int | str]:
        """``ws_close=<code>`` once the WebSocket was open (the close code is counted in
        ``ServerStatistics.close_codes`` too, as ``close_code``)."""
        return {} if self.close_code is None else {"ws_close": self.close_code}

    def finish(self) -> None:
        """After the last message, however the connection ended: ``on_close`` is owed once."""
        try:
            self._closed(self.close_code or ws.ABNORMAL_CLOSURE, self.close_reason_text or "")
        finally:
            super().finish()
