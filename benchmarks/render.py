"""From the suite's raw results to docs/benchmarks.md: spreads, the rule for ratios, the tables.

    python benchmarks/render.py benchmarks/results/full.json docs/benchmarks.md

run.py calls ``render()`` after a run; this entry point re-renders a stored
result without measuring again.

The rule for ratios (``claim`` and ``against``) is mechanical, so that no table
shows a difference smaller than the noise that produced it:

* A **ratio between two servers** is printed only if each has at least three
  runs (two runs' range says little about the spread), their ranges (min–max over the repeats) do not overlap, and neither
  server's own range is as wide as the ratio claimed (max/min of its runs is
  below the ratio, the ratio taken as ≥ 1). Otherwise the cell says
  "inconclusive" and why.
* A **target** "ratio ≥ T" (or ≤ T) is judged on every ratio the ranges allow,
  from other.min/base.max to other.max/base.min: *met* if all of them meet it,
  *missed* if none does, *inconclusive* otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import sys
from typing import Iterable

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIN_RUNS = 3   # fewer runs than this on either side: no ratio, no verdict on a ratio


# ----------------------------------------------------------------- statistics

@dataclasses.dataclass(frozen=True)
class Spread:
    """Median and full range of one measure over the repeats of a cell."""

    median: float
    low: float
    high: float
    count: int

    @property
    def width(self) -> float:
        """max/min: how far apart the repeats are, as a factor."""
        return self.high / self.low if self.low > 0 else math.inf


def spread(values: Iterable[float | None]) -> Spread | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return None
    return Spread(statistics.median(numbers), min(numbers), max(numbers), len(numbers))


def dig(run: object, *path: str) -> float | None:
    for key in path:
        run = run.get(key) if isinstance(run, dict) else None
    return run if isinstance(run, (int, float)) and not isinstance(run, bool) else None


# The kernel counts CPU time in clock ticks (10 ms here): below 10 ticks in a window, one
# tick more or less moves CPU per operation by over 10 %, so such a run gives no CPU figure.
MIN_CPU_S = 0.1


def per_op_us(run: dict, count_path: tuple[str, ...]) -> float | None:
    """Server CPU time per operation counted in the window, in microseconds."""
    cpu, count = dig(run, "server", "cpu_s"), dig(run, *count_path)
    if cpu is None or cpu < MIN_CPU_S or not count:
        return None
    return cpu / count * 1e6


def others(cell: dict | None) -> str:
    """Median share of CPU 0 / CPU 1 taken by other work during the cell's runs, in per cent."""
    if not cell:
        return "—"
    parts = []
    for cpu in ("0", "1"):
        s = spread(dig(run, "others", cpu) for run in cell["runs"])
        parts.append(num(s.median * 100) if s else "—")
    return " / ".join(parts)


def cpu_per_rt(run: dict) -> float | None:
    return per_op_us(run, ("results", "round_trips"))


def hold_per_conn(run: dict, connections: int) -> float | None:
    """Server RSS at the end of a hold minus before connecting, per connection, in KiB."""
    start, end = dig(run, "server", "rss_kib_start"), dig(run, "server", "rss_kib_end")
    return (end - start) / connections if start is not None and end is not None else None


def hostile_open(run: dict) -> str:
    """Hostile peers still connected when the honest client's run ended: tricklers + non-readers."""
    report = run.get("attackers") or {}
    parts = []
    for kind in ("trickle", "stall"):
        side = report.get(kind) or {}
        parts.append(f"{num(side.get('still_open'))}/{num(side.get('count'))}")
    return " + ".join(parts)


def hostile_deltas(results: dict, server: str) -> list[float | None]:
    """Per repeat: the honest client's p99 among hostile peers minus its p99 alone, in µs."""
    alone, attacked = find(results, "hostile", server, attacked=False), find(results, "hostile", server, attacked=True)
    if not alone or not attacked:
        return []
    out = []
    for quiet, loud in zip(alone["runs"], attacked["runs"]):
        a, b = dig(quiet, "results", "latency", "p99_us"), dig(loud, "results", "latency", "p99_us")
        out.append(b - a if a is not None and b is not None and quiet.get("ok") and loud.get("ok") else None)
    return out


# ------------------------------------------------------------ the rule, coded

@dataclasses.dataclass(frozen=True)
class Claim:
    """other/base as a ratio of medians, or None with the reason it may not be claimed."""

    ratio: float | None
    reason: str

    def text(self) -> str:
        if self.ratio is None:
            return f"inconclusive ({self.reason})"
        return f"{self.ratio:.2f}×"


