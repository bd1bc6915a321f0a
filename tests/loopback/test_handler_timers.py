"""Handler timers (MessageHandler.next_timer / on_timer): keepalives without a thread of their own.

In both modes: the timer runs between messages while the connection waits for
input, it never stretches the idle or message deadline, and it stops at the end.
"""

from __future__ import annotations


import pytest

from connserver.apps.echo import FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_parking import frame, read_frame

pytestmark = pytest.mark.both_modes


class Ticking(FramedEchoHandler):
    """Sends ``tick N`` every ``interval`` seconds while the connection is open."""

    interval = 0.05
    ticks: list

    def setup(self):
        self.ticks_sent = 0
        self.next_at = self.conn.clock() + self.interval

    def next_timer(self):
        return self.next_at

    def on_timer(self):
        self.ticks_sent += 1
        self.next_at = self.conn.clock() + self.interval
        self.conn.send_frame(b"tick %d" % self.ticks_sent)


def test_a_timer_sends_between_messages(serve):
    """An idle connection gets its ticks, and messages are still answered in between."""
    server = serve(Ticking, idle_timeout=5.0)
    with connect(server) as client:
        assert read_frame(client) == b"tick 1"
        assert read_frame(client) == b"tick 2"
        client.sendall(frame(b"hello"))
        replies = [read_frame(client) for _ in range(3)]
        assert b"hello" in replies
        ticks = [int(r.split()[1]) for r in replies if r != b"hello"]
        assert ticks == sorted(ticks) and ticks[0] >= 3
    assert wait_closed(server, 1).close_reasons in ({"eof": 1}, {"reset": 1})


def test_the_idle_deadline_holds_when_the_timer_is_later(serve):
    """A timer 30 s away does not stretch a 0.3 s idle timeout."""
    class Slow(Ticking):
        interval = 30.0

    server = serve(Slow, idle_timeout=0.3)
    with connect(server) as client:
        assert client.recv(10) == b""
    stats = wait_closed(server, 1, timeout=3.0)
    assert stats.close_reasons == {"idle": 1} and stats.deadline_hits == {"idle": 1}


def test_ticks_do_not_reset_the_idle_timeout(serve):
    """What the server sends is not the peer's activity: idle 0.4 s with ticks every
    0.05 s still ends the connection at about 0.4 s."""
    server = serve(Ticking, idle_timeout=0.4)
    received = []
    with connect(server) as client:
        while chunk := client.recv(4096):
            received.append(chunk)
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"idle": 1}
    assert b"tick 2" in b"".join(received)


def test_a_message_in_progress_keeps_its_read_deadline(serve):
    """Half a frame, then silence: read_deadline at read_timeout, ticks or not."""
    server = serve(Ticking, idle_timeout=5.0, read_timeout=0.3)
    with connect(server) as client:
        client.sendall(b"\0\0\0\x10half")
        while client.recv(4096):
            pass
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"read_deadline": 1}


def test_a_cancel_ends_a_connection_waiting_for_its_timer(serve):
    """A connection waiting for its next tick is cancelled at once."""
    class Rare(Ticking):
        interval = 30.0

    server = serve(Rare, idle_timeout=60.0)
    with connect(server) as client:
        client.sendall(frame(b"x"))
        assert read_frame(client) == b"x"
        assert wait_for(lambda: server.connections())
        (info,) = server.connections()
        assert server.cancel(info.id)
        while client.recv(4096):
            pass
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"cancelled": 1}
