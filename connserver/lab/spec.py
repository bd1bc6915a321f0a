"""What a lab is: its figures, its two plans, the check that judges it, and its two halves.

A lab is data plus two functions. :attr:`Lab.start_side` runs in a child
process and starts one side's server (``"broken"`` or ``"fixed"``);
:attr:`Lab.drive` runs in the ``connserver lab`` process, once per side, and
applies the same bounded load to each. Everything else (processes, sampling,
display, verdict) is the framework's, so a lab module holds only what teaches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

__all__ = ["SIDES", "MAX_LABEL", "Figure", "STANDARD_FIGURES", "Plan", "Check", "Side", "Lab"]

#: The two sides of every lab, in the order they are shown.
SIDES = ("broken", "fixed")
#: The longest figure label the live table has room for.
MAX_LABEL = 21


@dataclasses.dataclass(frozen=True)
class Figure:
    """One number shown side by side, sampled about four times a second.

    ``source`` says who measures it: ``"proc"`` (the runner, from /proc/PID),
    ``"side"`` (the child, from its :meth:`Side.figures`) or ``"driver"``
    (the load, from :meth:`Session.count`).
    """

    key: str
    label: str
    unit: str = ""          # "" a count; "KiB" or "MiB": bytes, shown in those; "ms"
    source: str = "side"

    def __post_init__(self) -> None:
        if self.source not in ("proc", "side", "driver"):
            raise ValueError(f"figure {self.key!r}: source must be proc, side or driver")
        if len(self.label) > MAX_LABEL:
            raise ValueError(f"figure {self.key!r}: a label of at most {MAX_LABEL} characters "
                             "(the table's first column)")


#: Figures every lab shows first, read from /proc/PID by the runner.
STANDARD_FIGURES = (
    Figure("threads", "threads", source="proc"),
    Figure("fds", "open fds", source="proc"),
    Figure("rss_bytes", "RSS", "MiB", source="proc"),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how hard one run is, and the threshold that load implies.

    ``threshold`` is a rise of the checked figure over its baseline (the first
    sample, before the load): the broken side must reach it, the fixed side
    must stay under it. ``params`` are the lab's own knobs (counts, rates,
    timeouts), read by both halves (the child gets the plan by name).
    """

    load_timeout: float
    settle_timeout: float
    threshold: float
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.load_timeout <= 0 or self.settle_timeout < 0:
            raise ValueError("a plan needs a positive load_timeout and a settle_timeout >= 0")

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclasses.dataclass(frozen=True)
class Check:
    """The figure the verdict judges, at the last sample, as a rise over its baseline."""

    figure: str
    leaked: str     # what the broken side crossing it means (one sentence)
    held: str       # what the fixed side staying under it means (one sentence)


class Side(Protocol):
    """One side's server, running in its child process on 127.0.0.1.

    A side that listens on more ports (an admin endpoint) names them in an
    optional ``ports`` mapping (``{"admin": 41234}``); the load finds them in
    :attr:`Session.ports <connserver.lab.driver.Session.ports>`.
    """

    address: tuple[str, int]

    def figures(self) -> Mapping[str, float]:
        """The side's own figures (keys of the lab's ``"side"`` figures); called often."""

    def stop(self) -> None:
        """Stop serving, in bounded time (the child is killed after a second anyway)."""


@dataclasses.dataclass(frozen=True)
class Lab:
    """A leak from the article, shown happening on one side and prevented on the other."""

    number: int
    name: str                       # the CLI name and docs/lab/NAME.md
    title: str                      # one line, for the list of labs
    broken: str                     # a few words on each side, over its column:
    fixed: str                      # "socketserver, no timeout", "connserver, idle_timeout"
    explanation: str                # the page that explains it: "deadlines" for docs/explanation/
                                    # deadlines.md, or a path under docs/: "howto/soak"
    figures: tuple[Figure, ...]     # shown after the standard ones
    check: Check
    full: Plan                      # the default run: ends within about 30 s
    short: Plan                     # --short, for CI: a few seconds
    start_side: Callable[[str, Plan], Side]
    drive: Callable[[Any], None]    # drive(session: driver.Session), once per side

    def __post_init__(self) -> None:
        keys = [figure.key for figure in self.all_figures]
        if len(set(keys)) != len(keys):
            raise ValueError(f"lab {self.name!r}: figure keys repeat: {keys}")
        if self.check.figure not in keys:
            raise ValueError(f"lab {self.name!r}: the check's figure {self.check.figure!r} "
                             "is not one of its figures")

    @property
    def all_figures(self) -> tuple[Figure, ...]:
        return STANDARD_FIGURES + self.figures

    @property
    def checked_figure(self) -> Figure:
        return next(f for f in self.all_figures if f.key == self.check.figure)

    @property
    def docs_page(self) -> str:
        return f"docs/lab/{self.name}.md"

    @property
    def explanation_page(self) -> str:
        page = self.explanation if "/" in self.explanation else f"explanation/{self.explanation}"
        return f"docs/{page}.md"

    def plan(self, short: bool) -> Plan:
        return self.short if short else self.full