def claim(base: Spread | None, other: Spread | None, base_name: str = "base",
          other_name: str = "this") -> Claim:
    """The ratio other.median / base.median if the data supports it (see the module docstring)."""
    if base is None or other is None:
        return Claim(None, "no data")
    if base.count < MIN_RUNS or other.count < MIN_RUNS:
        return Claim(None, f"fewer than {MIN_RUNS} runs")
    ratio = other.median / base.median
    if max(base.low, other.low) <= min(base.high, other.high):
        return Claim(None, "ranges overlap")
    claimed = max(ratio, 1 / ratio)
    for name, side in ((other_name, other), (base_name, base)):
        if side.width >= claimed:
            return Claim(None, f"{name}'s own range is {side.width:.2f}× wide")
    return Claim(ratio, "")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A target judged on every ratio the two ranges allow."""

    word: str            # "met", "missed", "inconclusive"
    low: float | None
    high: float | None
    median: float | None

    def text(self, digits: int = 2) -> str:
        if self.median is None:
            return "no data"
        return f"{self.median:.{digits}f}× (possible {self.low:.{digits}f}–{self.high:.{digits}f}×)"


def against(base: Spread | None, other: Spread | None, bound: float, at_least: bool) -> Verdict:
    """Target other/base ≥ bound (at_least) or ≤ bound, judged on the ratio interval."""
    if base is None or other is None or base.low <= 0 or other.low <= 0:
        return Verdict("inconclusive", None, None, None)
    low, high, median = other.low / base.high, other.high / base.low, other.median / base.median
    if base.count < MIN_RUNS or other.count < MIN_RUNS:
        return Verdict("inconclusive", low, high, median)
    if at_least:
        word = "met" if low >= bound else "missed" if high < bound else "inconclusive"
    else:
        word = "met" if high <= bound else "missed" if low > bound else "inconclusive"
    return Verdict(word, low, high, median)


def every_run(flags: list[bool]) -> str:
    """A per-run condition: met in every run, missed in every run, or inconclusive."""
    if not flags:
        return "inconclusive"
    return "met" if all(flags) else "missed" if not any(flags) else "inconclusive"


# --------------------------------------------------------------- formatting

def num(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def show(s: Spread | None, digits: int = 0, scale: float = 1.0) -> str:
    """median (min–max), or the value alone for one run."""
    if s is None:
        return "—"
    if s.count == 1:
        return num(s.median * scale, digits)
    return f"{num(s.median * scale, digits)} ({num(s.low * scale, digits)}–{num(s.high * scale, digits)})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def ok_runs(cell: dict) -> list[dict]:
    return [run for run in cell["runs"] if run.get("ok")]


def failures(cell: dict) -> str:
    bad = [run for run in cell["runs"] if not run.get("ok")]
    if not bad:
        return ""
    return f" ({len(bad)} of {len(cell['runs'])} runs failed: {bad[0].get('error') or 'no result'})"


def cells_of(results: dict, kind: str, **match: object) -> list[dict]:
    return [cell for cell in results["cells"]
            if cell["kind"] == kind and all(cell.get(k) == v for k, v in match.items())]


def find(results: dict, kind: str, server: str, **match: object) -> dict | None:
    return next(iter(cells_of(results, kind, server=server, **match)), None)


def measure(cell: dict | None, fn) -> Spread | None:
    return spread(fn(run) for run in ok_runs(cell)) if cell else None


# ------------------------------------------------------------------ sections

def header(results: dict, command: str) -> list[str]:
    machine, plan = results["machine"], results["plan"]
    background = results.get("background", {})

    def busy(sample: dict | None) -> str:
        if not sample:
            return "not measured"
        return ", ".join(f"CPU {cpu} {share * 100:.0f} %" for cpu, share in sorted(sample.items()))

    lines = [
        "# Benchmarks", "",
        "<!-- Written by benchmarks/run.py; do not edit by hand. -->", "",
        f"Command: `{command}` ({results['mode']} mode, {results['seconds']:.0f} s), started "
        f"{results['started']}, commit `{results.get('commit', 'unknown')}`. Machine: "
        f"{machine['cpus']} CPUs, Linux {machine['kernel']}, Python {machine['python']}"
        + "".join(f", {name} {version}" for name, version in sorted(results.get("versions", {}).items()))
        + ".", "",
        "Other work on the machine while nothing of the suite ran (share of each CPU, over "
        f"1 s): before the run {busy(background.get('before'))}; after it "
        f"{busy(background.get('after'))}. " + interference(results),
        "",
        "How to read these tables:", "",
        "- Every server is pinned to CPU 0 and the load generator (`benchmarks/loadgen.c`) to "
        "CPU 1. The servers compared in a table are started together and stay up; the load "
        "alternates between them (A B C … C B A), "
        f"{plan['repeats']} times per cell, so noise from the rest of the machine falls on all "
        "of them alike. Values are the median with the full range of the repeats in parentheses.",
        "- **CPU µs/op** is the server's own CPU time (user + system of the whole process, read "
        "from `/proc/PID/stat` at the start and end of the measured window) divided by the "
        "operations completed in that window. It stays put when throughput swings, so it is the "
        "headline; round trips per second are shown beside it. A run in which the server got "
        f"less than {MIN_CPU_S:g} s of CPU in its window (ten of the kernel's 10 ms ticks) gives "
        "no CPU figure.",
        "- **others %** is the share of each CPU that other processes took during a run "
        "(from `/proc/stat`: CPU 0's user, system and steal time less the server's, CPU 1's "
        "less the client's; median over the cell's runs). It says how much of a cell's spread "
        "the rest of the machine explains.",
        "- **vs connserver** is this server's CPU per operation divided by connserver's "
        "(above 1: connserver spends less). It is printed only when the data supports it: "
        f"each server has at least {MIN_RUNS} runs, the two ranges do not overlap and neither "
        "server's own range (max/min) is as wide as the ratio; otherwise the cell says "
        "*inconclusive* and why (`benchmarks/render.py`).",
        "- Each server is **primed** once after it starts (its first connections are not "
        "counted; see *First load on a fresh process*).",
        "- Each echo run starts with a **burst**: every connection sends one request and none "
        "sends a second until all have had their first reply (`loadgen --barrier`). The steady "
        "state is measured after that, so a slow start cannot pass for slow service.",
        "- Every message is a frame (a 4-byte length, then the payload): the raw echo servers "
        "echo it unchanged, `connserver-framed` parses it (a message handler).",
        "- How the results compare with the project's targets: {doc}`explanation/performance`.",
        "",
    ]
    if results.get("missing"):
        lines += [f"Not measured (not installed): {', '.join(results['missing'])}. "
                  "`pip install -e '.[bench]'` installs them.", ""]
    return lines


def interference(results: dict) -> str:
    """Other work on each CPU over all of the suite's runs: median and maximum."""
    runs = [run for cell in results["cells"] for run in cell["runs"] if isinstance(run.get("others"), dict)]
    if not runs:
        return ""
    parts = []
    for cpu in ("0", "1"):
        s = spread(run["others"].get(cpu) for run in runs)
        if s:
            parts.append(f"CPU {cpu} median {s.median * 100:.0f} %, max {s.high * 100:.0f} %")
    return (f"During the {len(runs)} runs, other processes took {'; '.join(parts)} "
            "(per run: the CPU's busy time less the server's or the client's).")


def echo_section(results: dict) -> list[str]:
    lines = ["## Echo: CPU per round trip, steady state", ""]
    echo = cells_of(results, "echo")
    for size in sorted({cell["size"] for cell in echo}):
        for n in sorted({cell["connections"] for cell in echo if cell["size"] == size}):
            row_cells = [cell for cell in echo if cell["size"] == size and cell["connections"] == n]
            base = measure(next((c for c in row_cells if c["server"] == "connserver"), None), cpu_per_rt)
            rows = []
            for cell in row_cells:
                cpu = measure(cell, cpu_per_rt)
                versus = ("—" if cell["server"] == "connserver"
                          else claim(base, cpu, "connserver", cell["server"]).text())
                jain = measure(cell, lambda r: dig(r, "results", "fairness", "jain"))
                rows.append([
                    cell["server"] + failures(cell), show(cpu, 2), versus,
                    show(measure(cell, lambda r: dig(r, "results", "round_trips_per_s"))),
                    show(measure(cell, lambda r: dig(r, "server", "util")), 2),
                    show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us"))),
                    show(measure(cell, lambda r: dig(r, "results", "latency", "p99_us"))),
                    show(measure(cell, lambda r: dig(r, "results", "latency", "p999_us"))),
                    show(measure(cell, lambda r: dig(r, "results", "fairness", "starved"))),
                    show(jain, 3) if jain else "—",
                    show(measure(cell, lambda r: dig(r, "loadgen_cpu", "util")), 2),
                    others(cell),
                ])
            lines += [f"### N={n:,}, {size}-byte messages", ""]
            lines += table(["server", "CPU µs/round trip", "vs connserver", "round trips/s",
                            "server CPU", "p50 µs", "p99 µs", "p999 µs", "starved", "Jain",
                            "loadgen CPU", "others % CPU 0 / 1"], rows)
            probes = [cell for cell in row_cells if any(dig(r, "results", "probe", "started") for r in ok_runs(cell))]
            if probes:
                lines += ["A fresh connection every 0.25 s among the busy ones, connect to echo "
                          "(`--probe-interval`):", ""]
                lines += table(["server", "p50 ms", "max ms", "served"], [[
                    cell["server"],
                    show(measure(cell, lambda r: dig(r, "results", "probe", "latency", "p50_us")), 1, 1e-3),
                    num(max((dig(r, "results", "probe", "latency", "max_us") or 0) for r in ok_runs(cell)) / 1e3, 1),
                    f"{sum(dig(r, 'results', 'probe', 'completed') or 0 for r in ok_runs(cell)):.0f}/"
                    f"{sum(dig(r, 'results', 'probe', 'started') or 0 for r in ok_runs(cell)):.0f}",
                ] for cell in probes])
    return lines


