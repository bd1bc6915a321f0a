"""WebSocket echo: every message comes back, text as text, binary as binary.

``connserver serve ws-echo``; for conformance tools and as the smallest
:class:`~connserver.WebSocketHandler`. Needs ``connserver[websocket]``.
"""

from __future__ import annotations

from ..core.websocket_handler import WebSocketHandler

__all__ = ["WebSocketEchoHandler"]


class WebSocketEchoHandler(WebSocketHandler):
    """Echo: each message is sent back as it came."""

    def handle_message(self, message: str | bytes) -> str | bytes:
        return message
