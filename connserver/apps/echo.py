"""Echo: every byte received is sent back."""

from __future__ import annotations

from ..core.handler import FramedHandler, Handler

__all__ = ["EchoHandler", "FramedEchoHandler"]


class EchoHandler(Handler):
    """Raw echo: the smallest complete handler, and the benchmark baseline."""

    def handle(self) -> None:
        recv, sendall = self.conn.recv, self.conn.sendall
        while True:
            data = recv()
            if not data:
                return
            sendall(data)
            data = None   # not held while waiting: an idle connection pins no message


class FramedEchoHandler(FramedHandler):
    """Length-prefixed echo: each frame comes back as one frame."""

    def handle_frame(self, frame: bytes) -> bytes:
        return frame