def priming_section(results: dict) -> list[str]:
    """Each server's first load after it starts, beside its steady state at N=10."""
    priming = results.get("priming") or []
    if not priming:
        return []
    rows = []
    for server in dict.fromkeys(entry["server"] for entry in priming):
        first = spread(cpu_per_rt(entry["result"]) for entry in priming if entry["server"] == server)
        steady = measure(find(results, "echo", server, connections=10, size=64), cpu_per_rt)
        rows.append([server, f"{first.count if first else 0}", show(first, 2), show(steady, 2),
                     f"{first.median / steady.median:.2f}×" if first and steady else "—"])
    return (["## First load on a fresh process", "",
             "Every server is primed after it starts, before any counted run: 10 connections for "
             "0.2 s, the first set of connections it ever serves. These runs are not in the tables "
             "above; here they are beside the steady state at N=10 (CPU µs per round trip; the "
             "priming median is over every group the server was started for).", ""]
            + table(["server", "primings", "first load", "steady state, N=10", "first ÷ steady"], rows))


def burst_rows(cells: list[dict]) -> list[list[str]]:
    rows = []
    for cell in cells:
        runs = cell["runs"]
        times = []
        for run in runs:
            burst = dig(run, "results", "burst", "all_served_s")
            released = dig(run, "results", "burst", "released_s")
            if burst is not None:
                times.append(f"{burst:.2f}")
            elif released is not None:
                served = dig(run, "results", "burst", "served") or 0
                times.append(f"> {released:.1f} ({served:,.0f} served)")
            else:
                times.append("failed")
        unserved = [cell["connections"] - (dig(r, "results", "burst", "served") or 0) for r in runs]
        rows.append([
            cell["server"], ", ".join(times),
            show(spread(dig(r, "results", "burst", "all_served_s") for r in runs), 2),
            show(measure(cell, lambda r: dig(r, "results", "first_request", "p99_us")), 0, 1e-3),
            f"{max(unserved):,}" if unserved else "—",
            show(measure(cell, lambda r: dig(r, "results", "burst", "server_cpu_s")), 2),
            show(spread(r.get("settle_s") for r in runs), 1)
            + "".join(f"; run {i + 1} did not settle in {r['settle_s']:.0f} s"
                      for i, r in enumerate(runs) if r.get("settled") is False),
        ])
    return rows


def burst_section(results: dict) -> list[str]:
    lines = ["## Bursts: N new connections, each until its first reply", "",
             "Every connection connects and sends one request at once; the time is from the "
             "first connect until the last of the N has its reply. Repeated on the same server "
             "process, each run listed in order. After each run the server must settle (listen "
             "queue empty, descriptors back to the baseline, thread count steady) before the "
             "next run starts; *settle s* is how long that took, and a run that follows one "
             "that did not settle met a server still busy with the last burst.", ""]
    groups = [(n, [c for c in cells_of(results, "echo", connections=n, size=64)])
              for n in sorted({c["connections"] for c in cells_of(results, "echo")}) if n >= 1000]
    groups += [(cell_n, cells_of(results, "burst", connections=cell_n))
               for cell_n in sorted({c["connections"] for c in cells_of(results, "burst")})]
    for n, cells in groups:
        if not cells:
            continue
        lines += [f"### N={n:,}", ""]
        lines += table(["server", "all served, s (each run)", "median (range)", "first reply p99 ms",
                        "most unserved", "server CPU s", "settle s"], burst_rows(cells))
    return lines


def paced_section(results: dict) -> list[str]:
    if not cells_of(results, "paced"):
        return []
    lines = ["## Paced: many connections, each sending now and then", "",
             "Each connection sends one 64-byte message every 1/R seconds; the N schedules are "
             "spread evenly over the period (not in lockstep). Latency runs from when a message "
             "was *due*, so a server that falls behind shows it in full. One run per server "
             "(the servers alternate between the two scenarios); the ranges are over the "
             "window's slices, to show how steady the run was. *From send* measures from when "
             "loadgen actually sent the message; the difference is loadgen's own lateness "
             "(*send lag*), which grows when its CPU is busy. *Late* counts replies later than "
             "1 s, never answered, or never sent because 16 were already outstanding.", ""]
    for connections, rate in sorted({(c["connections"], c["rate"]) for c in cells_of(results, "paced")},
                                    reverse=True):
        cells = cells_of(results, "paced", connections=connections, rate=rate)
        rows = []
        window = None
        for cell in cells:
            run = cell["runs"][0] if cell["runs"] else {}
            res = run.get("results", {})
            window = window or dig(run, "params", "duration_s")
            slices = res.get("slices") or []
            late = sum(dig(res, key) or 0 for key in ("late_1s", "unanswered", "skipped"))
            rss = dig(run, "server", "rss_kib_max")
            rows.append([
                cell["server"] + ("" if run.get("ok") else f" (failed: {run.get('error')})"),
                num(dig(res, "answered_per_s")),
                num(dig(res, "latency", "p50_us") and dig(res, "latency", "p50_us") / 1e3, 2),
                num(dig(res, "latency", "p99_us") and dig(res, "latency", "p99_us") / 1e3, 2),
                num(dig(res, "latency", "p999_us") and dig(res, "latency", "p999_us") / 1e3, 1),
                num(dig(res, "latency", "max_us") and dig(res, "latency", "max_us") / 1e3, 0),
                show(spread(s.get("p99_us") for s in slices), 2, 1e-3),
                num(dig(res, "latency_from_send", "p99_us") and dig(res, "latency_from_send", "p99_us") / 1e3, 2),
                f"{late:,.0f}",
                num(dig(run, "server", "util") and dig(run, "server", "util") * 100, 1),
                show(spread(s.get("server_util") for s in slices), 1, 100),
                num(rss and rss / 1024, 0),
                num(dig(run, "server", "threads_max")),
                num(dig(res, "send_lag", "p99_us") and dig(res, "send_lag", "p99_us") / 1e3, 2),
                others(cell),
            ])
        lines += [f"### {connections:,} connections × {rate:g} message/s "
                  f"({connections * rate:,.0f} messages/s, {num(window)} s window)", ""]
        lines += table(["server", "answered/s", "p50 ms", "p99 ms", "p999 ms", "max ms",
                        "p99 ms per slice", "p99 ms from send", "late", "server CPU %", "CPU % per slice", "RSS MiB (max)",
                        "threads (max)", "loadgen send lag p99 ms", "others % CPU 0 / 1"], rows)
    return lines


def crosscheck_section(results: dict) -> list[str]:
    cells = cells_of(results, "crosscheck")
    if not cells:
        return []
    lines = ["## Cross-check: a second, independent client", "",
             "The same cells measured with `benchmarks/xcheck.py` (Python on `select.epoll`, no "
             "code shared with loadgen; it reads the server's CPU from `/proc` itself), "
             "alternating with loadgen on the same server processes, raw echo. *Agreement* is "
             "xcheck's CPU per round trip divided by loadgen's (medians). Where a client's own CPU "
             "use is near 1.0, that client was the limit on round trips per second.", ""]
    rows = []
    for server in dict.fromkeys(cell["server"] for cell in cells):
        by_client = {cell["client"]: cell for cell in cells if cell["server"] == server}
        base = measure(by_client.get("loadgen"), cpu_per_rt)
        for client in ("loadgen", "xcheck"):
            cell = by_client.get(client)
            if not cell:
                continue
            cpu = measure(cell, cpu_per_rt)
            util_path = ("loadgen_cpu", "util") if client == "loadgen" else ("client_cpu", "util")
            agreement = (f"{cpu.median / base.median:.2f}" if client == "xcheck" and cpu and base else "")
            rows.append([server, client + failures(cell), show(cpu, 2),
                         show(measure(cell, lambda r: dig(r, "results", "round_trips_per_s"))),
                         show(measure(cell, lambda r: dig(r, *util_path)), 2),
                         show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us"))),
                         agreement])
    n = cells[0].get("connections")
    lines[0] += f" (N={n}, 64 B)"
    lines += table(["server", "client", "server CPU µs/round trip", "round trips/s", "client CPU",
                    "p50 µs", "agreement"], rows)
    return lines


