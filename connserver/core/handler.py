"""Handler: what users subclass, the way they subclass socketserver's handlers."""

from __future__ import annotations

import functools
import logging
import socketserver
from typing import Any, Mapping, MutableMapping, Protocol

from .cancel import CancelToken
from ..config import Config
from .closing import Answer
from .connection import Connection
from ..errors import Cancelled, CloseReason, RemoteProtocolError
from ..protocols.framing import Codec, LengthPrefixed, Lines, LineTooLong



class HandlerServer(Protocol):
    """What the handler bases use of their server (a :class:`~connserver.Server`).

    A protocol rather than the class itself, so the handler module does not
    import the server module that imports it; handlers may use all of the
    server's public API.
    """

    config: Config

    def hub(self, name: str = "default", **options: Any) -> Any: ...

    def resource(self, key: Any, factory: Any) -> Any: ...

__all__ = ["Handler", "MessageHandler", "FramedHandler", "LineHandler", "ConnectionLoggerAdapter"]


class ConnectionLoggerAdapter(logging.LoggerAdapter):
    """Prefixes every line with the connection id and peer."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"#{extra.get('conn_id')} {extra.get('peer')} {msg}", kwargs


class Handler(socketserver.BaseRequestHandler):
    """One instance per connection, run on the connection's own thread.

    Methods that may be overridden:

    - ``setup()``: before ``handle()``.
    - ``handle()``: serve the connection; return (or let an exception out) to end it.
    - ``finish()``: after ``handle()``, always (even if it raised).
    - ``connection_closed(reason)``: after the socket is closed, with the
      :class:`~connserver.CloseReason`; for cleanup that must see the outcome.
    - ``access_log_fields()``: extra ``key=value`` pairs for the connection's
      access-log line (a WebSocket's ``ws_close=1001``).
    - ``closing_answer()``: after ``finish()``, what the peer still owes in answer
      to a goodbye (a WebSocket's close frame), for the close to wait for.

    Attributes the server reads when the connection has ended: ``close_code``,
    the protocol's own close code if it has one (a WebSocket's), counted in
    ``ServerStatistics.close_codes``; None (the default) counts nothing.

    Attributes for the handler:

    - ``conn``: the :class:`~connserver.Connection` (all I/O goes through it);
      also ``request``, as in socketserver.
    - ``cancel``: the connection's :class:`~connserver.CancelToken`.
    - ``server``: the :class:`~connserver.Server`.
    - ``peer``: the peer address (``client_address`` in socketserver).
    - ``id``: the connection id, unique within the server.
    - ``logger``: a logger (``connserver.conn``) that prefixes id and peer.

    Exceptions from ``handle()`` end only this connection: peer faults
    (deadlines, resets, protocol errors) are logged briefly and counted; any
    other exception is logged once with its traceback and counted as ``error``.
    """

    conn: Connection
    cancel: CancelToken
    server: HandlerServer
    close_code: int | None = None

    def __init__(self, request: Connection, client_address: Any, server: HandlerServer) -> None:
        self._bind(request, client_address, server)
        super().__init__(request, client_address, server)   # setup(), handle(), finish()

    @classmethod
    def parked(cls, request: Connection, client_address: Any, server: HandlerServer) -> "Handler":
        """An instance that runs nothing yet: a parked connection's engine calls
        ``setup()``, feeds it messages and calls ``finish()`` itself (see parking.py)."""
        self = cls.__new__(cls)
        self._bind(request, client_address, server)
        return self

    def _bind(self, request: Connection, client_address: Any, server: HandlerServer) -> None:
        self.request = request
        self.client_address = client_address
        self.conn = request
        self.cancel = request.cancel_token
        self.id = request.id
        self.peer = client_address
        self.server = server
        request.attach_handler(self)
        self._prepare()

    def _prepare(self) -> None:
        """Hook for the framework's bases, before ``setup()``."""

    @functools.cached_property
    def logger(self) -> ConnectionLoggerAdapter:
        return ConnectionLoggerAdapter(logging.getLogger("connserver.conn"),
                                       {"conn_id": self.id, "peer": self.conn.peer_label})

    def handle(self) -> None:
        """Serve the connection. The default reads and discards until end of stream."""
        while self.conn.recv():
            pass

    def connection_closed(self, reason: CloseReason) -> None:
        """Called once, after the socket was closed, with why it ended."""

    def closing_answer(self) -> Answer | None:
        """The peer's answer to our goodbye, for the lingering close to wait for (its
        input is handed to it instead of being dropped), or None: nothing is owed."""
        return None

    def access_log_fields(self) -> Mapping[str, int | str]:
        """Extra fields for this connection's access-log line, once it has ended
        (values without spaces: the line is ``key=value`` pairs)."""
        return {}


class MessageHandler(Handler):
    """The read loop shared by the framed bases: idle wait, then a read deadline per frame.

    Waiting for a frame's first byte is bounded by ``idle_timeout``; from that
    byte, the whole frame must arrive within ``read_timeout`` (absolute), so a
    peer trickling a frame cannot hold the thread longer than that.
    """

    def make_codec(self) -> Codec:
        raise NotImplementedError

    def dispatch(self, frame: bytes) -> None:
        raise NotImplementedError

    _ending = False
    _message_expires_at: float | None = None
    # What a message deadline that passes is counted as: "read", or "handshake" while a
    # protocol's opening exchange (a WebSocket upgrade) is under way.
    message_phase = "read"
    # Parked, over a rate limit with on_rate_limit="wait": the frames still to handle,
    # the buckets already charged for the first of them, and when to try again.
    _held: list | None = None
    _held_charged = 0
    rate_resume_at: float | None = None

    @property
    def message_expires_at(self) -> float | None:
        """When the message begun so far must be complete (None: none has begun)."""
        return self._message_expires_at

    def _prepare(self) -> None:
        # Before setup(), so a greeting sent there is already framed.
        self.conn.codec = self.make_codec()
        self.conn.set_rate_unit("messages")   # each message is charged as one

    def end(self) -> None:
        """End the connection once the current frame or line has been handled.

        Call it from ``handle_frame``/``handle_line`` (a returned reply is still sent);
        the close reason is ``closed``, unless the peer had closed first.
        """
        self._ending = True

    def handle(self) -> None:
        """Thread mode: wait for each message (idle, then its read deadline) and feed it;
        run the handler's timer when it comes first."""
        conn = self.conn
        idle_timeout = self.server.config.idle_timeout
        idle_expires_at = conn.clock() + idle_timeout
        try:
            while True:
                timer = self.next_timer()
                if timer is not None and not self._input_before(timer, idle_expires_at):
                    self.on_timer()
                    continue
                data = conn.recv_part(self._message_expires_at, self.message_phase)
                if not self.feed(data):
                    return
                data = None   # an idle connection must not keep the last chunk alive
                if timer is not None:
                    idle_expires_at = conn.clock() + idle_timeout
        except Cancelled as cancelled:
            self.say_goodbye(cancelled.reason)
            raise

    def _input_before(self, timer: float, idle_expires_at: float) -> bool:
        """Thread mode, a timer set: wait for input until the timer (True if it came).
        The idle or message deadline, if it comes first, ends the connection as usual."""
        conn = self.conn
        deadline, phase = self._message_expires_at, self.message_phase
        if deadline is None:
            deadline, phase = idle_expires_at, "idle"
        if conn.wait_readable(min(timer, deadline)):
            return True
        if conn.clock() >= deadline:
            conn.recv_part(deadline, phase)   # raises DeadlineExceeded, counted as usual
        return False

    def next_timer(self) -> float | None:
        """When :meth:`on_timer` should run next (on the connection's clock), or None.

        Both modes keep it without a thread or timer object of its own: thread mode
        waits for input until then; parked, the watchdog hands the connection back
        to the pool when it comes. For keepalives (a WebSocket's pings)."""
        return None

    def on_timer(self) -> None:
        """Called once :meth:`next_timer` has passed, between messages; may send."""

    def feed(self, data: bytes) -> bool:
        """Handle a chunk of the stream (``b""``: its end); False once the connection ends.

        Both modes go through here: the thread-mode loop above, and the parked
        engine, which reads without blocking and calls this per chunk.
        """
        conn = self.conn
        codec = conn.codec
        assert codec is not None
        if not data:
            if codec.pending:
                raise RemoteProtocolError(
                    f"peer closed the connection {codec.pending} bytes into a frame")
            return False
        frames = codec.feed(data)
        self._handle_frames(frames)
        if self._ending:
            return False
        if not codec.pending:
            self._message_expires_at = None
        elif frames or self._message_expires_at is None:
            # A new frame started in this chunk: its deadline starts now.
            self._message_expires_at = conn.clock() + self.server.config.read_timeout
        return True

    def _handle_frames(self, frames: list) -> None:
        conn = self.conn
        rate = conn.rate
        for index, frame in enumerate(frames):
            if rate is not None:
                if rate.wait and conn.parked:   # wait with no thread: see resume_held()
                    charged, delay = rate.try_charge(1, self._held_charged)
                    self._held_charged = charged
                    if delay:
                        self._held = frames[index:]
                        self.rate_resume_at = conn.clock() + delay
                        return
                    self._held_charged = 0
                else:
                    conn.charge(1)
            self.dispatch(frame)

    def resume_held(self) -> bool:
        """Parked: handle the frames held back by a rate limit (as many as the limit
        allows now); False once the connection ends. ``rate_resume_at`` is set again
        if some must wait longer."""
        frames, self._held, self.rate_resume_at = self._held or [], None, None
        self._handle_frames(frames)
        if self._ending:
            return False
        if self.conn.codec is not None and self.conn.codec.pending:
            # Input was not read while waiting: the message begun gets its full time.
            self._message_expires_at = self.conn.clock() + self.server.config.read_timeout
        return True

    def goodbye(self, reason: CloseReason) -> bytes | None:
        """What to send a peer whose connection is being cancelled (a shutdown, a
        lifetime...), framed as this handler frames; None sends nothing. Best effort."""
        return None

    def framed_goodbye(self, reason: CloseReason) -> bytes | None:
        """:meth:`goodbye`'s message as it goes on the wire (framed), or None."""
        message = self.goodbye(reason)
        if message is None or self.conn.codec is None:
            return message
        return b"".join(self.conn.codec.frame_parts(message))

    def say_goodbye(self, reason: CloseReason) -> None:
        """Send :meth:`goodbye`'s message, if any (best effort, bounded: ``send_goodbye``)."""
        message = self.framed_goodbye(reason)
        if message is not None:
            self.conn.send_goodbye(message)


class FramedHandler(MessageHandler):
    """Length-prefixed frames: override ``handle_frame``; a returned value is sent back.

    Class variables that may be overridden: ``header`` (``struct`` format of the
    length prefix, default ``"!I"``). The frame limit is ``Config.max_frame_size``.
    """

    header = "!I"

    def make_codec(self) -> Codec:
        return LengthPrefixed(self.server.config.max_frame_size, self.header)

    def dispatch(self, frame: bytes) -> None:
        reply = self.handle_frame(frame)
        if reply is not None:
            self.conn.send_frame(reply)

    def handle_frame(self, frame: bytes) -> bytes | None:
        """Handle one complete frame; return a frame to send back, or None."""
        raise NotImplementedError


class LineHandler(MessageHandler):
    """Text lines: override ``handle_line``; a returned string is sent back as a line.

    Class variables that may be overridden: ``newline`` (``b"\\n"``; a ``\\r``
    before it is dropped), ``encoding`` (``"utf-8"``), ``errors`` (``"replace"``),
    ``max_line`` (bytes; default ``Config.max_frame_size``), ``discard_long_lines``
    (False: a longer line ends the connection with ``frame_too_large``; True: it
    is skipped and ``line_too_long(size)`` is called).
    """

    newline = b"\n"
    encoding = "utf-8"
    errors = "replace"
    max_line: int | None = None
    discard_long_lines = False

    def make_codec(self) -> Codec:
        return Lines(self.max_line or self.server.config.max_frame_size, self.newline,
                     discard_long=self.discard_long_lines)

    def dispatch(self, frame: bytes | LineTooLong) -> None:
        if isinstance(frame, LineTooLong):
            self.line_too_long(frame.size)
            return
        reply = self.handle_line(frame.decode(self.encoding, self.errors))
        if reply is not None:
            self.send_line(reply)

    def line_too_long(self, size: int) -> None:
        """A line over ``max_line`` was skipped (only with ``discard_long_lines``)."""

    def send_line(self, line: str) -> None:
        self.conn.send_frame(line.encode(self.encoding))

    def handle_line(self, line: str) -> str | None:
        """Handle one line (without its newline); return a line to send back, or None."""
        raise NotImplementedError
