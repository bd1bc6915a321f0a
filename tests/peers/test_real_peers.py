"""ws-echo and ws-chat against real peers from other ecosystems, run by Node.

- Node's ``ws`` package (echo_ws.js): fragmented text and binary messages, 1 MiB
  messages, ping/pong, the close handshake, and an oversized message (1009).
- Headless Chromium driven by playwright-core (chat_browser.js): two pages load
  ws-chat's own page from the server, chat, a screenshot is taken, and one page
  closing shows its leave notice on the other.

The JavaScript lives beside this file (package.json pins the versions;
``npm ci`` in tests/peers installs them). Without node, those packages or
Chromium, the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess

import pytest

import connserver
from connserver.apps.ws_chat import WebSocketChatHandler
from connserver.apps.ws_echo import WebSocketEchoHandler
from tests.conftest import unavailable, wait_closed

pytestmark = pytest.mark.both_modes   # message handlers on threads, and parked

PEERS = pathlib.Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT = 90.0   # a safety net: each script bounds its own steps at 10 s


def node_script(script: str, *args: str, packages: tuple[str, ...]) -> dict:
    """Run a script of tests/peers with node; its one line of JSON output."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed")
    for package in packages:
        if not (PEERS / "node_modules" / package / "package.json").exists():
            unavailable(f"npm package {package} is missing (run `npm ci` in tests/peers)")
    run = subprocess.run([node, str(PEERS / script), *args], cwd=PEERS, capture_output=True,
                         text=True, timeout=RUN_TIMEOUT, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert run.returncode == 0, f"{script} failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def url(server: connserver.Server, scheme: str) -> str:
    host, port = server.server_address[:2]
    return f"{scheme}://{host}:{port}/"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack("!II", data[16:24])


def test_node_ws_exchanges_fragmented_and_large_messages_with_ws_echo(serve):
    """Node's ws: fragmented and 1 MiB messages echo intact, ping/pong, close, and 1009."""
    limit = 2 * 1024 * 1024
    server = serve(WebSocketEchoHandler, max_frame_size=limit)
    results = node_script("echo_ws.js", url(server, "ws"), str(limit + 1), packages=("ws",))
    assert results["fragmentedText"] == {"text": "fragmented téxt", "binary": False}
    assert results["fragmentedBinary"] == {"same": True, "length": 300000, "binary": True}
    assert results["largeBinary"] == {"same": True, "length": 1024 * 1024, "binary": True}
    assert results["largeText"] == {"same": True, "length": 1024 * 1024, "binary": False}
    assert results["pong"] == "are you there"
    assert results["close"] == {"code": 4000, "reason": ""}   # our answer echoes its code
    assert results["oversize"] == {"code": 1009}
    stats = wait_closed(server, 2)
    assert stats.close_reasons == {"eof": 1, "frame_too_large": 1}


def test_two_chromium_pages_chat_through_ws_chat(serve, tmp_path):
    """Chromium loads ws-chat's page from the server, two pages chat, a closed tab is seen leaving."""
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    server = serve(WebSocketChatHandler)
    screenshot = tmp_path / "chat.png"
    results = node_script("chat_browser.js", url(server, "http"), str(screenshot),
                          packages=("playwright-core",))
    assert results["status"] == 200
    assert results["headers"]["content-type"] == "text/html; charset=utf-8"
    assert results["title"] == "alice · connserver chat"
    alice = results["alice"].splitlines()
    bob = results["bob"].splitlines()
    assert "* bob joined" in alice and "<alice> hello from alice" in alice
    assert "<bob> hi alice, bob here" in alice and alice[-1] == "* bob left"
    assert "<alice> hello from alice" in bob and "<bob> hi alice, bob here" in bob
    assert bob[-1] == "* Online: alice, bob"
    data = screenshot.read_bytes()
    assert png_size(data) == (800, 600)
    assert 5_000 < len(data) < 2_000_000, len(data)   # a rendered page, not a blank one
    stats = wait_closed(server, 4)   # the page twice, then two WebSockets
    assert stats.close_reasons.get("closed", 0) >= 2   # the pages, served and closed
