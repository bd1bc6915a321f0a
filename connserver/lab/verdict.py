"""The verdict: did the broken side cross its threshold, and did the fixed side stay under?

One figure per lab is judged (``Lab.check``), as its rise from the baseline
(the last sample before the load) to the last sample (the end of the settle
period, when whatever the load started should be over). The same threshold
applies to both sides, so the two numbers are directly comparable: the lab
shows what it should when the broken side reaches it and the fixed side does
not. A side that could not be measured, or a load that failed, is not what it
should show.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .spec import Lab, Plan

__all__ = ["judge"]


def _side(lab: Lab, plan: Plan, side: str, baseline: Mapping[str, float],
          final: Mapping[str, float]) -> dict[str, Any]:
    key = lab.check.figure
    should_cross = side == "broken"
    # A load figure is 0 before the load: it had neither counted nor measured anything.
    base = baseline.get(key, 0 if lab.checked_figure.source == "driver" else None)
    last = final.get(key)
    if base is None or last is None:
        return {"baseline": base, "final": last, "rise": None, "crossed": None,
                "should_cross": should_cross, "as_expected": False,
                "meaning": "the side did not report it"}
    rise = last - base
    crossed = rise >= plan.threshold
    meaning = (lab.check.leaked if crossed else lab.check.held) if crossed == should_cross \
        else ("it did not leak this time" if should_cross else "it leaked")
    return {"baseline": base, "final": last, "rise": rise, "crossed": crossed,
            "should_cross": should_cross, "as_expected": crossed == should_cross,
            "meaning": meaning}


def _summary(results: Mapping[str, Mapping[str, Any]], failures: Mapping[str, str]) -> str:
    if failures:
        return "the load could not run as planned, so this run shows nothing"
    broken, fixed = results.get("broken"), results.get("fixed")
    parts = []
    if broken is not None:
        parts.append("the broken side leaked" if broken["as_expected"]
                     else "the broken side did NOT show its leak")
    if fixed is not None:
        parts.append("the fixed side held" if fixed["as_expected"]
                     else "the fixed side did NOT hold")
    return " and ".join(parts)


def judge(lab: Lab, plan: Plan, sides: Sequence[str], baseline: Mapping[str, Any],
          final: Mapping[str, Any], failures: Mapping[str, str]) -> dict[str, Any]:
    """The verdict document (``passed`` is true when every side showed what it should)."""
    figure = lab.checked_figure
    results = {side: _side(lab, plan, side, baseline["sides"].get(side, {}),
                           final["sides"].get(side, {})) for side in sides}
    return {
        "passed": not failures and all(result["as_expected"] for result in results.values()),
        "figure": figure.key, "label": figure.label, "unit": figure.unit,
        "threshold": plan.threshold, "sides": results, "failures": dict(failures),
        "summary": _summary(results, failures),
        "read_next": [lab.docs_page, lab.explanation_page],
    }
