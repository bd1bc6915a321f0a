"""Is the server's memory still growing? The RSS judgement of ``connserver soak``.

A least-squares line through RSS samples, with a noise floor under it, was the
first verdict, and it was wrong in both directions: one allocator step or one
slow ``/stats`` answer moved the line, and a straight climb passed whenever it
stayed under the floor. This module judges memory the way a person reads the
chart, with statistics that a few odd samples cannot move:

1. The load runs in identical **cycles** (the driver restarts every client's
   random numbers each cycle), so memory at the same point of successive
   cycles is comparable. Each cycle becomes one **level**: the median of its
   samples (by default one a cycle, taken at the same point of every cycle).
2. The first cycles are **warm-up** (threads start, pools and allocator arenas
   fill); the levels after them are the **steady** phase. The first steady
   level is the memory baseline.
3. The **trend** is the Theil-Sen slope of the steady levels: the median of the
   slopes between every pair of levels. Up to 29 % of the levels can be
   anything at all without moving it, and a step near the start or the end
   barely does; a least-squares line follows every one of them.
4. The verdict, from the trend, the trend of the later half (did it level
   off?), the Mann-Kendall test (is there a rise at all, or only noise going
   up and down?) and the size of the rise:

   ============  ==================================================================
   no leak       the trend is within the limit, or it was and stays so in the
                 later half (grew, then levelled off)
   leak          a steady rise (p < 0.05) above the limit, still rising in the later
                 half, by more than the allowance over the steady phase
   inconclusive  too few steady cycles; or no significant rise, only noise; or a
                 rise too small in total to tell from an allocator still settling
   ============  ==================================================================

Everything here is pure: lists of numbers in, a frozen record out.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Sequence

__all__ = ["MIN_STEADY_CYCLES", "Level", "MemoryTrend", "theil_sen", "trend_p_value",
           "cycle_levels", "judge_memory"]

MIN_STEADY_CYCLES = 4   # fewer and even a perfect climb is not significant at p < 0.05
_MAX_POINTS = 300       # Theil-Sen is O(n^2): longer runs merge neighbouring levels first
_SIGNIFICANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Level:
    """Memory in one load cycle: the median of its samples."""

    start: float        # seconds, on the soak's clock
    end: float
    kib: float
    samples: int

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2


@dataclasses.dataclass(frozen=True)
class MemoryTrend:
    """The memory verdict and every number behind it (KiB, seconds, KiB per minute)."""

    outcome: str                 # "no leak", "leak" or "inconclusive"
    reason: str                  # one line: why this outcome
    cycle: float
    warmup_cycles: int
    levels: tuple[Level, ...]    # every complete cycle, warm-up included
    steady_cycles: int
    slope: float | None = None           # Theil-Sen over the steady levels, KiB/min
    late_slope: float | None = None      # the same over the later half
    intercept: float | None = None       # trend line: kib = intercept + slope/60 * t
    growth: float | None = None          # the trend's rise over the steady cycles, KiB
    p_value: float | None = None         # Mann-Kendall, one-sided (a rise)
    cycles_grown: int = 0                # steady levels above the one before

    @property
    def steady(self) -> tuple[Level, ...]:
        return self.levels[self.warmup_cycles:]

    def as_dict(self) -> dict:
        """For the JSON report (rounded: these are measurements, not exact values)."""
        def r(value: float | None, digits: int = 1) -> float | None:
            return None if value is None else round(value, digits)
        return {
            "finding": self.outcome, "reason": self.reason, "cycle_s": self.cycle,
            "warmup_cycles": self.warmup_cycles, "steady_cycles": self.steady_cycles,
            "slope_kib_per_min": r(self.slope), "late_slope_kib_per_min": r(self.late_slope),
            "trend_intercept_kib": r(self.intercept), "trend_growth_kib": r(self.growth),
            "p_value": r(self.p_value, 4), "cycles_grown": self.cycles_grown,
            "levels": [[round(level.start, 3), round(level.end, 3), round(level.kib, 1), level.samples]
                       for level in self.levels],
        }


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(slope, intercept) of the Theil-Sen line; None without two distinct xs.

    The slope is the median of the slopes between all pairs of points, the
    intercept the median of ``y - slope * x``.
    """
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    if not slopes:
        return None
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * x for x, y in zip(xs, ys))


