"""The chat room over WebSocket, with its browser page on the same port.

``connserver serve ws-chat``, then open http://127.0.0.1:7070 in two browser
tabs. A plain ``GET /`` returns the page (``ws_chat.html``, shipped with the
package); the page opens a WebSocket to the same address. The conversation is
the line chat's (:class:`~connserver.apps.chat.ChatMember`: nickname first,
``/nick``, ``/who``, ``/quit``, ``/help``), one text message per line.

Broadcasts are WebSocket frames built once (:func:`message_frame`) and shared
by every member's hub queue; a tab that stops reading fills only its own queue
and is disconnected by the hub's policy, the others do not wait for it.
Needs ``connserver[websocket]``.
"""

from __future__ import annotations

import functools
import importlib.resources
from urllib.parse import urlsplit

from ..core.websocket_handler import WebSocketHandler
from ..protocols.websocket import HttpRequest, HttpResponse, UpgradeRequest, message_frame
from .chat import GREETING, ChatMember

__all__ = ["WebSocketChatHandler"]

PAGE = "ws_chat.html"
_NOT_FOUND = HttpResponse(404, b"404 Not Found: the chat page is at /\n")


@functools.cache
def page() -> bytes:
    """The chat client page, as shipped (package data)."""
    return importlib.resources.files(__package__).joinpath(PAGE).read_bytes()


class WebSocketChatHandler(ChatMember, WebSocketHandler):
    """The chat room for browsers: the page on ``GET /``, the room on its WebSocket."""

    room_name = "ws-chat"
    encode = staticmethod(message_frame)
    max_message_size = 4096   # a line typed into a chat box, generously

    @classmethod
    def usage_hint(cls, address: tuple[str, int] | str) -> str:
        """The daemon's start-up line: where to point a browser."""
        if isinstance(address, str):
            return f"ws-chat demo: serving the page and its WebSocket on unix:{address}"
        return f"ws-chat demo: open http://{address[0]}:{address[1]} in two browser tabs"

    def handle_http(self, request: HttpRequest) -> HttpResponse:
        if urlsplit(request.path).path != "/":
            return _NOT_FOUND
        return HttpResponse(200, page(), "text/html; charset=utf-8",
                            (("Cache-Control", "no-cache"),))

    def check_request(self, request: UpgradeRequest) -> int | None:
        # Same origin only: another site's page must not join a user's browser to the room.
        # Clients that send no Origin (not browsers) are welcome.
        origin = request.origin
        if origin is not None and urlsplit(origin).netloc != request.host:
            return 403
        return None

    def on_connect(self) -> None:
        self.send(GREETING)

    def handle_message(self, message: str | bytes) -> str | None:
        if isinstance(message, bytes):
            return "* Binary messages are not relayed; send text."
        return self.chat(message)

    def quit_chat(self) -> None:
        self.send("* Bye!")
        if self.subscription is not None:
            self.subscription.mute()   # nothing after the close frame
        self.close(1000, "bye")

    def on_close(self, code: int, reason: str) -> None:
        if self.subscription is not None:
            self.subscription.mute()
        self.leave_room()
