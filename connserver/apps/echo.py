"""Echo: every byte received is sent back."""

from __future__ import annotations

from ..handler import Handler

__all__ = ["EchoHandler"]


class EchoHandler(Handler):
    """Raw echo: the smallest complete handler, and the benchmark baseline."""

    def handle(self) -> None:
        recv, sendall = self.conn.recv, self.conn.sendall
        while data := recv():
            sendall(data)
