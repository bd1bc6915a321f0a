"""One run of a lab: start the sides, baseline, load, settle, end every process, judge.

The timeline, sampled every :data:`SAMPLE_INTERVAL`:

1. **Start.** Each side's child process starts at once (:mod:`.children`); the
   run waits for both to listen.
2. **Baseline** (:data:`BASELINE_TIMEOUT`): figures before any load; the last
   sample is what rises are measured from.
3. **Load** (``plan.load_timeout``): the lab's ``drive`` against every side
   at once (:mod:`.driver`).
4. **Settle** (``plan.settle_timeout``): the load has stopped; whatever it
   started should now end. Vanished peers stay vanished.
5. **End**, whatever happened before: each child is asked to stop and killed
   if it has not within a second; then the driver's sockets are closed.

The result is one document (plain dicts, what ``--json`` prints): the lab,
the plan, every sample, the baseline and final figures, how each process
ended, and the verdict (:mod:`.verdict`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol, Sequence

from .children import Child
from .driver import Load
from .sampler import take_sample
from .spec import Lab
from .verdict import judge

__all__ = ["run_lab", "Display", "SAMPLE_INTERVAL", "BASELINE_TIMEOUT", "total_time"]

SAMPLE_INTERVAL = 0.25
BASELINE_TIMEOUT = 0.5


class Display(Protocol):
    def update(self, t: float, phase: str, sample: dict[str, Any],
               baseline: dict[str, Any] | None) -> None: ...

    def close(self) -> None: ...


def total_time(lab: Lab, short: bool) -> float:
    """Seconds from the sides listening to the last sample."""
    plan = lab.plan(short)
    return BASELINE_TIMEOUT + plan.load_timeout + plan.settle_timeout


def run_lab(lab: Lab, short: bool, sides: Sequence[str], display: Display | None = None,
            interval: float = SAMPLE_INTERVAL) -> dict[str, Any]:
    """Run ``lab`` on ``sides`` (both, or one) and return its document.

    Raises :class:`~connserver.lab.children.ChildError` if a side fails to
    start; every process it started has ended by then, as on any other exit.
    """
    plan = lab.plan(short)
    children: dict[str, Child] = {}
    load: Load | None = None
    samples: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    phases: dict[str, float] = {}
    t0 = time.monotonic()

    def sample_until(phase: str, end: float) -> None:
        while True:
            sample = take_sample(time.monotonic() - t0, phase, children,
                                 load.figures() if load is not None else {})
            samples.append(sample)
            if display is not None:
                display.update(sample["t"], phase, sample, baseline)
            now = time.monotonic()
            if now >= end:
                return
            time.sleep(min(interval, end - now))

    try:
        for side in sides:
            children[side] = Child(lab.name, side, "short" if short else "full")
        addresses = {side: ("127.0.0.1", child.wait_ready()) for side, child in children.items()}
        t0 = time.monotonic()
        sample_until("baseline", t0 + BASELINE_TIMEOUT)
        baseline = samples[-1]
        load = Load(lab.drive, plan, addresses, counts=[
            figure.key for figure in lab.figures if figure.source == "driver" and not figure.unit],
            ports={side: child.ports for side, child in children.items()})
        load_start = time.monotonic()
        load.start()
        sample_until("load", load_start + plan.load_timeout)
        load.stop()
        load_end = time.monotonic()
        sample_until("settle", load_end + plan.settle_timeout)
        phases = {"load_start": round(load_start - t0, 3), "load_end": round(load_end - t0, 3),
                  "end": round(time.monotonic() - t0, 3)}
    finally:
        if load is not None:
            load.stop()
        for child in children.values():
            child.end()
        if load is not None:
            load.close()
        if display is not None:
            display.close()
    assert baseline is not None and load is not None
    final = samples[-1]
    return {
        "tool": "connserver lab", "format": 1,
        "lab": {"number": lab.number, "name": lab.name, "title": lab.title,
                "broken": lab.broken, "fixed": lab.fixed,
                "docs": lab.docs_page, "explanation": lab.explanation_page},
        "short": short, "sides": list(sides), "plan": dataclasses.asdict(plan),
        "figures": [dataclasses.asdict(figure) for figure in lab.all_figures],
        "phases": phases, "samples": samples,
        "baseline": baseline["sides"], "final": final["sides"],
        "stopped": {side: {True: "clean", False: "killed"}.get(child.stopped_cleanly, "exited")
                    for side, child in children.items()},
        "verdict": judge(lab, plan, sides, baseline, final, load.failures),
    }
