"""The backplane fan-out cell (issue 15): its relays, its books and its report (benchmarks/backplane_fanout.py)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import backplane_fanout  # noqa: E402
import render  # noqa: E402
import run  # noqa: E402
import servers  # noqa: E402


def fanout_run(case: str, delivered: int, p99_us: float, lost: int = 0, backplane: dict | None = None) -> dict:
    return {"ok": True, "results": {"delivered": delivered, "delivered_per_s": delivered / 1.5, "lost": lost,
                                    "latency": {"p50_us": p99_us / 4, "p99_us": p99_us}},
            "backplane": backplane, "others": {"0": 0.01, "1": 0.02},
            "whole_run": {"wall_s": 2.0, "cpu_s": {"relay": 0.5, "redis": 0.1}}}


def cell(case: str, rate: int, runs: list[dict]) -> dict:
    return {"kind": "fanout-redis", "server": "connserver-relay", "case": case, "rate": rate, "subscribers": 100,
            "size": 64, "messages": None if rate else 20_000, "runs": runs}


def test_relays_are_the_fanout_relay_with_a_backplane_and_an_admin_port() -> None:
    """Each relay runs servers.RELAY's handler, its own hub name, the backplane URL, and prints its admin port."""
    program = backplane_fanout.relay_program("relay-local", "redis://127.0.0.1:6400/0")
    assert program.startswith(servers.RELAY.split("class Relay")[0])
    assert "self.server.hub('relay-local', max_queue_bytes=256 * 1024)" in program
    assert "backplane='redis://127.0.0.1:6400/0'" in program and 'admin_address="127.0.0.1:0"' in program
    assert program.rstrip().endswith("print(server.admin_address[1], flush=True)\nserver.serve_forever()")
    assert "backplane=None" in backplane_fanout.relay_program("relay", None)
    compile(program, "relay", "exec")


def test_the_cell_is_one_of_the_suites_kinds() -> None:
    """--cells fanout-redis is accepted, and the cell runs right after the in-process fan-out."""
    assert run.KINDS[run.KINDS.index("fanout") + 1] == "fanout-redis"


def test_books_are_the_change_over_a_run() -> None:
    """A relay's backplane counters are recorded as the difference over the run, every key kept."""
    assert backplane_fanout.difference({"sent": 30, "lost": 2}, {"sent": 10}) == {"sent": 20, "lost": 2}


def test_report_shows_each_case_and_the_books_of_both_relays() -> None:
    """The section has a row per case and rate, latency in ms, and the two relays' books summed over runs."""
    cross = {"publishing": {"published": 1500, "sent": 1490, "outbound_dropped": 10},
             "receiving": {"received": 1490, "lost": 10, "gaps": 1}}
    results = {"cells": [cell("cross", 2000, [fanout_run("cross", 150_000, 4000.0, 0, cross)] * 3),
                         cell("none", 0, [fanout_run("none", 2_000_000, 900_000.0, 5)])]}
    text = "\n".join(render.backplane_section(results))
    assert "| A → Redis → B | 2,000/s | 100,000 (100,000–100,000) | 1.00 (1.00–1.00) | 4.00 (4.00–4.00) |" in text
    assert "| one relay, no backplane | max | 1,333,333 | 225.00 | 900.00 | 5 |" in text
    assert "4,500 published, 4,470 sent, 30 dropped | 4,470 received, 30 lost in 3 gaps |" in text
    assert "20,000 messages sent as fast as the relay takes them" in text


def test_no_cells_no_section() -> None:
    """A run without the cell (quick mode, or other --cells) has no backplane section."""
    assert render.backplane_section({"cells": []}) == []


def test_a_failed_run_says_why_in_the_progress_line() -> None:
    """The progress line of a run without a result gives loadgen's error rather than zeros."""
    assert backplane_fanout.summary({"ok": False, "error": "no result within 70 s"}) == "failed: no result within 70 s"
