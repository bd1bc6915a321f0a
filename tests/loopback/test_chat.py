"""The chat demo: nicknames, relay, commands, long lines, leave notices."""

from __future__ import annotations

import pytest


from connserver.apps.chat import ChatHandler
from tests.conftest import connect, wait_closed

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked


class Client:
    """A line-oriented test client with a safety-net timeout."""

    def __init__(self, server):
        self.sock = connect(server)
        self.buffer = b""

    def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed; had {self.buffer!r}"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def say(self, text: str | bytes) -> None:
        self.sock.sendall(text if isinstance(text, bytes) else text.encode() + b"\r\n")

    def join(self, nick: str) -> str:
        assert "Choose a nickname" in self.line()
        self.say(nick)
        return self.line()

    def close(self) -> None:
        self.sock.close()


def join_and_talk(alice, bob) -> None:
    """Both join, alice says hello, bob asks who is online (plain or TLS clients)."""
    assert alice.join("alice").startswith("* You are alice; 1 online")
    assert bob.join("bob").startswith("* You are bob; 2 online")
    assert alice.line() == "* bob joined"
    alice.say("hello bob")
    assert bob.line() == "<alice> hello bob"
    bob.say("/who")
    assert bob.line() == "* Online: alice, bob"


def quit_and_leave(leaver, stayer, name: str) -> None:
    """``leaver`` quits: it gets its goodbye and end of stream; ``stayer`` sees it leave."""
    leaver.say("/quit")
    assert leaver.line() == "* Bye!"
    assert leaver.sock.recv(10) == b""
    assert stayer.line() == f"* {name} left"


def test_two_users_chat_and_see_joins_and_leaves(serve):
    """Joins, messages and leaves reach the other user; own lines are not echoed."""
    server = serve(ChatHandler)
    alice, bob = Client(server), Client(server)
    try:
        join_and_talk(alice, bob)
        bob.say("/nick robert")
        assert bob.line() == "* You are now robert."
        assert alice.line() == "* bob is now robert"
        quit_and_leave(bob, alice, "robert")
    finally:
        alice.close()
        bob.close()
    assert wait_closed(server, 2).close_reasons == {"closed": 1, "eof": 1}


def test_nicknames_are_validated_and_unique(serve):
    """Bad or taken nicknames are refused with a prompt to choose again."""
    server = serve(ChatHandler)
    alice, other = Client(server), Client(server)
    try:
        alice.join("alice")
        assert "Choose a nickname" in other.join("ALICE")
        other.say("no spaces allowed")
        assert "1-24 letters" in other.line()
        other.say("carol")
        assert other.line().startswith("* You are carol")
    finally:
        alice.close()
        other.close()
    wait_closed(server, 2)


def test_long_lines_are_refused_with_a_message(serve):
    """A line over the limit is dropped with a notice; the connection carries on."""
    server = serve(ChatHandler)
    alice, bob = Client(server), Client(server)
    try:
        alice.join("alice")
        bob.join("bob")
        alice.line()   # bob joined
        alice.say(b"x" * 5000 + b"\n")
        assert "Line too long" in alice.line()
        alice.say("still here \x1b[31mred")
        assert bob.line() == "<alice> still here [31mred"
    finally:
        alice.close()
        bob.close()
    wait_closed(server, 2)


def shutdown_and_hear_goodbyes(server, users) -> None:
    """Shut the server down: it drains everyone, whose last line is the goodbye."""
    report = server.shutdown(grace=5.0)
    assert report.clean and report.drained == len(users)
    for user in users:
        lines = []
        while True:
            try:
                lines.append(user.line())
            except AssertionError:   # end of stream
                break
        assert lines[-1] == "* Disconnected: shutdown. Bye!"


def test_shutdown_says_goodbye_to_everyone(serve):
    """At shutdown each user is told why the connection ends."""
    server = serve(ChatHandler)
    users = [Client(server) for _ in range(3)]
    try:
        for index, user in enumerate(users):
            user.join(f"user{index}")
        shutdown_and_hear_goodbyes(server, users)
    finally:
        for user in users:
            user.close()
