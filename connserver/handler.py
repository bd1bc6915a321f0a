"""Handler: what users subclass, the way they subclass socketserver's handlers."""

from __future__ import annotations

import functools
import logging
import socketserver
from typing import TYPE_CHECKING, Any, MutableMapping

from .cancel import CancelToken
from .connection import Connection
from .errors import CloseReason

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Handler", "ConnectionLoggerAdapter"]


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
    server: "Server"

    def __init__(self, request: Connection, client_address: Any, server: "Server") -> None:
        self.conn = request
        self.cancel = request.cancel_token
        self.id = request.id
        self.peer = client_address
        request._handler = self
        super().__init__(request, client_address, server)

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
