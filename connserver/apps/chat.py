"""A line-based chat room on the Hub that works with ``nc`` and ``telnet``.

Try it: ``connserver serve chat``, then ``nc 127.0.0.1 7070`` in two terminals.
Commands: ``/nick NAME``, ``/who``, ``/quit``, ``/help``.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, ClassVar

from ..errors import CloseReason
from ..core.handler import LineHandler
from ..broadcast.hub import Hub, Subscription
from ..broadcast.sequence import Gap

__all__ = ["ChatHandler", "ChatMember", "ChatRoom", "encode_line"]

NICK_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,24}")
# Control characters (terminal escapes included) are removed from what others see.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f]")
GREETING = "* Welcome to connserver chat! Choose a nickname:"
HELP = "* Commands: /nick NAME, /who, /quit, /help. Anything else is said to the room."


class ChatRoom:
    """The nicknames and the hub of one server's chat room.

    ``encode`` turns a notice or a message into the bytes every member receives:
    built once per announcement, and that one object shared by every queue."""

    def __init__(self, hub: Hub, encode: Callable[[str], bytes] | None = None) -> None:
        self.hub = hub
        self.encode = encode or encode_line
        self._lock = threading.Lock()
        self._nicks: dict[str, str] = {}   # lower-case -> as chosen; one entry per member
        self.spread = getattr(hub, "backplane", None) is not None   # over several processes
        if self.spread and hub.on_gap is None:
            hub.on_gap = self._messages_lost

    def _messages_lost(self, gap: Gap) -> None:
        """The backplane lost messages from another server: the members here are told
        (at-most-once delivery is the contract; silence about a loss is not)."""
        self.hub.publish_local(self.encode(
            f"* {gap.missing} message(s) from elsewhere in the room were lost"))

    def claim(self, nick: str, previous: str | None = None) -> bool:
        """Take ``nick`` (giving up ``previous``); False if someone else has it."""
        key = nick.lower()
        with self._lock:
            if key in self._nicks and key != (previous or "").lower():
                return False
            if previous is not None:
                self._nicks.pop(previous.lower(), None)
            self._nicks[key] = nick
            return True

    def release(self, nick: str) -> None:
        with self._lock:
            self._nicks.pop(nick.lower(), None)

    @property
    def where(self) -> str:
        """Nicknames are kept per process: with a backplane, say whose are listed."""
        return " on this server" if self.spread else ""

    def nicks(self) -> list[str]:
        with self._lock:
            return sorted(self._nicks.values(), key=str.lower)

    def announce(self, text: str, exclude: object = None) -> None:
        self.hub.publish(self.encode(text), exclude=exclude)


def encode_line(text: str) -> bytes:
    """A line for a terminal: the text and a newline."""
    return text.encode() + b"\n"


class ChatMember:
    """One member's conversation, whatever carries it (lines, WebSocket messages).

    Mixed into a handler, which provides ``server``, ``conn`` and ``cancel``, and
    :meth:`quit_chat` (how its transport says goodbye). ``room_name`` names the
    hub and the server resource holding the :class:`ChatRoom`; ``encode`` is how
    the room frames what it publishes."""

    room_name: ClassVar[str] = "chat"
    encode: ClassVar[Callable[[str], bytes]] = staticmethod(encode_line)

    nick: str | None = None
    subscription: Subscription | None = None
    server: Any
    conn: Any
    cancel: Any

    @property
    def room(self) -> ChatRoom:
        server, name = self.server, self.room_name
        return server.resource(f"{name}-room", lambda: ChatRoom(server.hub(name), self.encode))

    def quit_chat(self) -> None:
        """``/quit``: say goodbye and end the connection."""
        raise NotImplementedError

    def chat(self, line: str) -> str | None:
        """Handle one line the member typed; return the reply to it, if any."""
        line = line.strip()
        if self.nick is None:
            return self._choose_nick(line)
        if not line:
            return None
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            return self._command(command.lower(), argument.strip())
        text = _CONTROL.sub("", line)
        self.room.announce(f"<{self.nick}> {text}", exclude=self.subscription)
        return None

    def leave_room(self) -> None:
        """Give the nickname back and tell the others (once the member is gone)."""
        if self.nick is None:
            return
        nick, self.nick = self.nick, None
        self.room.release(nick)
        # At shutdown everyone leaves at once: N notices to N members is N² for nothing.
        if self.cancel.reason is not CloseReason.SHUTDOWN:
            self.room.announce(f"* {nick} left", exclude=self.subscription)

    def _choose_nick(self, nick: str) -> str:
        if not NICK_PATTERN.fullmatch(nick):
            return "* A nickname is 1-24 letters, digits, '_', '-' or '.'. Choose a nickname:"
        room = self.room
        if not room.claim(nick):
            return f"* {nick} is taken. Choose a nickname:"
        self.nick = nick
        self.subscription = room.hub.subscribe(self.conn, name=nick)
        room.announce(f"* {nick} joined", exclude=self.subscription)
        return f"* You are {nick}; {len(room.nicks())} online{room.where}. {HELP}"

    def _command(self, command: str, argument: str) -> str | None:
        if command == "/quit":
            self.quit_chat()
            return None
        if command == "/who":
            return f"* Online{self.room.where}: " + ", ".join(self.room.nicks())
        if command == "/nick":
            if not NICK_PATTERN.fullmatch(argument):
                return "* Usage: /nick NAME (1-24 letters, digits, '_', '-' or '.')"
            old = self.nick
            if not self.room.claim(argument, previous=old):
                return f"* {argument} is taken."
            self.nick = argument
            if self.subscription is not None:
                self.subscription.name = argument
            self.room.announce(f"* {old} is now {argument}", exclude=self.subscription)
            return f"* You are now {argument}."
        if command == "/help":
            return HELP
        return f"* Unknown command {command}. {HELP}"


class ChatHandler(ChatMember, LineHandler):
    """Asks for a nickname, then relays lines to everyone else in the room."""

    max_line = 1024
    discard_long_lines = True

    @classmethod
    def usage_hint(cls, address: tuple[str, int] | str) -> str:
        """The daemon's start-up line: how to join from a terminal."""
        if isinstance(address, str):
            return f"chat demo: connect with `nc -U {address}`"
        return f"chat demo: connect with `nc {address[0]} {address[1]}`"

    def setup(self) -> None:
        self.send_line(GREETING)

    def goodbye(self, reason: CloseReason) -> bytes:
        return f"* Disconnected: {reason.value}. Bye!".encode()

    def finish(self) -> None:
        if self.nick is None:
            return
        if self.subscription is not None:
            self.subscription.close()
        self.leave_room()

    def line_too_long(self, size: int) -> None:
        self.send_line(f"* Line too long (over {self.max_line} bytes); not sent.")

    def handle_line(self, line: str) -> str | None:
        return self.chat(line)

    def quit_chat(self) -> None:
        self.end()
        self.conn.send_goodbye(b"* Bye!\n")   # takes the write side back from the hub
