"""Lab 8's soak: it fits the lab's load time and gets a memory verdict; a judged load figure starts at 0."""

from __future__ import annotations

import threading

import pytest

from connserver.lab.driver import Session
from connserver.lab.registry import find
from connserver.lab.soak_verdict import soak_plan, soak_time
from connserver.lab.verdict import judge
from connserver.soak.runner import shortest_judged_duration


@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
def test_the_soak_fits_the_load_and_is_long_enough_to_judge(short):
    """The soak ends within the lab's load time, with enough steady cycles for a memory verdict."""
    lab = find("soak-verdict")
    plan = lab.plan(short)
    session = Session("broken", ("127.0.0.1", 7070), plan, threading.Event(), {"admin": 7071})
    soak = soak_plan(session)
    assert (soak.target, soak.admin) == ("127.0.0.1:7070", "127.0.0.1:7071")
    assert soak_time(plan) + 0.25 <= plan.load_timeout
    assert shortest_judged_duration(soak) <= soak.duration
    assert soak.max_rss_slope == plan.threshold   # the lab judges with the soak's own limit


def test_a_side_without_an_admin_endpoint_cannot_be_soaked():
    """No admin port, no soak: said at once rather than timing out."""
    lab = find("soak-verdict")
    session = Session("fixed", ("127.0.0.1", 7070), lab.short, threading.Event())
    with pytest.raises(ConnectionError, match="no admin endpoint"):
        soak_plan(session)


def test_a_judged_load_figure_rises_from_zero():
    """The baseline, taken before the load, has no load figures: a judged one counts from 0."""
    lab = find("soak-verdict")
    baseline = {"t": 0.0, "phase": "baseline", "sides": {"broken": {}, "fixed": {}}}
    final = {"t": 3.0, "phase": "settle",
             "sides": {"broken": {"rss_slope": 400_000.0}, "fixed": {"rss_slope": 9_000.0}}}
    verdict = judge(lab, lab.short, ("broken", "fixed"), baseline, final, {})
    assert verdict["passed"], verdict
    assert verdict["sides"]["broken"]["rise"] == 400_000.0
    assert verdict["sides"]["fixed"]["rise"] == 9_000.0
