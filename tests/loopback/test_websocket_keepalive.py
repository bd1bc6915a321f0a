"""WebSocket keepalive: pings on the engine's timers, a pong's round trip shown, 1011 when
the peer stops answering — in both modes, with no thread or timer object per connection."""

from __future__ import annotations

import struct

import pytest
from websockets.sync.client import connect

import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler
from connserver.testing import wait_for
from tests.conftest import wait_closed
from tests.loopback.test_websocket import SAFETY, Raw, url
from tests.unit.test_websocket_protocol import CLOSE, PING, PONG, client_frame

pytestmark = pytest.mark.both_modes


class Pinging(WebSocketEchoHandler):
    ping_interval = 0.05
    ping_timeout = 0.3


def test_an_answering_client_is_pinged_and_its_latency_shown(serve):
    """A client that answers pings (the websockets library does) stays connected through
    many pings, longer than idle_timeout, and /connections shows the round trip."""
    server = serve(Pinging, idle_timeout=0.5)
    with connect(url(server), open_timeout=SAFETY, close_timeout=SAFETY) as ws:
        assert wait_for(lambda: [i for i in server.connections() if i.latency is not None])
        (info,) = server.connections()
        assert 0 <= info.latency < 0.3
        ws.send("still here")   # after 1 s of pings only: not idled out
        assert ws.recv(timeout=SAFETY) == "still here"
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_a_client_that_stops_answering_gets_1011(serve):
    """Pings unanswered for ping_timeout: close 1011, reason keepalive_timeout."""
    closed: list = []

    class Recording(Pinging):
        def on_close(self, code, reason):
            closed.append(code)

    server = serve(Recording, idle_timeout=30.0)
    with Raw(server) as raw:
        opcode, payload = raw.frame()
        assert opcode == PING
        assert raw.close_code() == 1011   # never answered: the next frame is the close
    stats = wait_closed(server, 1, timeout=3.0)
    assert stats.close_reasons == {"keepalive_timeout": 1}
    assert closed == [1011]


def test_pings_are_answered_by_a_raw_client_and_the_next_one_follows(serve):
    """A pong with the ping's payload clears it; the next ping comes ping_interval later."""
    server = serve(Pinging, idle_timeout=30.0)
    with Raw(server) as raw:
        for _ in range(3):
            opcode, payload = raw.frame()
            assert opcode == PING and payload
            raw.sendall(client_frame(PONG, payload))
        raw.sendall(client_frame(CLOSE, struct.pack("!H", 1000)))
        assert raw.close_code() == 1000
    assert wait_closed(server, 1).close_reasons == {"eof": 1}


def test_no_pings_when_disabled(serve):
    """ping_interval None: no ping in 0.3 s; the connection idles out as before."""
    class Quiet(WebSocketEchoHandler):
        ping_interval = None

    server = serve(Quiet, idle_timeout=0.3)
    with Raw(server) as raw:
        assert raw.at_end()
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"idle": 1}


def test_server_settings_override_the_handler_class(serve):
    """websocket_ping_interval/_timeout (--websocket-ping-interval...) override the class's
    20 s: the built-in echo pings at once and ends an unanswered ping with 1011; 0 turns
    pings off for a class that would ping."""
    server = serve(WebSocketEchoHandler, idle_timeout=30.0, websocket_ping_interval=0.05,
                   websocket_ping_timeout=0.2)
    with Raw(server) as raw:
        assert raw.frame()[0] == PING
        assert raw.close_code() == 1011
    assert wait_closed(server, 1, timeout=3.0).close_reasons == {"keepalive_timeout": 1}
    quiet = serve(Pinging, idle_timeout=0.3, websocket_ping_interval=0)
    with Raw(quiet) as raw:
        assert raw.at_end()   # no ping before the idle timeout
    assert wait_closed(quiet, 1, timeout=3.0).close_reasons == {"idle": 1}
