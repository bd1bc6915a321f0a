"""The benchmark report's WebSocket targets (issue 14), judged from stored results (benchmarks/render.py)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import render  # noqa: E402
import servers  # noqa: E402


def hold(server: str, connections: int, kib_per_connection: float, websocket: bool = True) -> dict:
    start = 20_000
    run = {"ok": True, "server": {"rss_kib_start": start, "rss_kib_end": start + kib_per_connection * connections},
           "results": {"still_open": connections}}
    return {"kind": "ws-hold", "server": server, "connections": connections, "websocket": websocket, "runs": [run]}


def echo(server: str, rates: list[float]) -> dict:
    runs = [{"ok": True, "results": {"round_trips_per_s": rate, "round_trips": rate * 1.5}} for rate in rates]
    return {"kind": "ws-echo", "server": server, "connections": 100, "size": 64, "runs": runs}


def targets(cells: list[dict]) -> dict[str, tuple[str, str]]:
    return {target: (measured, word) for target, measured, word in render.issue14_targets({"cells": cells})}


STATE = {"kind": "ws-state", "server": "wsproto",
         "runs": [{"ok": True, "wsproto_frames_bytes": 1024, "connserver_protocol_bytes": 2048}]}


def test_idle_target_adds_wsproto_state_to_the_parked_framed_connection() -> None:
    """Idle parked WebSocket is judged against parked framed + wsproto's frame connection, per connection."""
    met = targets([hold("connserver-ws-parked", 1000, 3.9), hold("connserver-parked", 1000, 3.0, False), STATE])
    missed = targets([hold("connserver-ws-parked", 1000, 4.1), hold("connserver-parked", 1000, 3.0, False), STATE])
    key = next(k for k in met if "parked framed connection" in k)
    assert met[key][1] == "met" and "3.00 + 1.00 = 4.00 KiB" in met[key][0]
    assert missed[key][1] == "missed"


def test_ten_times_less_than_the_sync_server_uses_each_servers_own_count() -> None:
    """The sync server held fewer connections (descriptor limit): each RSS is divided by its own N."""
    verdicts = targets([hold("websockets-sync", 4500, 50.0), hold("connserver-ws-parked", 10_000, 5.0),
                        hold("connserver-ws", 10_000, 25.0)])
    words = {key.split("(")[2].split(")")[0]: word for key, (_, word) in verdicts.items() if "10×" in key}
    assert words == {"connserver-ws": "missed", "connserver-ws-parked": "met"}


def test_echo_throughput_needs_every_allowed_ratio_at_or_above_one() -> None:
    """Echo N=100: met only if our slowest run beats their fastest; overlapping ranges are inconclusive."""
    verdicts = targets([echo("connserver-ws", [30.0, 31.0, 32.0]), echo("connserver-ws-parked", [20.0, 21.0, 22.0]),
                        echo("websockets-sync", [25.0, 29.0, 31.0]), echo("websockets-asyncio", [10.0, 11.0, 12.0])])
    word = {key: w for key, (_, w) in verdicts.items()}
    assert word["(issue 14) WebSocket echo N=100 (connserver-ws): round trips/s ≥ 1.0× websockets-sync's"] == "inconclusive"
    assert word["(issue 14) WebSocket echo N=100 (connserver-ws): round trips/s ≥ 1.0× websockets-asyncio's"] == "met"
    assert word["(issue 14) WebSocket echo N=100 (connserver-ws-parked): round trips/s ≥ 1.0× websockets-sync's"] == "missed"


def fanout(server: str, stalled: int, p99s: list[float]) -> dict:
    runs = [{"ok": True, "results": {"latency": {"p99_us": p99}, "stalled": {"disconnected": 0}}} for p99 in p99s]
    return {"kind": "ws-fanout", "server": server, "stalled": stalled, "subscribers": 100, "rate": 2000,
            "runs": runs}


def test_fanout_target_is_judged_per_relay_and_per_stalled_count() -> None:
    """WebSocket fan-out: p99 with K stalled ÷ without, judged on every ratio the ranges allow, per server."""
    verdicts = targets([fanout("connserver-ws-relay", 0, [1000.0, 1100.0, 1200.0]),
                        fanout("connserver-ws-relay", 1, [1000.0, 1300.0, 1400.0]),
                        fanout("connserver-ws-relay", 10, [2000.0, 2100.0, 2200.0]),
                        fanout("connserver-ws-relay-parked", 0, [1000.0, 1100.0, 1200.0]),
                        fanout("connserver-ws-relay-parked", 1, [900.0, 1100.0, 2000.0])])
    word = {key: w for key, (_, w) in verdicts.items() if "fan-out" in key}
    relay = "(issue 14) WebSocket fan-out (connserver-ws-relay): "
    parked = "(issue 14) WebSocket fan-out (connserver-ws-relay-parked): "
    assert word == {
        relay + "a stalled subscriber does not change the others' delivery p99 (with ÷ without ≤ 1.5)": "met",
        relay + "10 stalled subscribers do not change the others' delivery p99 (with ÷ without ≤ 1.5)": "missed",
        parked + "a stalled subscriber does not change the others' delivery p99 (with ÷ without ≤ 1.5)":
            "inconclusive"}


def test_fanout_target_needs_the_run_without_stalled_subscribers() -> None:
    """No baseline (stalled 0) for a server: no fan-out verdict for it, and the section still renders."""
    results = {"cells": [fanout("connserver-ws-relay", 1, [1000.0, 1100.0, 1200.0])]}
    assert not [t for t, _, _ in render.issue14_targets(results) if "fan-out" in t]
    assert "| connserver-ws-relay | 1 |" in "\n".join(render.ws_fanout_section(results))


def test_every_websocket_server_has_the_same_limits() -> None:
    """1 MiB messages, no compression and no keepalive pings on every WebSocket server benchmarked."""
    for server in servers.WS + servers.WS_RELAY:
        program = server.program or ""
        assert str(servers.WS_MAX_MESSAGE) in program and "ping_interval" in program, server.name
        assert "compression = None" in program or "compression=None" in program, server.name
        assert "ping_interval = None" in program or "ping_interval=None" in program, server.name


def test_the_memory_section_shows_what_compression_adds() -> None:
    """ws_state.py's deflate figure (both zlib contexts) is printed beside the idle figures."""
    state = dict(STATE, runs=[dict(STATE["runs"][0], connserver_deflate_bytes=52 * 1024)])
    text = "\n".join(render.ws_memory_section({"cells": [hold("connserver-ws-parked", 1000, 3.6), state]}))
    assert "with permessage-deflate negotiated" in text and "52.00 KiB" in text
    plain = "\n".join(render.ws_memory_section({"cells": [hold("connserver-ws-parked", 1000, 3.6), STATE]}))
    assert "deflate" not in plain
