"""What a learner sees: a live side-by-side table, then the verdict.

On a terminal the table is redrawn in place at every sample (about four times
a second) under a progress bar; anywhere else (a CI log, a pipe) it is one
plain line per side about once a second. Each cell is the figure now and its
rise since the baseline taken before the load: ``152 (+150)``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence, TextIO

from .spec import Figure, Lab

__all__ = ["format_value", "table_lines", "progress_line", "LiveDisplay", "PlainDisplay",
           "make_display", "format_verdict", "format_list"]

_MIB = 1024 * 1024
_BAR_WIDTH = 30
_LABEL_WIDTH = 24
_COLUMN_WIDTH = 22
_PLAIN_INTERVAL = 1.0    # seconds between plain lines


def _number(figure: Figure, value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if figure.unit == "MiB":
        return f"{value / _MIB:{sign},.1f}"
    if figure.unit == "KiB":
        return f"{value / 1024:{sign},.1f}"
    if figure.unit == "ms":
        return f"{value:{sign},.1f}"
    return f"{value:{sign},.0f}"


def format_value(figure: Figure, value: float | None, baseline: float | None = None) -> str:
    """``152 (+150)``, ``24.1 MiB (+3.2)``, or ``-`` when the figure is missing."""
    if value is None:
        return "-"
    text = _number(figure, value) + (f" {figure.unit}" if figure.unit else "")
    if baseline is not None and figure.source != "driver":
        text += f" ({_number(figure, value - baseline, signed=True)})"
    return text


def table_lines(lab: Lab, sides: Sequence[str], sample: Mapping[str, Any],
                baseline: Mapping[str, Any] | None) -> list[str]:
    """The figures of ``sample``, one row each, one column per side (fits 80 columns)."""
    lines = [" " * _LABEL_WIDTH + "".join(side.ljust(_COLUMN_WIDTH) for side in sides).rstrip()]
    for figure in lab.all_figures:
        cells = []
        for side in sides:
            value = sample["sides"].get(side, {}).get(figure.key)
            base = None if baseline is None else baseline["sides"].get(side, {}).get(figure.key)
            cells.append(format_value(figure, value, base).ljust(_COLUMN_WIDTH))
        marker = "*" if figure.key == lab.check.figure else " "
        lines.append((marker + " " + figure.label).ljust(_LABEL_WIDTH) + "".join(cells).rstrip())
    return lines


def progress_line(t: float, total: float, phase: str) -> str:
    done = 0.0 if total <= 0 else min(1.0, max(0.0, t / total))
    filled = round(done * _BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {t:5.1f} s of {total:.1f}  {phase}"


def _heading(lab: Lab, sides: Sequence[str]) -> str:
    described = {"broken": lab.broken, "fixed": lab.fixed}
    return "\n".join([f"lab {lab.number}, {lab.name}: {lab.title}"]
                     + [f"  {side + ':':<7} {described[side]}" for side in sides])


class LiveDisplay:
    """The table redrawn in place on a terminal, under a progress bar."""

    def __init__(self, stream: TextIO, lab: Lab, sides: Sequence[str], total: float) -> None:
        self._stream, self._lab, self._sides, self._total = stream, lab, sides, total
        self._drawn = 0
        stream.write(_heading(lab, sides) + "\n")
        stream.flush()

    def update(self, t: float, phase: str, sample: Mapping[str, Any],
               baseline: Mapping[str, Any] | None) -> None:
        lines = [progress_line(t, self._total, phase)]
        lines += table_lines(self._lab, self._sides, sample, baseline)
        lines += [f"  {side}: {error}" for side, error in sample.get("errors", {}).items()]
        # Back to the first line drawn last time, then each line cleared as it is rewritten.
        up = f"\x1b[{self._drawn}A\r" if self._drawn else ""
        self._stream.write(up + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        self._stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._stream.flush()


class PlainDisplay:
    """One line per side about once a second: for logs and pipes."""

    def __init__(self, stream: TextIO, lab: Lab, sides: Sequence[str], total: float) -> None:
        self._stream, self._lab, self._sides = stream, lab, sides
        self._next = 0.0
        self._unshown: tuple[float, str, Mapping[str, Any], Mapping[str, Any] | None] | None = None
        stream.write(f"{_heading(lab, sides)}\n  ({total:.0f} s; * marks the figure judged)\n")
        stream.flush()

    def update(self, t: float, phase: str, sample: Mapping[str, Any],
               baseline: Mapping[str, Any] | None) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unshown = (t, phase, sample, baseline)
            return
        self._next = now + _PLAIN_INTERVAL
        self._unshown = None
        self._show(t, phase, sample, baseline)

    def _show(self, t: float, phase: str, sample: Mapping[str, Any],
              baseline: Mapping[str, Any] | None) -> None:
        for side in self._sides:
            figures = sample["sides"].get(side, {})
            base = {} if baseline is None else baseline["sides"].get(side, {})
            cells = ", ".join(
                f"{'*' if f.key == self._lab.check.figure else ''}{f.label} "
                f"{format_value(f, figures.get(f.key), base.get(f.key))}"
                for f in self._lab.all_figures)
            self._stream.write(f"{t:6.1f} s {phase:<8} {side:<6} {cells}\n")
        for side, error in sample.get("errors", {}).items():
            self._stream.write(f"{t:6.1f} s {phase:<8} {side:<6} no figures: {error}\n")
        self._stream.flush()

    def close(self) -> None:
        """Show the last sample, the one the verdict judges, if it was not shown yet."""
        if self._unshown is not None:
            self._show(*self._unshown)
            self._unshown = None
        self._stream.flush()


def make_display(stream: TextIO, lab: Lab, sides: Sequence[str],
                 total: float) -> LiveDisplay | PlainDisplay:
    """The live table on a terminal, plain lines anywhere else."""
    isatty = getattr(stream, "isatty", None)
    live = bool(isatty is not None and isatty())
    return (LiveDisplay if live else PlainDisplay)(stream, lab, sides, total)


def format_verdict(document: Mapping[str, Any]) -> str:
    """The verdict of a run, and what to read next."""
    verdict = document["verdict"]
    figure = Figure(verdict["figure"], verdict["label"], verdict["unit"])
    threshold = _number(figure, verdict["threshold"], signed=True)
    unit = f" {figure.unit}" if figure.unit else ""
    lines = [f"verdict: {verdict['summary']}"]
    for side, result in verdict["sides"].items():
        if result.get("rise") is None:
            lines.append(f"  {side:<6} {figure.label}: no figure ({result['meaning']})")
            continue
        rise = _number(figure, result["rise"], signed=True)
        state = "crossed" if result["crossed"] else "stayed under"
        mark = "" if result["as_expected"] else "  <- not what this side should show"
        lines.append(f"  {side:<6} {figure.label} {rise}{unit} after the load, threshold "
                     f"{threshold}{unit}: {state}. {result['meaning']}{mark}")
    for side, how in document.get("stopped", {}).items():
        if how == "killed":
            lines.append(f"  ({side}: its process did not stop within a second of being asked, "
                         "and was killed)")
    for where, failure in verdict.get("failures", {}).items():
        lines.append(f"  the load against {where} failed: {failure}")
    lines.append("read next: " + " and ".join(verdict["read_next"]))
    return "\n".join(lines)


def format_list(labs: Sequence[Lab]) -> str:
    """``connserver lab`` with no name: number, name and one line per lab."""
    width = max(len(lab.name) for lab in labs)
    lines = ["connserver lab: watch a leak from the article happen, and its fix hold, on this "
             "machine", ""]
    lines += [f"  {lab.number:>2}  {lab.name:<{width}}  {lab.title}" for lab in labs]
    lines += ["", "Run one: connserver lab NAME (or its number). The broken and the fixed server "
              "run side by side, about 30 s.",
              "  --short  a few seconds    --broken / --fixed  one side    --json  figures and "
              "verdict as JSON",
              "Each lab's page: docs/lab/NAME.md"]
    return "\n".join(lines)