def memory_section(results: dict) -> list[str]:
    cells = cells_of(results, "hold")
    if not cells:
        return []
    lines = ["## Idle connections: memory", "",
             "N connections held idle after one round trip each (so the server has accepted and "
             "served every one); server RSS at the end of the hold minus before connecting, "
             "divided by N. One run per server, each on a fresh process.", ""]
    rows = []
    for cell in cells:
        run = cell["runs"][0]
        start, end = dig(run, "server", "rss_kib_start"), dig(run, "server", "rss_kib_end")
        per = (end - start) / cell["connections"] if start is not None and end is not None else None
        rows.append([f"{cell['connections']:,}", cell["server"] + failures(cell), num(per, 1),
                     num(dig(run, "results", "still_open")), num(dig(run, "server", "threads_end"))])
    lines += table(["N", "server", "KiB per connection", "held", "threads"], rows)
    return lines


def chat_memory_section(results: dict) -> list[str]:
    cells = cells_of(results, "hold-chat")
    if not cells:
        return []
    lines = ["## Idle chat members: memory", "",
             "connserver's chat app (`connserver serve chat`, a `LineHandler`) in thread mode and "
             "parked (`--park`): N members each send their nickname, so each joined the room and is "
             "a hub subscriber, receive the join notices of those after them, then stay idle (5 s). "
             "Server RSS at the end minus before connecting, divided by N; one run each, on a fresh "
             "process.", ""]
    rows = [[f"{cell['connections']:,}", cell["server"] + failures(cell),
             num(hold_per_conn(cell["runs"][0], cell["connections"]), 1),
             num(dig(cell["runs"][0], "results", "still_open")),
             num(dig(cell["runs"][0], "server", "threads_end"))] for cell in cells]
    return lines + table(["N", "server", "KiB per member", "held", "threads"], rows)


def hostile_section(results: dict) -> list[str]:
    cells = cells_of(results, "hostile")
    if not cells:
        return []
    first = cells[0]
    lines = ["## Hostile peers: an honest client among tricklers and non-readers", "",
             f"One honest connection does framed 64-byte round trips, alone and then with "
             f"{first['trickle']:,} trickling peers (a frame header, then one byte a second, never a "
             f"whole frame) and {first['stall']:,} non-reading peers (64 KiB frames until the server "
             "stops reading them, never reading a reply; smallest receive buffer) connected "
             "(`benchmarks/hostile.py`, on CPU 1 with the client). The attackers are up and the "
             "non-readers blocked before the client starts; the attack ends after the client's run, "
             "well inside the default 30 s read deadline. Per repeat both runs are back to back on "
             "the same process; *delta* is attacked p99 minus alone p99 of the same repeat. *Still "
             "open* is tricklers + non-readers connected at the end (median).", ""]
    rows = []
    for name in dict.fromkeys(cell["server"] for cell in cells):
        alone = find(results, "hostile", name, attacked=False)
        loud = find(results, "hostile", name, attacked=True)
        deltas = hostile_deltas(results, name)
        opened = [hostile_open(r) for r in (loud or {"runs": []})["runs"]]
        rows.append([
            name + failures(alone) + failures(loud),
            show(measure(alone, lambda r: dig(r, "results", "latency", "p50_us"))),
            show(measure(alone, lambda r: dig(r, "results", "latency", "p99_us"))),
            show(measure(loud, lambda r: dig(r, "results", "latency", "p50_us"))),
            show(measure(loud, lambda r: dig(r, "results", "latency", "p99_us"))),
            show(measure(loud, lambda r: dig(r, "results", "latency", "p999_us"))),
            show(measure(loud, lambda r: dig(r, "results", "latency", "max_us")), 0, 1e-3),
            ", ".join(num(d and d / 1e3, 2) for d in deltas),
            show(measure(loud, lambda r: dig(r, "results", "round_trips_per_s"))),
            ", ".join(opened),
        ])
    return lines + table(["server", "alone p50 µs", "alone p99 µs", "attacked p50 µs", "attacked p99 µs",
                          "attacked p999 µs", "attacked max ms", "p99 delta ms (each run)",
                          "attacked round trips/s", "still open (each run)"], rows)


def churn_section(results: dict) -> list[str]:
    cells = cells_of(results, "churn")
    lines = []
    if cells:
        base = measure(find(results, "churn", "connserver"), lambda r: per_op_us(r, ("results", "cycles")))
        rows = []
        for cell in cells:
            cpu = measure(cell, lambda r: per_op_us(r, ("results", "cycles")))
            rows.append([cell["server"] + failures(cell), show(cpu, 1),
                         "—" if cell["server"] == "connserver" else claim(base, cpu, "connserver", cell["server"]).text(),
                         show(measure(cell, lambda r: dig(r, "results", "cycles_per_s"))),
                         show(measure(cell, lambda r: dig(r, "results", "failed")))])
        lines += ["## Churn: connect, one round trip, close", "",
                  "32 cycles in flight, 16 source addresses, client closes first.", ""]
        lines += table(["server", "CPU µs/connection", "vs connserver", "connections/s", "failed"], rows)
    for cell in cells_of(results, "churn-growth"):
        run = cell["runs"][0]
        if run.get("ok"):
            lines += [f"{cell['server']} after {dig(run, 'results', 'cycles') or 0:,.0f} churn cycles "
                      f"(then settled): descriptor delta {run['fd_delta']}, RSS delta "
                      f"{run['rss_delta_bytes'] / 1048576:+.2f} MiB.", ""]
    return lines


