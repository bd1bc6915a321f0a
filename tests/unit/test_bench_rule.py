"""The benchmark report's rule for ratios (benchmarks/render.py) and the suite's alternation."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import render  # noqa: E402
import run  # noqa: E402


def test_disjoint_narrow_ranges_give_the_ratio_of_medians() -> None:
    """Two servers whose ranges are apart and narrow: the ratio of medians is printed."""
    base, other = render.spread([10.0, 10.2, 9.9]), render.spread([13.0, 12.8, 13.1])
    claim = render.claim(base, other)
    assert claim.ratio == pytest.approx(13.0 / 10.0)
    assert claim.text() == "1.30×"


def test_overlapping_ranges_are_inconclusive() -> None:
    """Ranges that overlap support no ratio, however far apart the medians are."""
    claim = render.claim(render.spread([10.0, 11.0, 20.0]), render.spread([19.0, 30.0, 31.0]))
    assert claim.ratio is None
    assert claim.text() == "inconclusive (ranges overlap)"


def test_a_range_wider_than_the_ratio_is_inconclusive() -> None:
    """The issue's bimodal peer: ranges apart, but its own spread exceeds the ratio claimed."""
    base = render.spread([10.0, 10.1, 10.2])
    bimodal = render.spread([10.3, 10.4, 35.0])   # median 10.4: a ratio of 1.03
    claim = render.claim(base, bimodal, "connserver", "asyncio")
    assert claim.ratio is None
    assert "asyncio's own range" in claim.reason


def test_too_few_runs_support_no_ratio() -> None:
    """One or two runs say too little about the spread, so nothing is claimed from them."""
    assert render.claim(render.spread([10.0]), render.spread([20.0])).reason == "fewer than 3 runs"
    two = render.against(render.spread([10.0, 10.1]), render.spread([20.0, 20.1]), 1.3, at_least=True)
    assert two.word == "inconclusive"


def test_threshold_met_missed_inconclusive() -> None:
    """A target is met when every ratio the ranges allow meets it, missed when none does."""
    base = render.spread([10.0, 10.2, 10.5])
    assert render.against(base, render.spread([14.0, 14.2, 14.5]), 1.3, at_least=True).word == "met"
    assert render.against(base, render.spread([11.0, 11.2, 11.5]), 1.3, at_least=True).word == "missed"
    assert render.against(base, render.spread([12.0, 13.0, 15.0]), 1.3, at_least=True).word == "inconclusive"
    assert render.against(base, render.spread([9.0, 9.2, 9.5]), 1.0, at_least=False).word == "met"


def test_every_run_needs_agreement() -> None:
    """A per-run condition is met or missed only when all runs agree."""
    assert render.every_run([True, True]) == "met"
    assert render.every_run([False, False]) == "missed"
    assert render.every_run([True, False]) == "inconclusive"
    assert render.every_run([]) == "inconclusive"


def test_load_alternates_forward_then_back() -> None:
    """The servers of a cell take turns A B C, then C B A, so drift falls on all alike."""
    order = [name for _, name in run.alternate(["a", "b", "c"], 3)]
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]


def test_cpu_per_round_trip_uses_the_counted_window() -> None:
    """CPU per round trip is the server's CPU time over the window divided by the round trips in it."""
    result = {"server": {"cpu_s": 0.9}, "results": {"round_trips": 100_000}}
    assert render.cpu_per_rt(result) == pytest.approx(9.0)
    assert render.cpu_per_rt({"server": {"cpu_s": None}, "results": {"round_trips": 5}}) is None
