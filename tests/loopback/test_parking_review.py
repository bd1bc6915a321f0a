"""Parked mode (issue 13), a review: ends that must come in every parked state, however
the events interleave (a hangup already reported, a watchdog look that overlaps a park)."""

from __future__ import annotations

import functools
import socket

from connserver import CloseReason
from connserver.apps.echo import FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_parking import frame, read_frame


def half_closed_in_a_rate_wait(server) -> socket.socket:
    """A client whose second frame waits for a token (10 s away), sent with its end of
    stream: the rate wait's hangup is reported as soon as the wait begins."""
    client = connect(server)
    client.sendall(frame(b"first") + frame(b"held"))
    client.shutdown(socket.SHUT_WR)
    assert read_frame(client) == b"first"
    assert wait_for(lambda: "rate_wait" in {i.operation for i in server.connections()})
    return client


def test_a_cancel_ends_a_rate_wait_whose_peer_half_closed_at_once(serve):
    """A rate wait whose peer sent its end of stream (the hangup reported, nothing armed
    any more) still ends at once when cancelled, not when the token comes."""
    server = serve(FramedEchoHandler, park=True, rate=0.1, burst=1, on_rate_limit="wait")
    with half_closed_in_a_rate_wait(server) as client:
        (info,) = server.connections()
        assert server.cancel(info.id, CloseReason.LIMIT)
        stats = wait_closed(server, 1, timeout=3.0)
    assert stats.close_reasons == {"limit": 1}


def test_max_lifetime_ends_a_rate_wait_whose_peer_half_closed(serve):
    """max_lifetime during a rate wait whose hangup was reported already: the connection
    ends (lifetime), rather than staying parked with nothing to wake it."""
    server = serve(FramedEchoHandler, park=True, rate=0.1, burst=1, on_rate_limit="wait",
                   max_lifetime=1.0, lifetime_jitter=0.0)
    with half_closed_in_a_rate_wait(server):
        stats = wait_closed(server, 1, timeout=5.0)
    assert stats.close_reasons == {"lifetime": 1}


class EndsWithAReply(FramedEchoHandler):
    """Answers with 256 KiB and ends: more than a peer that does not read acknowledges."""

    def handle_frame(self, payload):
        self.end()
        return b"x" * (256 << 10)


def test_a_watchdog_look_in_flight_does_not_cancel_a_lingering_close(serve):
    """A parked end lingering (the peer has not acknowledged everything) still ends at
    linger_timeout when the watchdog's look at the connection's deadlines was under way
    as the linger began, and set its next look when it returned: the watchdog keeps one
    entry per target, and that look must not take the place of the linger's.

    The race is replayed: what the watchdog does with a look's result, done after the
    linger began (the window is a few microseconds; nothing outside can widen it)."""
    server = serve(EndsWithAReply, park=True, linger_timeout=0.5, idle_timeout=60.0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    try:
        client.connect(server.server_address)
        client.sendall(frame(b"go"))
        client.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: {i.operation for i in server.connections()} == {"linger"})
        lot = server._lot
        (parked,) = list(lot._parked.values())
        look = functools.partial(lot._look, parked)
        server._watchdog.watch(parked, look(), look)   # as Watchdog._run_once does
        stats = wait_closed(server, 1, timeout=3.0)
    finally:
        client.close()
    assert stats.close_reasons == {"closed": 1}
    assert stats.bytes_unacked > 0