def fanout_section(results: dict) -> list[str]:
    cells = cells_of(results, "fanout")
    if not cells:
        return []
    lines = ["## Fan-out: connserver's hub, 100 subscribers, 2,000 messages/s", ""]
    rows = [[str(cell["stalled"]) + failures(cell),
             show(measure(cell, lambda r: dig(r, "results", "delivered_per_s"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p99_us"))),
             show(measure(cell, lambda r: dig(r, "results", "lost")))] for cell in cells]
    lines += table(["stalled subscribers", "delivered/s", "latency p50 µs", "p99 µs", "lost"], rows)
    return lines


# ------------------------------------------------------ backplane (issue 15)

BACKPLANE_CASES = {"cross": "A → Redis → B", "local": "one relay, backplane on", "none": "one relay, no backplane"}


def backplane_cpu_per_delivery(run: dict) -> float | None:
    """CPU of every server-side process (the relays and redis-server) over the whole run, per
    delivery, in µs (whole run: the 101 connects and the settle before publishing are in it)."""
    cpu, delivered = (run.get("whole_run") or {}).get("cpu_s"), dig(run, "results", "delivered")
    if not isinstance(cpu, dict) or not delivered or sum(cpu.values()) < MIN_CPU_S:
        return None
    return sum(cpu.values()) / delivered * 1e6


def backplane_redis_share(run: dict) -> float | None:
    """redis-server's CPU over the whole run, as a share of one CPU."""
    cpu, wall = dig(run, "whole_run", "cpu_s", "redis"), dig(run, "whole_run", "wall_s")
    return cpu / wall if cpu is not None and wall else None


def backplane_books(cell: dict, side: str) -> str:
    """One relay's backplane counters, summed over the cell's runs: what it published, sent,
    dropped from its outbound queue, received, and counted lost (with the gaps they were in)."""
    total: dict[str, int] = {}
    for run in ok_runs(cell):
        for key, value in ((run.get("backplane") or {}).get(side) or {}).items():
            total[key] = total.get(key, 0) + value
    if not total:
        return "—"
    parts = [f"{total.get('published', 0):,} published, {total.get('sent', 0):,} sent"
             if total.get("published") else "",
             f"{total.get('outbound_dropped', 0):,} dropped" if total.get("published") else "",
             f"{total.get('received', 0):,} received, {total.get('lost', 0):,} lost in "
             f"{total.get('gaps', 0):,} gaps" if total.get("received") or total.get("lost") else ""]
    extra = [f"{total[key]:,} {key}" for key in ("unconfirmed", "duplicates", "disconnects") if total.get(key)]
    return ", ".join(part for part in parts + extra if part)


def backplane_section(results: dict) -> list[str]:
    cells = cells_of(results, "fanout-redis")
    if not cells:
        return []
    first = cells[0]
    most = next((c for c in cells if not c["rate"]), {}).get("messages")
    lines = ["## Fan-out across processes: the hub through Redis (issue 15)", "",
             f"`loadgen --mode fanout`: {first['subscribers']:,} subscribers and one publisher of "
             f"{first['size']}-byte messages on `servers.RELAY` with a Redis backplane "
             "(`benchmarks/backplane_fanout.py`). *A → Redis → B*: the publisher on relay A, the "
             "subscribers on relay B, every message published by A's hub to Redis and fanned out by "
             "B's; *backplane on*: publisher and subscribers on one relay whose hub also publishes "
             "to Redis (no other process reads it); *no backplane*: the `fanout` cell's relay. One "
             "redis-server (no persistence) on CPU 0 with the relays. Fixed rate: for the window; "
             f"*max*: {num(most)} messages sent as fast as the relay takes them, then drained, so "
             "delivered/s is the end-to-end throughput and the latency is mostly the wait behind "
             "the backlog. Latency is publish → receive at each subscriber. *lost*: messages a "
             "subscriber never got (loadgen's count). *CPU/delivery*: the relays' and Redis' CPU "
             "over the whole run (connects included) per delivery; *Redis CPU*: its share of one "
             "CPU over the run; *others %* leaves out the case's own relay A and Redis. The cases and "
             "rates alternate on the same processes.", ""]
    rows = [[BACKPLANE_CASES.get(cell["case"], cell["case"]) + failures(cell),
             f"{cell['rate']:,}/s" if cell["rate"] else "max",
             show(measure(cell, lambda r: dig(r, "results", "delivered_per_s"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us")), 2, 1e-3),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p99_us")), 2, 1e-3),
             show(measure(cell, lambda r: dig(r, "results", "lost"))),
             show(measure(cell, backplane_cpu_per_delivery), 2),
             show(measure(cell, backplane_redis_share), 1, 100),
             others(cell)] for cell in cells]
    lines += table(["case", "rate", "delivered/s", "p50 ms", "p99 ms", "lost", "CPU/delivery µs",
                    "Redis CPU %", "others % CPU 0 / 1"], rows)
    lines += ["The backplane's own books (`/stats` \"backplane\" of each relay, the change over each "
              "run, summed over the runs): what the publishing relay handed to Redis and dropped "
              "from its outbound queue, what the receiving relay got and counted lost.", ""]
    rows = [[BACKPLANE_CASES.get(cell["case"], cell["case"]), f"{cell['rate']:,}/s" if cell["rate"] else "max",
             backplane_books(cell, "publishing" if cell["case"] == "cross" else "relay"),
             backplane_books(cell, "receiving") if cell["case"] == "cross" else "—"]
            for cell in cells if cell["case"] != "none"]
    lines += table(["case", "rate", "publishing relay", "receiving relay"], rows)
    return lines


# ------------------------------------------------------------------- targets

def targets(results: dict) -> list[tuple[str, str, str]]:
    """Each target of the project, its measurement, and met / missed / inconclusive (mechanically)."""
    rows: list[tuple[str, str, str]] = []

    def echo_cpu(server: str, n: int) -> Spread | None:
        return measure(find(results, "echo", server, connections=n, size=64), cpu_per_rt)

    counts = sorted({c["connections"] for c in cells_of(results, "echo", size=64)})
    for n in counts:
        verdict = against(echo_cpu("connserver", n), echo_cpu("stdlib-threading", n), 1.0, at_least=True)
        rows.append((f"Echo N={n:,}: CPU per round trip no more than stdlib's (stdlib ÷ connserver ≥ 1)",
                     verdict.text(), verdict.word))
    for n in counts:
        if n == 1:
            continue
        verdict = against(echo_cpu("connserver", n), echo_cpu("asyncio-streams", n), 1.3, at_least=True)
        rows.append((f"Echo N={n:,}: ≥ 1.3× asyncio streams (their CPU per round trip ÷ connserver's)",
                     verdict.text(), verdict.word))
    for n in (10, 100):
        p99 = lambda server: measure(find(results, "echo", server, connections=n, size=64),  # noqa: E731
                                     lambda r: dig(r, "results", "latency", "p99_us"))
        verdict = against(p99("stdlib-threading"), p99("connserver"), 1.0, at_least=False)
        if verdict.median is not None:
            rows.append((f"Echo N={n}: p99 no worse than stdlib's (connserver ÷ stdlib ≤ 1)",
                         verdict.text(), verdict.word))
    for name in ("connserver", "connserver-fair", "connserver-parked"):
        cell = find(results, "echo", name, connections=1000, size=64)
        if not cell:
            continue
        runs = ok_runs(cell)
        starved = [dig(r, "results", "fairness", "starved") for r in runs]
        rows.append((f"Echo N=1,000 ({name}): no connection starved in the steady state",
                     "starved per run: " + ", ".join(num(s) for s in starved), every_run([s == 0 for s in starved])))
        fair = []
        for r in runs:
            jain, p50, p999 = (dig(r, "results", "fairness", "jain"), dig(r, "results", "latency", "p50_us"),
                               dig(r, "results", "latency", "p999_us"))
            fair.append((jain, p999 / p50 if p50 and p999 else None))
        rows.append((f"Echo N=1,000 ({name}): Jain ≥ 0.99 and p999 ≤ 10× p50",
                     "per run (Jain, p999/p50): " + ", ".join(f"{num(j, 3)}/{num(q, 1)}×" for j, q in fair),
                     every_run([j is not None and q is not None and j >= 0.99 and q <= 10 for j, q in fair])))
        probes = [dig(r, "results", "probe", "latency", "p50_us") for r in runs]
        if any(p is not None for p in probes):
            rows.append((f"Echo N=1,000 ({name}): a new connection is served within 100 ms (p50)",
                         "probe p50 per run, ms: " + ", ".join(num(p and p / 1e3, 1) for p in probes),
                         every_run([p is not None and p < 100_000 for p in probes])))
    hold = {c["server"]: c for c in cells_of(results, "hold")}
    for n in sorted({c["connections"] for c in hold.values()}):
        def per_conn(server: str) -> float | None:
            cell = find(results, "hold", server, connections=n)
            run = cell["runs"][0] if cell else {}
            start, end = dig(run, "server", "rss_kib_start"), dig(run, "server", "rss_kib_end")
            return (end - start) / n if start is not None and end is not None else None
        ours, theirs = per_conn("connserver"), per_conn("stdlib-threading")
        if ours is not None and theirs is not None:
            rows.append((f"Idle connection (N={n:,}): RSS no more than stdlib's (one run each)",
                         f"{ours:.1f} vs {theirs:.1f} KiB ({ours / theirs:.2f}×)",
                         "met" if ours <= theirs else "missed"))
        cell = find(results, "hold", "connserver", connections=n)
        if cell and n >= 10_000:
            held = dig(cell["runs"][0], "results", "still_open")
            rows.append((f"{n:,} concurrent connections held", f"{num(held)} held",
                         "met" if held == n else "missed"))
    churn = lambda server: measure(find(results, "churn", server),  # noqa: E731
                                   lambda r: per_op_us(r, ("results", "cycles")))
    verdict = against(churn("connserver"), churn("stdlib-threading"), 1.2, at_least=True)
    if verdict.median is not None:
        rows.append(("Churn: ≥ 1.2× stdlib (its CPU per connection ÷ connserver's)", verdict.text(), verdict.word))
    for cell in cells_of(results, "churn-growth"):
        run = cell["runs"][0]
        if run.get("ok"):
            ok = run["fd_delta"] == 0 and run["rss_delta_bytes"] < 2 * 1048576
            rows.append(("100,000 churn cycles: descriptor delta 0, RSS delta < 2 MiB",
                         f"{run['fd_delta']}, {run['rss_delta_bytes'] / 1048576:+.2f} MiB", "met" if ok else "missed"))
    fan = {c["stalled"]: measure(c, lambda r: dig(r, "results", "latency", "p99_us")) for c in cells_of(results, "fanout")}
    if 0 in fan and 1 in fan:
        verdict = against(fan[0], fan[1], 1.5, at_least=False)
        rows.append(("Fan-out: a stalled subscriber does not slow the others (p99 with ÷ without ≤ 1.5)",
                     verdict.text(), verdict.word))
    rows += issue13_targets(results)
    rows += issue14_targets(results)
    return rows


PARKED, THREAD = "connserver-parked", "connserver-framed"


def paced_slices(results: dict, server: str, key: str) -> Spread | None:
    cell = find(results, "paced", server, connections=10_000, rate=1.0)
    if not cell or not cell["runs"] or not cell["runs"][0].get("ok"):
        return None
    return spread(s.get(key) for s in cell["runs"][0]["results"].get("slices") or [])


def issue13_targets(results: dict) -> list[tuple[str, str, str]]:
    """Issue 13's targets, for the parked mode (and thread mode beside it where it says so)."""
    rows: list[tuple[str, str, str]] = []
    for kind, server, limit in (("hold", PARKED, 3.0), ("hold-chat", "chat-parked", 3.0)):
        for cell in cells_of(results, kind, server=server):
            per = hold_per_conn(cell["runs"][0], cell["connections"])
            held = dig(cell["runs"][0], "results", "still_open")
            what = "idle connection" if kind == "hold" else "idle chat member (hub subscriber)"
            rows.append((f"(issue 13) {server}: {what} ≤ {limit:g} KiB RSS (N={cell['connections']:,}, one run)",
                         f"{num(per, 2)} KiB ({num(held)} held)",
                         "no data" if per is None else "met" if per <= limit else "missed"))
    burst = lambda server: spread(dig(r, "results", "burst", "all_served_s")  # noqa: E731
                                  for r in (find(results, "burst", server, connections=10_000) or {"runs": []})["runs"])
    for server in (PARKED, "connserver"):
        verdict = against(burst("uvloop"), burst(server), 1.5, at_least=False)
        if verdict.median is not None:
            rows.append((f"(issue 13) Burst of 10,000 ({server}): all served within 1.5× uvloop's time",
                         verdict.text(), verdict.word))
    rate = lambda server, n: measure(find(results, "echo", server, connections=n, size=64),  # noqa: E731
                                     lambda r: dig(r, "results", "round_trips_per_s"))
    cpu = lambda server, n: measure(find(results, "echo", server, connections=n, size=64), cpu_per_rt)  # noqa: E731
    for peer, bound in (("asyncio-streams", 1.0), ("uvloop", 0.7)):
        verdict = against(rate(peer, 1000), rate(PARKED, 1000), bound, at_least=True)
        if verdict.median is not None:
            rows.append((f"(issue 13) Echo N=1,000 parked: round trips/s ≥ {bound:g}× {peer}'s",
                         verdict.text(), verdict.word))
    for label, verdict in (
            ("round trips/s ≥ 0.9× thread mode's (parked ÷ framed)", against(rate(THREAD, 10), rate(PARKED, 10), 0.9, True)),
            ("CPU per round trip: thread mode's ÷ parked ≥ 0.9", against(cpu(PARKED, 10), cpu(THREAD, 10), 0.9, True))):
        if verdict.median is not None:
            rows.append((f"(issue 13) Echo N=10 parked: {label}", verdict.text(), verdict.word))
    for server in (PARKED, "connserver"):
        slices = paced_slices(results, server, "p99_us")
        if slices is None:
            continue
        word = "inconclusive"
        if slices.count >= MIN_RUNS:
            word = "met" if slices.high <= 5000 else "missed" if slices.low > 5000 else "inconclusive"
        rows.append((f"(issue 13) 10,000 connections × 1 message/s ({server}): p99 ≤ 5 ms (every slice)",
                     f"per slice {show(slices, 2, 1e-3)} ms", word))
        theirs = paced_slices(results, "asyncio-streams", "server_util")
        if theirs is not None:
            verdict = against(theirs, paced_slices(results, server, "server_util"), 1.0, at_least=False)
            rows.append((f"(issue 13) … and server CPU ({server}) no more than asyncio streams' (per slice)",
                         verdict.text(), verdict.word))
    for server in (PARKED, THREAD):
        deltas = hostile_deltas(results, server)
        if deltas:
            cell = find(results, "hostile", server, attacked=True)
            rows.append((f"(issue 13) {cell['trickle']:,} tricklers + {cell['stall']:,} non-readers ({server}): "
                         "honest client's p99 delayed < 10 ms",
                         "p99 delta per run, ms: " + ", ".join(num(d and d / 1e3, 2) for d in deltas),
                         every_run([d is not None and d < 10_000 for d in deltas])))
    return rows


def parked_section(results: dict) -> list[str]:
    """connserver-parked beside connserver-framed (same handler, thread per connection), cell by cell."""
    if not find(results, "echo", PARKED, connections=10, size=64) and not cells_of(results, "hold", server=PARKED):
        return []
    lines = ["## Parked vs thread per connection", "",
             f"`{PARKED}` is `{THREAD}` with `Config(park=True)`: the same `FramedEchoHandler`, its "
             "connections parked in one epoll set between messages and served by a pool of "
             "threads. Ratios are parked ÷ thread mode, printed under the rule above (otherwise "
             "*inconclusive*); *better* says which way the ratio favours parked.", ""]
    rows = []

    def row(cell_name: str, measure_name: str, base: Spread | None, other: Spread | None,
            lower_is_better: bool, digits: int = 2, scale: float = 1.0) -> None:
        verdict = claim(base, other, THREAD, PARKED)
        better = "—"
        if verdict.ratio is not None:
            better = "parked" if (verdict.ratio < 1) == lower_is_better else "thread mode"
        rows.append([cell_name, measure_name, show(base, digits, scale), show(other, digits, scale),
                     verdict.text(), better])

    for n in sorted({c["connections"] for c in cells_of(results, "echo", server=PARKED)}):
        cells = [find(results, "echo", name, connections=n, size=64) for name in (THREAD, PARKED)]
        row(f"echo N={n:,}", "CPU µs/round trip", measure(cells[0], cpu_per_rt), measure(cells[1], cpu_per_rt), True)
        row(f"echo N={n:,}", "round trips/s", *(measure(c, lambda r: dig(r, "results", "round_trips_per_s"))
                                                for c in cells), False, 0)
        row(f"echo N={n:,}", "p99 µs", *(measure(c, lambda r: dig(r, "results", "latency", "p99_us"))
                                         for c in cells), True, 0)
        if n >= 1000:
            row(f"echo N={n:,}", "burst all served, s",
                *(measure(c, lambda r: dig(r, "results", "burst", "all_served_s")) for c in cells), True)
    for n in sorted({c["connections"] for c in cells_of(results, "burst", server=PARKED)}):
        row(f"burst N={n:,}", "all served, s",
            *(spread(dig(r, "results", "burst", "all_served_s") for r in (find(results, "burst", name, connections=n)
                                                                           or {"runs": []})["runs"])
              for name in (THREAD, PARKED)), True)
    for n, rate in sorted({(c["connections"], c["rate"]) for c in cells_of(results, "paced", server=PARKED)}):
        def sl(name: str, key: str) -> Spread | None:
            cell = find(results, "paced", name, connections=n, rate=rate)
            return spread(s.get(key) for s in (cell["runs"][0].get("results", {}).get("slices") or [])) if cell else None
        row(f"paced {n:,} × {rate:g}/s", "p99 ms (per slice)", sl(THREAD, "p99_us"), sl(PARKED, "p99_us"), True, 2, 1e-3)
        row(f"paced {n:,} × {rate:g}/s", "server CPU % (per slice)", sl(THREAD, "server_util"),
            sl(PARKED, "server_util"), True, 1, 100)
    for kind, names in (("hold", (THREAD, PARKED)), ("hold-chat", ("chat-thread", "chat-parked"))):
        values = []
        for name in names:
            cell = next(iter(cells_of(results, kind, server=name)), None)
            values.append(hold_per_conn(cell["runs"][0], cell["connections"]) if cell else None)
        if None not in values:
            rows.append([f"{'idle' if kind == 'hold' else 'idle chat member'} (one run)", "KiB per connection",
                         num(values[0], 1), num(values[1], 1), f"{values[1] / values[0]:.2f}× (one run each)",
                         "parked" if values[1] < values[0] else "thread mode"])
    alone = [measure(find(results, "hostile", name, attacked=True), lambda r: dig(r, "results", "latency", "p99_us"))
             for name in (THREAD, PARKED)]
    if None not in alone:
        row("hostile peers", "attacked p99 µs", *alone, True, 0)
    lines += table(["cell", "measure", THREAD, PARKED, "parked ÷ thread", "better"], rows)
    return lines


# --------------------------------------------------------------- WebSocket

WS_OURS = ("connserver-ws", "connserver-ws-parked")
WS_SYNC, WS_ASYNC = "websockets-sync", "websockets-asyncio"
WS_RELAYS = ("connserver-ws-relay", "connserver-ws-relay-parked")


def ws_echo_section(results: dict) -> list[str]:
    cells = cells_of(results, "ws-echo")
    if not cells:
        return []
    lines = ["## WebSocket echo", "",
             "`loadgen --websocket`: each connection upgrades (HTTP/1.1), then keeps one 64-byte "
             "binary message outstanding, masked as a client must; the echo must be the same payload "
             "in one binary frame. The same limits on every server: messages up to 1 MiB, no "
             "compression, keepalive pings off. `vs connserver-ws`: the server's CPU per round trip "
             "÷ connserver-ws's.", ""]
    for n in sorted({cell["connections"] for cell in cells}):
        row_cells = [cell for cell in cells if cell["connections"] == n]
        base = measure(next((c for c in row_cells if c["server"] == "connserver-ws"), None), cpu_per_rt)
        rows = []
        for cell in row_cells:
            cpu = measure(cell, cpu_per_rt)
            jain = measure(cell, lambda r: dig(r, "results", "fairness", "jain"))
            rows.append([
                cell["server"] + failures(cell), show(cpu, 2),
                "—" if cell["server"] == "connserver-ws" else claim(base, cpu, "connserver-ws", cell["server"]).text(),
                show(measure(cell, lambda r: dig(r, "results", "round_trips_per_s"))),
                show(measure(cell, lambda r: dig(r, "server", "util")), 2),
                show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us"))),
                show(measure(cell, lambda r: dig(r, "results", "latency", "p99_us"))),
                show(measure(cell, lambda r: dig(r, "results", "fairness", "starved"))),
                show(jain, 3) if jain else "—",
                show(measure(cell, lambda r: dig(r, "results", "burst", "all_served_s")), 3),
                show(measure(cell, lambda r: dig(r, "loadgen_cpu", "util")), 2),
                others(cell),
            ])
        lines += [f"### N={n:,}", ""]
        lines += table(["server", "CPU µs/round trip", "vs connserver-ws", "round trips/s", "server CPU",
                        "p50 µs", "p99 µs", "starved", "Jain", "upgrade + burst s", "loadgen CPU",
                        "others % CPU 0 / 1"], rows)
    return lines


def ws_state(results: dict) -> dict:
    cell = next(iter(cells_of(results, "ws-state")), None)
    return cell["runs"][0] if cell and cell["runs"] and cell["runs"][0].get("ok") else {}


def ws_memory_section(results: dict) -> list[str]:
    cells = cells_of(results, "ws-hold")
    if not cells:
        return []
    lines = ["## Idle WebSockets: memory", "",
             "N connections upgraded (each has had its 101 response) and held idle; server RSS at "
             "the end of the hold minus before connecting, divided by N; one run per server, each on "
             "a fresh process. `connserver-parked` is the reference: a parked framed echo connection "
             "(one round trip each), not a WebSocket. `websockets-sync` holds fewer: four descriptors "
             "per connection (socket, wake-up socketpair, its reader's epoll set) against the hard "
             "limit of 20,000.", ""]
    rows = [[f"{cell['connections']:,}", cell["server"] + failures(cell),
             "WebSocket" if cell.get("websocket") else "framed",
             num(hold_per_conn(cell["runs"][0], cell["connections"]), 2),
             num(dig(cell["runs"][0], "results", "still_open")),
             num(dig(cell["runs"][0], "server", "threads_end"))] for cell in cells]
    lines += table(["N", "server", "connection", "KiB per connection", "held", "threads"], rows)
    state = ws_state(results)
    if state:
        deflate = state.get("connserver_deflate_bytes")
        lines += [f"One connection's protocol state on the Python heap (`ws_state.py`, tracemalloc, "
                  f"after the upgrade and one message): wsproto's frame connection "
                  f"{state['wsproto_frames_bytes'] / 1024:.2f} KiB, connserver's whole "
                  f"`WebSocketProtocol` between messages (no wsproto state: the fast path's "
                  f"bookkeeping only) {state['connserver_protocol_bytes'] / 1024:.2f} KiB"
                  + ("." if deflate is None else
                     f"; with permessage-deflate negotiated and one compressed message each way "
                     f"(its two zlib contexts kept for the connection's life) "
                     f"{deflate / 1024:.2f} KiB, which an idle compressed connection adds to the "
                     f"figures above."), ""]
    return lines


def stalled_disconnects(cell: dict) -> str:
    """Per run: stalled subscribers the server had disconnected by the end (of those stalled)."""
    counts = [dig(run, "results", "stalled", "disconnected") for run in ok_runs(cell)]
    return ", ".join(num(c) for c in counts) if cell["stalled"] else "—"


def ws_fanout_section(results: dict) -> list[str]:
    cells = cells_of(results, "ws-fanout")
    if not cells:
        return []
    first = cells[0]
    lines = ["## WebSocket fan-out: a hub of WebSocket subscribers", "",
             f"`loadgen --mode fanout --websocket`: {first['subscribers']:,} subscribers and one publisher "
             "upgrade; the publisher sends a 64-byte sequence-numbered, timestamped message as one masked "
             f"text frame {first['rate']:,} times a second, and connserver's WebSocket relay "
             "(`servers.py`: a `WebSocketHandler` whose every upgraded connection is a hub subscriber) "
             "publishes each as one frame built by `message_frame()`, shared by every subscriber's "
             "queue. Stalled subscribers upgrade (they read their 101), then never read again, with a "
             "minimal receive buffer. Latency is publish → receive at the healthy subscribers, every "
             "byte checked. *stalled disconnected*: per run, how many of the stalled ones the server "
             "had disconnected by the end (the hub cuts one off once its kernel send buffer and its "
             "256 KiB queue are full: 0 says the window did not reach that). The (server, stalled) "
             "pairs alternate A B C … C B A.",
             ""]
    rows = [[cell["server"] + failures(cell), str(cell["stalled"]),
             show(measure(cell, lambda r: dig(r, "results", "delivered_per_s"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p50_us"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p99_us"))),
             show(measure(cell, lambda r: dig(r, "results", "latency", "p999_us"))),
             show(measure(cell, lambda r: dig(r, "results", "lost"))),
             stalled_disconnects(cell),
             show(measure(cell, lambda r: dig(r, "server", "util")), 2),
             show(measure(cell, lambda r: dig(r, "loadgen_cpu", "util")), 2),
             others(cell)] for cell in cells]
    lines += table(["server", "stalled", "delivered/s", "p50 µs", "p99 µs", "p999 µs", "lost",
                    "stalled disconnected", "server CPU", "loadgen CPU", "others % CPU 0 / 1"], rows)
    return lines


def ws_fanout_targets(results: dict) -> list[tuple[str, str, str]]:
    """Per connserver relay: the healthy subscribers' p99 with stalled subscribers ÷ without (≤ 1.5)."""
    rows: list[tuple[str, str, str]] = []
    for name in WS_RELAYS:
        p99 = {cell["stalled"]: measure(cell, lambda r: dig(r, "results", "latency", "p99_us"))
               for cell in cells_of(results, "ws-fanout", server=name)}
        if 0 not in p99:
            continue
        for stalled in sorted(k for k in p99 if k):
            verdict = against(p99[0], p99[stalled], 1.5, at_least=False)
            who = "a stalled subscriber does" if stalled == 1 else f"{stalled} stalled subscribers do"
            rows.append((f"(issue 14) WebSocket fan-out ({name}): {who} not change the others' delivery p99 "
                         "(with ÷ without ≤ 1.5)", verdict.text(), verdict.word))
    return rows


def issue14_targets(results: dict) -> list[tuple[str, str, str]]:
    """Issue 14's WebSocket targets: idle memory, echo throughput at N=100, fan-out past a stalled subscriber."""
    rows: list[tuple[str, str, str]] = []
    held = {cell["server"]: cell for cell in cells_of(results, "ws-hold")}

    def per_conn(server: str) -> float | None:
        cell = held.get(server)
        return hold_per_conn(cell["runs"][0], cell["connections"]) if cell and cell["runs"][0].get("ok") else None

    state, parked, framed = ws_state(results), per_conn("connserver-ws-parked"), per_conn("connserver-parked")
    if parked is not None and framed is not None and state:
        wsproto = state["wsproto_frames_bytes"] / 1024
        whole = state["connserver_protocol_bytes"] / 1024
        rows.append(("(issue 14) Idle WebSocket (connserver-ws-parked) ≤ a parked framed connection + "
                     "wsproto's state (one run each)",
                     f"{parked:.2f} KiB vs {framed:.2f} + {wsproto:.2f} = {framed + wsproto:.2f} KiB "
                     f"(with connserver's whole protocol object: {framed + whole:.2f} KiB)",
                     "met" if parked <= framed + wsproto else "missed"))
    sync = per_conn(WS_SYNC)
    for name in WS_OURS:
        ours = per_conn(name)
        if ours is not None and sync is not None and ours > 0:
            rows.append((f"(issue 14) Idle WebSocket ({name}): ≥ 10× less memory than websockets' sync "
                         "server (one run each)", f"{sync:.2f} vs {ours:.2f} KiB ({sync / ours:.1f}×)",
                         "met" if sync / ours >= 10 else "missed"))
    for name in WS_OURS:
        for peer in (WS_SYNC, WS_ASYNC):
            rate = lambda server: measure(find(results, "ws-echo", server, connections=100),  # noqa: E731
                                          lambda r: dig(r, "results", "round_trips_per_s"))
            verdict = against(rate(peer), rate(name), 1.0, at_least=True)
            if verdict.median is not None:
                rows.append((f"(issue 14) WebSocket echo N=100 ({name}): round trips/s ≥ 1.0× {peer}'s",
                             verdict.text(), verdict.word))
    return rows + ws_fanout_targets(results)


def targets_section(results: dict) -> list[str]:
    rows = [[target, measured, f"**{word}**" if word != "met" else word]
            for target, measured, word in targets(results)]
    return (["## Targets, judged mechanically", "",
             "A target on a ratio is *met* when every ratio the two ranges allow meets it, "
             "*missed* when none does, *inconclusive* otherwise; a per-run condition is met or "
             "missed when every run agrees. The reading is in {doc}`explanation/performance`.", ""]
            + table(["target", "measured", "verdict"], rows))


def render(results: dict, command: str) -> str:
    lines = header(results, command)
    for section in (targets_section, parked_section, echo_section, priming_section, burst_section, paced_section,
                    crosscheck_section, memory_section, chat_memory_section, hostile_section,
                    churn_section, fanout_section, backplane_section, ws_echo_section, ws_memory_section,
                    ws_fanout_section):
        lines += section(results)
    lines += ["Raw results, every run: `benchmarks/results/`.", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit("usage: render.py RESULTS.json OUT.md")
    results = json.loads(pathlib.Path(sys.argv[1]).read_text())
    pathlib.Path(sys.argv[2]).write_text(render(results, results.get("command", "python benchmarks/run.py")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