def trend_p_value(ys: Sequence[float]) -> float:
    """One-sided p-value of the Mann-Kendall test for a rise (1.0 without any).

    S counts, over all pairs, later values above earlier ones minus those
    below; under "no trend" it is near 0 with a known variance (with the
    correction for ties, which RSS counted in pages has many of). A steady rise
    gives a large S and a small p; a single step, or noise, does not.
    """
    n = len(ys)
    s = sum((ys[j] > ys[i]) - (ys[j] < ys[i]) for i in range(n) for j in range(i + 1, n))
    ties = [count for count in _counts(ys) if count > 1]
    variance = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in ties)) / 18
    if s <= 0 or variance <= 0:
        return 1.0
    z = (s - 1) / math.sqrt(variance)   # continuity correction
    return 0.5 * math.erfc(z / math.sqrt(2))


def _counts(values: Sequence[float]) -> list[int]:
    seen: dict[float, int] = {}
    for value in values:
        seen[value] = seen.get(value, 0) + 1
    return list(seen.values())


def cycle_levels(points: Sequence[tuple[float, float]], load_start: float, load_end: float,
                 cycle: float) -> list[Level]:
    """One level per complete cycle of the load: the median of the (t, kib) points in it.

    A cycle is complete when the load ran to its end; one without any sample
    (the admin endpoint did not answer) is left out.
    """
    if cycle <= 0:
        raise ValueError("cycle must be positive")
    complete = int((load_end - load_start) / cycle + 1e-9)
    buckets: list[list[float]] = [[] for _ in range(complete)]
    for t, kib in points:
        index = math.floor((t - load_start) / cycle)
        if 0 <= index < complete:
            buckets[index].append(kib)
    return [Level(load_start + index * cycle, load_start + (index + 1) * cycle,
                  statistics.median(values), len(values))
            for index, values in enumerate(buckets) if values]


def _thinned(levels: Sequence[Level]) -> list[tuple[float, float]]:
    """At most _MAX_POINTS (t, kib) points: neighbouring levels merged by their median."""
    points = [(level.middle, level.kib) for level in levels]
    if len(points) <= _MAX_POINTS:
        return points
    groups = [points[len(points) * g // _MAX_POINTS:len(points) * (g + 1) // _MAX_POINTS]
              for g in range(_MAX_POINTS)]
    return [(statistics.median(t for t, _ in group), statistics.median(k for _, k in group))
            for group in groups]


def judge_memory(levels: Sequence[Level], *, cycle: float, warmup_cycles: int,
                 max_slope: float, allowance: float) -> MemoryTrend:
    """Leak, no leak or inconclusive, from the cycle levels (see the module docstring).

    ``levels`` is every complete cycle in order, warm-up first; ``max_slope``
    is in KiB per minute, ``allowance`` in KiB.
    """
    levels = tuple(levels)
    steady = levels[warmup_cycles:]
    base = dict(cycle=cycle, warmup_cycles=warmup_cycles, levels=levels, steady_cycles=len(steady))
    if len(steady) < MIN_STEADY_CYCLES:
        return MemoryTrend("inconclusive", f"too short to judge: {len(steady)} complete steady "
                           f"cycle{'s' if len(steady) != 1 else ''} after {warmup_cycles} of "
                           f"warm-up, at least {MIN_STEADY_CYCLES} needed", **base)
    points = _thinned(steady)
    fit = theil_sen([t for t, _ in points], [kib for _, kib in points])
    assert fit is not None   # the levels have distinct times
    slope, intercept = fit[0] * 60, fit[1]
    late = points[-max(3, math.ceil(len(points) / 2)):]
    late_fit = theil_sen([t for t, _ in late], [kib for _, kib in late])
    assert late_fit is not None
    late_slope = late_fit[0] * 60
    growth = slope / 60 * (steady[-1].end - steady[0].start)
    p_value = trend_p_value([kib for _, kib in points])
    grown = sum(later.kib > earlier.kib for earlier, later in zip(steady, steady[1:]))
    numbers = dict(base, slope=slope, late_slope=late_slope, intercept=intercept,
                   growth=growth, p_value=p_value, cycles_grown=grown)
    if slope <= max_slope:
        return MemoryTrend("no leak", "the trend is within the limit", **numbers)
    if late_slope <= max_slope:
        return MemoryTrend("no leak", "levelled off: it grew, but the later half is within "
                           "the limit", **numbers)
    if p_value >= _SIGNIFICANCE:
        return MemoryTrend("inconclusive", f"no clear rise, the cycles go up and down (p = "
                           f"{p_value:.2f}): run longer to tell growth from noise", **numbers)
    if growth <= allowance:
        return MemoryTrend("inconclusive", f"still rising, but by {growth:,.0f} KiB, no more "
                           f"than an allocator settling in can (--rss-noise {allowance:,.0f} "
                           f"KiB): run longer", **numbers)
    return MemoryTrend("leak", "rising cycle after cycle, and still rising at the end", **numbers)
