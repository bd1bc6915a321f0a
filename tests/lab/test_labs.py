"""Each lab, run short: the broken side's figure crosses its threshold, the fixed side's does not.

One run per lab (both sides, about 3-5 s), with every figure of the document
checked at once; one run each with ``--broken`` and ``--fixed``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest

from connserver.daemon import cli
from connserver.lab.registry import find

# A short run takes 3-5 s here; a much slower one means a side or the load hung.
SHORT_RUN_LIMIT = 15.0


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    status = cli.main(["lab", *argv, "--short", "--json"])
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert elapsed < SHORT_RUN_LIMIT, f"a short run took {elapsed:.1f} s"
    assert out.count("\n") == 1, "--json prints one JSON object and nothing else"
    return status, json.loads(out)


def _vanished_peer(document: dict[str, Any]) -> None:
    peers = find("vanished-peer").short["peers"]
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["vanished"] == fixed["vanished"] == peers   # the same load at both
    assert broken["connections"] == peers and broken["deadline_closes"] == 0
    assert fixed["connections"] == 0 and fixed["deadline_closes"] == peers


def _spawned_threads(document: dict[str, Any]) -> None:
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    rise = document["verdict"]["sides"]["broken"]["rise"]
    assert broken["waiting"] == rise > 0                        # each extra thread: a lost call
    assert fixed["waiting"] == 0 and fixed["errors"] > 0        # lost calls timed out instead
    assert broken["errors"] == 0 and broken["replies"] > 0
    assert fixed["connections"] == broken["connections"] == 0   # every client has gone


def _pinned_buffer(document: dict[str, Any]) -> None:
    keep = find("pinned-buffer").short["keep"]
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["kept"] == fixed["kept"] == keep
    assert broken["pinned"] >= keep and fixed["pinned"] == 0
    assert broken["retained"] >= keep * 65536                   # a whole buffer per kept view
    assert broken["kept_asizeof"] < fixed["kept_asizeof"]        # and asizeof does not see it


def _slowloris(document: dict[str, Any]) -> None:
    plan = find("slowloris").short
    tricklers, timeout_ms = plan["tricklers"], plan["timeout"] * 1000
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["held_peak"] == tricklers and broken["deadline_closes"] == 0
    assert "cut" not in broken                                   # no trickler was ever cut
    assert fixed["deadline_closes"] == fixed["cut"] == tricklers  # each cut at its deadline
    assert broken["longest_ms"] > 4 * timeout_ms                 # trickled the whole load
    assert timeout_ms <= fixed["longest_ms"] < broken["longest_ms"] / 2
    assert broken["trickled"] > fixed["trickled"] >= tricklers
    assert broken["honest_ms"] > 0 and fixed["honest_ms"] > 0    # the honest client was served
    assert broken["honest_failed"] == fixed["honest_failed"] == 0


def _cancel_by_close(document: dict[str, Any]) -> None:
    plan = find("cancel-by-close").short
    peers, cancel_ms = plan["peers"], plan["cancel_timeout"] * 1000
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["peers"] == fixed["peers"] == peers            # the same load at both
    assert broken["blocked"] == broken["connections"] == peers   # close() woke none of them
    assert broken["told"] == 0 and broken["lifetime_closes"] == 0  # and closed no connection
    assert broken["fd_reuses"] >= peers // 2                     # their numbers went to others
    assert broken["wakeup_ms"] > 3 * cancel_ms                   # still waiting
    assert fixed["blocked"] == fixed["connections"] == fixed["fd_reuses"] == 0
    assert fixed["lifetime_closes"] == fixed["told"] == peers    # each ended, the peer told
    assert fixed["wakeup_ms"] < cancel_ms


def _rate_limiter(document: dict[str, Any]) -> None:
    rate = find("rate-limiter").short["rate"]
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["conns_made"] >= 8 and fixed["conns_made"] >= 8
    assert broken["tickers"] >= broken["conns_made"]              # a ticker per connection, none stopped
    assert fixed["tickers"] == 0 and fixed["connections"] == 0
    assert broken["rate_configured"] == fixed["rate_configured"] == rate
    assert broken["rate_measured"] <= 2                           # one token a second, whatever the rate
    assert 0.7 * rate <= fixed["rate_measured"] <= 1.05 * rate    # the configured rate


def _stalled_reader(document: dict[str, Any]) -> None:
    readers = find("stalled-reader").short["honest"]
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    assert broken["published"] > 100 and fixed["published"] > 100
    assert fixed["delivered"] >= 0.95 * fixed["published"] * readers   # nobody waited
    assert broken["delivered"] < 0.5 * broken["published"] * readers   # everyone waited
    assert broken["honest_p99_ms"] > 1000 and broken["honest_p99_ms"] > 10 * fixed["honest_p99_ms"]
    assert fixed["slow_consumers"] == 1 and fixed["subscribers"] == 0  # the stalled one was cut
    assert broken["slow_consumers"] == 0 and broken["subscribers"] == 1  # and here is still held
    assert broken["capped"] == 0                                       # the lab's bound not reached


def _soak_verdict(document: dict[str, Any]) -> None:
    limit = find("soak-verdict").short["max_rss_slope"]
    broken, fixed = document["final"]["broken"], document["final"]["fixed"]
    baseline = document["baseline"]
    assert broken["round_trips"] > 100 and fixed["round_trips"] > 100   # verified echoes
    assert broken["checks_failed"] == 1 and fixed["checks_failed"] == 0  # FAIL, and PASS
    assert broken["checks_passed"] + 1 == fixed["checks_passed"]
    assert broken["rss_slope"] > 2 * limit > 4 * fixed["rss_slope"]
    assert broken["retained"] >= broken["round_trips"] * 64 * 1024 and fixed["retained"] == 0
    for side in ("broken", "fixed"):   # threads and fds came back: only memory tells
        assert document["final"][side]["fds"] <= baseline[side]["fds"]
        assert document["final"][side]["connections"] == 0


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "vanished-peer": _vanished_peer,
    "spawned-threads": _spawned_threads,
    "pinned-buffer": _pinned_buffer,
    "slowloris": _slowloris,
    "cancel-by-close": _cancel_by_close,
    "rate-limiter": _rate_limiter,
    "stalled-reader": _stalled_reader,
    "soak-verdict": _soak_verdict,
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_a_short_run_shows_the_leak_and_the_fix(capsys, name):
    """Broken crosses the threshold, fixed stays under it, both processes stop cleanly; exit 0."""
    status, document = run(capsys, name)
    verdict = document["verdict"]
    assert status == 0 and verdict["passed"], verdict
    broken, fixed = verdict["sides"]["broken"], verdict["sides"]["fixed"]
    assert broken["rise"] >= verdict["threshold"] > fixed["rise"], verdict
    assert document["stopped"] == {"broken": "clean", "fixed": "clean"}
    assert verdict["read_next"] == [f"docs/lab/{name}.md", document["lab"]["explanation"]]
    phases = [sample["phase"] for sample in document["samples"]]
    assert phases[0] == "baseline" and phases[-1] == "settle" and "load" in phases
    assert not any("errors" in sample for sample in document["samples"])
    CHECKS[name](document)


@pytest.mark.parametrize("flag, side", [("--broken", "broken"), ("--fixed", "fixed")])
def test_one_side_runs_alone(capsys, flag, side):
    """--broken / --fixed start and judge only that side."""
    status, document = run(capsys, "vanished-peer", flag)
    assert status == 0, document["verdict"]
    assert document["sides"] == [side] and list(document["final"]) == [side]
    assert list(document["verdict"]["sides"]) == [side]
