"""One look at every side: /proc/PID for threads, fds and RSS; the child for its own figures.

The /proc figures are read by the runner, not reported by the child, so they
are right even when the child is too busy (or too stuck) to answer; a child
that does not answer leaves a gap in its own figures, with the reason.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .children import Child, ChildError

__all__ = ["proc_figures", "take_sample"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_figures(pid: int) -> dict[str, int]:
    """Threads, open fds and resident memory (bytes) of process ``pid``; {} if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            threads = next(int(line.split()[1]) for line in status if line.startswith(b"Threads:"))
        with open(f"/proc/{pid}/statm", "rb") as statm:
            rss = int(statm.read().split()[1]) * _PAGE_SIZE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, IndexError, ValueError):
        return {}
    return {"threads": threads, "fds": fds, "rss_bytes": rss}


def take_sample(t: float, phase: str, children: Mapping[str, Child],
                driver: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``{"t", "phase", "sides": {side: {figure: value}}, "errors": {side: text}}``."""
    sides: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for name, child in children.items():
        figures: dict[str, float] = dict(proc_figures(child.pid))
        try:
            reply = child.stats()
        except ChildError as exc:
            reply = {"error": str(exc)}
        if "error" in reply:
            errors[name] = reply["error"]
        figures.update(reply.get("figures", {}))
        figures.update(driver.get(name, {}))
        sides[name] = figures
    sample: dict[str, Any] = {"t": round(t, 3), "phase": phase, "sides": sides}
    if errors:
        sample["errors"] = errors
    return sample
