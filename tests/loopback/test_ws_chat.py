"""ws-chat: its page on a plain GET, the room over WebSocket, and the hub under it.

Real clients: the ``websockets`` library's for the conversation, raw sockets for
the HTTP side and for a member that stops reading. (Chromium and Node's ``ws``
are in tests/peers/test_real_peers.py.)
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import connserver
from connserver.apps.chat import ChatRoom
from connserver.apps.ws_chat import WebSocketChatHandler, page
from connserver.protocols.websocket import message_frame
from connserver.testing import wait_for
from tests.conftest import connect as tcp_connect, wait_closed
from tests.loopback.test_websocket import upgrade_request
from tests.unit.test_websocket_protocol import TEXT, client_frame

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked

SAFETY = 10.0   # a safety net around what should happen at once


@contextlib.contextmanager
def member(server: connserver.Server, nick: str, **options) -> Iterator[ClientConnection]:
    """A websockets client that has joined the room as ``nick``; closed on exit."""
    host, port = server.server_address[:2]
    with connect(f"ws://{host}:{port}/", open_timeout=SAFETY, close_timeout=SAFETY,
                 **options) as ws:
        assert ws.recv(SAFETY) == "* Welcome to connserver chat! Choose a nickname:"
        ws.send(nick)
        assert ws.recv(SAFETY).startswith(f"* You are {nick};")
        yield ws


def http_get(server: connserver.Server, path: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (lower-case names) and body of a GET; the server must close after."""
    with tcp_connect(server) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/html\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    return status, headers, body


def test_get_slash_serves_the_chat_page_then_closes(serve):
    """A plain GET / returns the shipped page: 200, text/html, its exact length, Connection: close."""
    server = serve(WebSocketChatHandler)
    status, headers, body = http_get(server, "/?from=bookmark")
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert int(headers[b"content-length"]) == len(body) and headers[b"connection"] == b"close"
    assert body == page() and b"new WebSocket(" in body and body.startswith(b"<!doctype html>")
    assert wait_closed(server, 1).close_reasons == {"closed": 1}


def test_other_paths_get_404(serve):
    """Any other path is a 404, and the connection still ends cleanly."""
    server = serve(WebSocketChatHandler)
    status, headers, body = http_get(server, "/favicon.ico")
    assert status == b"HTTP/1.1 404 Not Found" and int(headers[b"content-length"]) == len(body)
    assert wait_closed(server, 1).close_reasons == {"closed": 1}


def test_members_chat_see_joins_who_nick_and_leaves(serve):
    """Two members: join notice, relayed text, /who, /nick, and the leave notice on close."""
    server = serve(WebSocketChatHandler)
    with member(server, "alice") as alice:
        with member(server, "bob") as bob:
            assert alice.recv(SAFETY) == "* bob joined"
            alice.send("hello bob\x1b[2J")   # control characters are not relayed
            assert bob.recv(SAFETY) == "<alice> hello bob[2J"
            bob.send("/who")
            assert bob.recv(SAFETY) == "* Online: alice, bob"
            bob.send("/nick robert")
            assert bob.recv(SAFETY) == "* You are now robert."
            assert alice.recv(SAFETY) == "* bob is now robert"
            bob.send(b"\x00binary")
            assert bob.recv(SAFETY).startswith("* Binary messages are not relayed")
        assert alice.recv(SAFETY) == "* robert left"
    assert wait_closed(server, 2).close_reasons == {"eof": 2}


def test_quit_says_bye_and_closes_with_1000(serve):
    """/quit: "* Bye!", then the server's close frame (1000, "bye"); the others see the leave."""
    server = serve(WebSocketChatHandler)
    with member(server, "alice") as alice, member(server, "bob") as bob:
        assert alice.recv(SAFETY) == "* bob joined"
        bob.send("/quit")
        assert bob.recv(SAFETY) == "* Bye!"
        with pytest.raises(ConnectionClosedOK):
            bob.recv(SAFETY)
        assert (bob.close_code, bob.close_reason) == (1000, "bye")
        assert alice.recv(SAFETY) == "* bob left"
    assert wait_closed(server, 2).close_reasons == {"closed": 1, "eof": 1}


def test_another_sites_page_cannot_join(serve):
    """An upgrade whose Origin is not the server's own host is refused with 403."""
    server = serve(WebSocketChatHandler)
    host, port = server.server_address[:2]
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{host}:{port}/", open_timeout=SAFETY, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with member(server, "alice", origin=f"http://{host}:{port}"):
        pass
    assert wait_closed(server, 2).close_reasons == {"rejected": 1, "eof": 1}


def test_a_stalled_member_is_disconnected_and_delays_no_one(serve):
    """A member that stops reading fills only its own queue (slow_consumer); bob gets every message."""
    server = serve(WebSocketChatHandler, write_timeout=60.0)
    hub = server.hub("ws-chat", max_queue_bytes=64 * 1024)   # the room's hub, made first
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: a small window
    stalled.settimeout(SAFETY)
    stalled.connect(server.server_address)
    with stalled, member(server, "alice") as alice, member(server, "bob") as bob:
        stalled.sendall(upgrade_request() + client_frame(TEXT, b"stalled"))
        assert wait_for(lambda: hub.statistics().subscribers == 3)   # and then it reads nothing
        assert alice.recv(SAFETY) == "* bob joined" and alice.recv(SAFETY) == "* stalled joined"
        assert bob.recv(SAFETY) == "* stalled joined"
        # 6 MB to each member: more than the stalled socket's buffers (the kernel grows
        # a send buffer to 4 MB) and its 64 KiB queue hold.
        lines = [f"{i:04d} " + "m" * 4000 for i in range(1500)]
        for line in lines:   # bob reads as a healthy tab does, while the stalled one does not
            alice.send(line)
            got = bob.recv(SAFETY)
            while got == "* stalled left":   # its leave notice may come at any point
                got = bob.recv(SAFETY)
            assert got == f"<alice> {line}"
        assert wait_for(lambda: hub.statistics().slow_consumers == 1)
        stalled.close()   # its end lingers for the unread bytes until then
    assert wait_closed(server, 3).close_reasons == {"slow_consumer": 1, "eof": 2}


def test_the_room_publishes_one_frame_shared_by_every_member():
    """An announcement is encoded once, as a WebSocket text frame, and published once."""
    class Hub:
        published: list = []

        def publish(self, message, exclude=None):
            self.published.append((message, exclude))

    hub = Hub()
    room = ChatRoom(hub, message_frame)   # type: ignore[arg-type]
    room.announce("* héllo", exclude="me")
    assert hub.published == [(b"\x81\x08* h\xc3\xa9llo", "me")]


def test_a_muted_subscription_takes_no_broadcasts_but_its_own_writes(serve):
    """Subscription.mute(): publish() passes it by; its own writes still go, in order."""
    taken: list[int] = []

    class Muted(connserver.Handler):
        def handle(self):
            hub = self.server.hub("mute")
            with hub.subscribe(self.conn) as subscription:
                hub.publish(b"one\n")
                subscription.mute()
                taken.append(hub.publish(b"not for me\n"))
                self.conn.sendall(b"two\n")
                self.conn.recv()

    server = serve(Muted)
    with tcp_connect(server) as client:
        received = b""
        while received.count(b"\n") < 2:
            received += client.recv(100)
        client.shutdown(socket.SHUT_WR)   # then the handler's recv() sees the end
        while chunk := client.recv(100):
            received += chunk
    assert received == b"one\ntwo\n" and taken == [0]
    wait_closed(server, 1)
