"""The benchmark client against the server programs it measures: loadgen's WebSocket fan-out.

``benchmarks/loadgen.c`` is built with ``cc`` and run against connserver's WebSocket relay,
the very program the suite's ``ws-fanout`` cell starts (``benchmarks/servers.py``), in its
own process, as the suite runs it: every message published must reach every subscriber,
every byte checked, the stalled subscriber upgraded beside them.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import selectors
import shutil
import subprocess
import sys
from typing import Iterator

import pytest

from tests.conftest import unavailable

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import servers  # noqa: E402

SAFETY = 10.0   # a safety net around what should happen at once


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """loadgen, built from the working tree's source as run.py builds it."""
    if shutil.which("cc") is None:
        unavailable("cc (gcc) is needed to build benchmarks/loadgen.c")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(binary),
                    str(BENCHMARKS / "loadgen.c"), "-lm"], check=True, timeout=120)
    return binary


@contextlib.contextmanager
def running(server: servers.Server) -> Iterator[int]:
    """A server program of the suite in its own process, as run.py starts it; yields its port."""
    if not server.available():
        unavailable(f"{server.requires} is needed for {server.name}")
    proc = subprocess.Popen([sys.executable, "-c", server.program or ""], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(SAFETY), f"{server.name} printed no port"
        line = proc.stdout.readline().strip()
        assert line.isdigit(), f"{server.name} did not start: {line!r}"
        yield int(line)
    finally:
        proc.kill()
        proc.communicate(timeout=SAFETY)


@pytest.fixture(params=[server.name for server in servers.WS_RELAY])
def relay(request: pytest.FixtureRequest) -> Iterator[int]:
    """The ws-fanout cell's WebSocket relay, thread mode and parked; yields its port."""
    with running(servers.BY_NAME[request.param]) as port:
        yield port


def fanout(loadgen: pathlib.Path, port: int, *options: str) -> dict:
    """One short ``fanout --websocket`` run (5 subscribers, 1 stalled, 500 messages/s); its results."""
    done = subprocess.run([str(loadgen), "--mode", "fanout", "--websocket", "--port", str(port),
                           "--subscribers", "5", "--stalled", "1", "--size", "64", "--rate", "500",
                           "--duration", "0.3", "--warmup", "0.2", "--drain", "2", *options],
                          capture_output=True, text=True, timeout=30)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], done.stderr
    return result["results"]


def test_websocket_fanout_delivers_every_message_to_every_subscriber(loadgen: pathlib.Path, relay: int) -> None:
    """fanout --websocket: all upgrade, every published frame reaches each subscriber intact, in order."""
    got = fanout(loadgen, relay)
    assert got["published"] > 100
    assert got["delivered"] == got["expected"] == got["published"] * 5
    assert got["subscribers"]["upgraded"] == 5 and got["publisher"]["upgraded"]
    assert got["stalled"]["upgraded"] == 1
    assert (got["corrupt"], got["out_of_order"], got["gaps"], got["other_lines"]) == (0, 0, 0, 0)
    assert got["latency"]["count"] == got["delivered"]


def test_websocket_fanout_through_the_chat_room(loadgen: pathlib.Path) -> None:
    """fanout --websocket --hello against ws-chat: nicknames as text frames, "<pub> …" messages counted,
    the greetings and notices the room sends (the publisher's too) set aside."""
    chat = servers.Server("ws-chat", servers.connserver_program("WebSocketChatHandler",
                                                                module="connserver.apps.ws_chat"),
                          requires="wsproto")
    with running(chat) as port:
        got = fanout(loadgen, port, "--hello", "sub%d", "--publisher-hello", "pub")
    assert got["published"] > 100 and not got["publisher"]["closed_by_server"]
    assert got["delivered"] == got["expected"] == got["published"] * 5
    assert got["other_lines"] > 0 and got["corrupt"] == 0
