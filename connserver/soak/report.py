"""What ``connserver soak`` shows: live progress, the JSON report, the HTML chart, the verdict.

Everything here works from the report document that :func:`connserver.soak.run_soak`
returns (plain dicts and lists), so the JSON file holds everything the chart
and the verdict text were drawn from. The HTML page is self-contained: inline
SVG written by hand, no script, no external file.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from typing import Any, Callable, Sequence, TextIO

__all__ = ["make_progress", "PlainProgress", "write_json", "write_html", "render_html",
           "format_verdict", "nice_ticks", "CLIENT_EVENTS"]

_MIB = 1024 * 1024
_MARKS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "??"}

# What each of the driver's per-behaviour counts means: shown on the HTML page
# (docs/howto/soak.md has the same table; a test keeps the two in step).
CLIENT_EVENTS = {
    "connected": "connections that completed the TCP handshake",
    "round_trips": "requests whose reply came back whole and equal to the request, byte for "
                   "byte (a churner makes one per visit)",
    "latency_us": "the SUM, in microseconds, of every echo client's round-trip time, from "
                  "sending a request to the last byte of its reply (churners are not timed): "
                  "a total, not one latency. Divided by the echo round trips it is the mean "
                  "round trip, shown as mean_rtt_ms",
    "mean_rtt_ms": "latency_us / round_trips of the echo clients, in milliseconds (computed "
                   "for display, not counted)",
    "bytes_received": "reply bytes the echo clients read",
    "requests": "requests sent with --no-verify (no reply awaited or checked)",
    "mismatches": "a reply that differed from its request, or a reply to nothing: not an "
                  "echo server, or data corrupted; the client reconnects",
    "timeouts": "a reply not complete within --reply-timeout; the client reconnects",
    "server_eof": "connections the server closed (a FIN)",
    "server_reset": "connections the server reset (an RST), or that failed on a write",
    "socket_error": "connections that failed with another socket error",
    "connect_failed": "connects refused, or no socket could be made (out of fds)",
    "skipped_at_cap": "clients not started because --max-client-connections sockets were open",
    "skipped_in_flight": "rate clients not started because too many of their kind were still "
                         "open: the server is slow to answer or close them",
    "drips": "bytes the slowloris clients sent, one per --drip-interval",
    "sent": "0xFFFFFFFF length prefixes the oversized-frame senders sent",
    "left_open": "oversized-frame senders the server had not closed after --oversized-wait, "
                 "which the soak then closed itself. Expected against a raw echo (it has no "
                 "frames and just echoes the four bytes back); against a framed server it means "
                 "the frame-size limit did not end the connection",
    "recycled": "zero-window readers the server had not closed within --zero-window-hold; "
                "the soak reset them and opened new ones",
    "resets_sent": "connections the soak reset on purpose (SO_LINGER 0) in mid-message",
}


# --- live progress ----------------------------------------------------------------------

def _figures(sample: dict[str, Any] | None, driver: dict[str, dict[str, int]]) -> str:
    if sample is None:
        figures = "/stats: no answer"
    else:
        figures = (f"rss {sample['rss_bytes'] / _MIB:.1f} MiB  threads {sample['threads_non_spare']}"
                   f"+{sample['threads'] - sample['threads_non_spare']} spare  fds {sample['fds']}  "
                   f"conns {sample['connections_active']}  leased {sample['pool_leased']}")
    echo = driver.get("echo", {}).get("round_trips", 0) + driver.get("churn", {}).get("round_trips", 0)
    bad = sum(driver.get(kind, {}).get(what, 0) for kind in ("echo", "churn")
              for what in ("mismatches", "timeouts"))
    closed = sum(driver.get(kind, {}).get(what, 0) for kind in driver
                 for what in ("server_eof", "server_reset"))
    return f"{figures}  | {echo:,} round trips ({bad} bad), {closed:,} closed by the server"


class PlainProgress:
    """One line per sample on ``stream``: works everywhere, including CI logs."""

    def __init__(self, total: float, stream: TextIO) -> None:
        self.total = total
        self.stream = stream

    def update(self, t: float, phase: str, sample: dict[str, Any] | None,
               driver: dict[str, dict[str, int]]) -> None:
        self.stream.write(f"soak {t:6.1f}s/{self.total:.0f}s {phase:<8} {_figures(sample, driver)}\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _TqdmProgress:
    """A tqdm bar over the whole run (load and settle), the figures as its postfix."""

    def __init__(self, tqdm: Callable[..., Any], total: float, stream: TextIO) -> None:
        self._bar = tqdm(total=round(total), unit="s", file=stream, dynamic_ncols=True,
                         bar_format="{desc} {bar} {n:.0f}/{total:.0f}s{postfix}")
        self._shown = 0.0

    def update(self, t: float, phase: str, sample: dict[str, Any] | None,
               driver: dict[str, dict[str, int]]) -> None:
        self._bar.set_description_str(f"soak {phase}", refresh=False)
        self._bar.set_postfix_str(_figures(sample, driver), refresh=False)
        step = min(t, self._bar.total) - self._shown
        self._shown += step
        self._bar.update(step)

    def close(self) -> None:
        self._bar.close()


class _NoProgress:
    def update(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, total: float, stream: TextIO) -> Any:
    """``auto``: a tqdm bar on a terminal if tqdm is installed, else plain lines."""
    if mode == "none":
        return _NoProgress()
    if mode in ("auto", "bar"):
        try:
            from tqdm import tqdm   # optional: pip install connserver[soak]
        except ImportError:
            tqdm = None
        if tqdm is not None and (mode == "bar" or stream.isatty()):
            return _TqdmProgress(tqdm, total, stream)
    return PlainProgress(total, stream)


# --- the JSON report ------------------------------------------------------------------

def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".soak-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(document: dict[str, Any], path: str) -> None:
    _write_atomically(path, json.dumps(document, indent=1, sort_keys=True) + "\n")


# --- the verdict as text --------------------------------------------------------------

def format_verdict(document: dict[str, Any], written: Sequence[str] = ()) -> str:
    plan, verdict, phases = document["plan"], document["verdict"], document["phases"]
    lines = [f"connserver soak {plan['target']}: {phases['load_end'] - phases['load_start']:.0f} s "
             f"of load, {phases['end'] - phases['load_end']:.0f} s settle, "
             f"{len(document['samples'])} samples"
             + (f" ({len(document['sample_failures'])} failed)" if document["sample_failures"] else "")
             + (" [load interrupted]" if document.get("interrupted") else "")]
    for check in verdict["checks"]:
        lines.append(f"  {_mark(check):<4}  {check['name']:<12} {check['summary']}")
    reasons = verdict.get("close_reasons") or {}
    lines.append("  close reasons: " + (", ".join(f"{reason} {n:,}" for reason, n in reasons.items())
                                        or "none"))
    lines.append("  clients: " + _driver_summary(document["driver"]))
    tail = f" (written: {', '.join(written)})" if written else ""
    lines.append(f"verdict: {_outcome(verdict).upper()}{tail}")
    return "\n".join(lines)


def _outcome(verdict: dict[str, Any]) -> str:
    return verdict.get("outcome") or ("pass" if verdict["passed"] else "fail")   # format 1 reports


def _mark(check: dict[str, Any]) -> str:
    return _MARKS[check.get("outcome") or ("pass" if check["passed"] else "fail")]


def client_events(kind: str, counts: dict[str, int], every: bool = False) -> dict[str, str]:
    """A behaviour's counts for display, with mean_rtt_ms (latency_us per round trip) added.

    The terminal line leaves out the two big totals, latency_us and bytes_received
    (``every`` keeps them, for the page that explains them).
    """
    shown = {event: f"{n:,}" for event, n in sorted(counts.items())
             if every or event not in ("latency_us", "bytes_received")}
    if kind == "echo" and counts.get("round_trips") and "latency_us" in counts:
        shown["mean_rtt_ms"] = f"{counts['latency_us'] / counts['round_trips'] / 1000:.2f}"
    return shown


def _driver_summary(driver: dict[str, dict[str, int]]) -> str:
    parts = []
    for kind, counts in driver.items():
        shown = client_events(kind, counts)
        if shown:
            parts.append(f"{kind} " + " ".join(f"{event}={value}" for event, value in shown.items()))
    return "; ".join(parts) or "none"


# --- the HTML page with SVG charts -----------------------------------------------------

_PHASE_COLOURS = {"baseline": "#eeeeee", "warm-up": "#fff3d6", "steady": "#e3efff", "settle": "#e2f4e2"}
_TREND_COLOURS = {"pass": "#1e7e34", "fail": "#c0392b", "inconclusive": "#e67e22"}
_WIDTH, _HEIGHT = 760, 230
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 18, 26, 34


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + 1
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.1f}"


Line = tuple[str, str, tuple[float, float], tuple[float, float]]   # label, colour, from, to


def svg_chart(title: str, unit: str, series: list[tuple[str, str, list[tuple[float, float]]]],
              phases: dict[str, float], *, zero_based: bool = True,
              extra_lines: Sequence[Line] = (), trend: Line | None = None,
              levels: Sequence[tuple[float, float, float]] = ()) -> str:
    """One line chart: series of (label, colour, [(t, value)]) over labelled phase bands.

    ``extra_lines`` (baselines) are drawn dashed under the series; ``levels``
    ((start, end, value) per load cycle) as short bars, and ``trend`` as a thick
    line with a white halo, both over the series, so a trend that runs right
    along the data stays visible.
    """
    points = [p for _, _, values in series for p in values]
    t_end = max([phases["end"], *(t for t, _ in points)] or [1.0])
    lines = [*extra_lines, *([trend] if trend else [])]
    values = ([v for _, v in points] + [p[1] for line in lines for p in line[2:]]
              + [v for _, _, v in levels])
    low = 0.0 if zero_based else min(values or [0.0])
    high = max(values or [1.0])
    if not zero_based:
        pad = max((high - low) * 0.1, abs(high) * 0.002, 1.0)
        low, high = (low - pad if low - pad > 0 or low < 0 else 0.0), high + pad
    y_ticks = nice_ticks(low, high)
    y_low, y_high = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + plot_w * t / t_end

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - (v - y_low) / ((y_high - y_low) or 1))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
             f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{_LEFT}" y="16" class="title">{html.escape(title)} ({html.escape(unit)})</text>']
    bands = [("baseline", 0.0, phases["load_start"]), ("warm-up", phases["load_start"], phases["steady_start"]),
             ("steady", phases["steady_start"], phases["load_end"]), ("settle", phases["load_end"], t_end)]
    for name, start, end in bands:
        end = min(end, t_end)
        if end > start:
            parts.append(f'<rect x="{x(start):.1f}" y="{_TOP}" width="{x(end) - x(start):.1f}" '
                         f'height="{plot_h}" fill="{_PHASE_COLOURS[name]}"><title>{name}</title></rect>')
    for tick in y_ticks:
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'class="grid"/><text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" class="ylabel">'
                     f'{_number(tick)}</text>')
    for name, start, end in bands:   # named on the chart, not only in the key above it
        end = min(end, t_end)
        if x(end) - x(start) >= 6.5 * len(name) + 8:
            parts.append(f'<text x="{x(start) + 4:.1f}" y="{_TOP + 12}" class="band">{name}</text>')
    for tick in nice_ticks(0, t_end, 8):
        if tick <= t_end:
            parts.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{_TOP + plot_h}" '
                         f'y2="{_TOP + plot_h + 4}" class="axis"/><text x="{x(tick):.1f}" '
                         f'y="{_TOP + plot_h + 17}" class="xlabel">{_number(tick)} s</text>')
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    legend = []
    for label, colour, (t1, v1), (t2, v2) in extra_lines:
        parts.append(f'<line x1="{x(t1):.1f}" y1="{y(v1):.1f}" x2="{x(t2):.1f}" y2="{y(v2):.1f}" '
                     f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4">'
                     f'<title>{html.escape(label)}</title></line>')
        legend.append((label, colour, ' stroke-dasharray="4 2"'))
    for label, colour, values in series:
        if values:
            coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in values)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.8"><title>{html.escape(label)}</title></polyline>')
        legend.append((label, colour, ""))
    if levels:
        for start, end, value in levels:
            parts.append(f'<line x1="{x(start) + 1:.1f}" x2="{x(end) - 1:.1f}" y1="{y(value):.1f}" '
                         f'y2="{y(value):.1f}" class="level"><title>cycle median '
                         f'{_number(value)} {html.escape(unit)}</title></line>')
        legend.append(("cycle medians", "#111111", ""))
    if trend is not None:
        label, colour, (t1, v1), (t2, v2) = trend
        coords = f'x1="{x(t1):.1f}" y1="{y(v1):.1f}" x2="{x(t2):.1f}" y2="{y(v2):.1f}"'
        parts.append(f'<line {coords} stroke="#ffffff" stroke-width="7" stroke-linecap="round"/>')
        parts.append(f'<line {coords} stroke="{colour}" stroke-width="3" stroke-linecap="round">'
                     f'<title>{html.escape(label)}</title></line>')
        legend.append((label, colour, ""))
    legend_x = float(_LEFT + plot_w)
    for label, colour, dash in reversed(legend):   # right-aligned, in the order given
        legend_x -= 6.5 * len(label) + 26
        parts.append(f'<line x1="{legend_x:.0f}" x2="{legend_x + 14:.0f}" y1="11" y2="11" '
                     f'stroke="{colour}" stroke-width="2.5"{dash}/><text x="{legend_x + 18:.0f}" '
                     f'y="15" class="legend">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _series(samples: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(s["t"], s[key] / scale) for s in samples]


def _memory_overlays(document: dict[str, Any]) -> tuple[Line | None, list[tuple[float, float, float]]]:
    """The memory trend (Theil-Sen, over the steady cycles) and the cycle medians, in MiB."""
    rss = next((c for c in document["verdict"]["checks"] if c["name"] == "rss"), {})
    levels = [(start, end, kib / 1024) for start, end, kib, _ in rss.get("levels", [])]
    slope, intercept = rss.get("slope_kib_per_min"), rss.get("trend_intercept_kib")
    steady = levels[rss.get("warmup_cycles", 0):]
    if slope is None or intercept is None or not steady:
        return None, levels
    t1, t2 = steady[0][0], steady[-1][1]
    per_s = slope / 60
    return ((f"trend {slope:+,.0f} KiB/min", _TREND_COLOURS.get(rss.get("outcome", ""), "#c0392b"),
             (t1, (intercept + per_s * t1) / 1024), (t2, (intercept + per_s * t2) / 1024)), levels)


def _charts(document: dict[str, Any]) -> list[str]:
    samples, phases = document["samples"], document["phases"]
    baseline = next((s for s in reversed(samples) if s["phase"] == "baseline"), None)
    trend, levels = _memory_overlays(document)

    def baseline_line(key: str) -> list[Line]:
        if baseline is None:
            return []
        value = baseline[key]
        return [(f"baseline {value}", "#7f8c8d", (0.0, value), (phases["end"], value))]

    return [
        svg_chart("Resident memory", "MiB", [("RSS", "#b39ddb", _series(samples, "rss_bytes", _MIB))],
                  phases, zero_based=False, trend=trend, levels=levels),
        svg_chart("Threads", "count", [("all", "#95a5a6", _series(samples, "threads")),
                                       ("non-spare", "#2c3e50", _series(samples, "threads_non_spare"))],
                  phases, extra_lines=baseline_line("threads_non_spare")),
        svg_chart("Open file descriptors", "count", [("fds", "#16a085", _series(samples, "fds"))],
                  phases, extra_lines=baseline_line("fds")),
        svg_chart("Active connections", "count",
                  [("connections", "#d35400", _series(samples, "connections_active"))], phases),
    ]


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 800px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.pass { color: #1e7e34; font-weight: bold; } .fail { color: #c0392b; font-weight: bold; }
svg { display: block; margin: 1em 0; } svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .title { font-weight: bold; font-size: 12px; } svg .ylabel { text-anchor: end; } svg .xlabel { text-anchor: middle; }
svg .grid { stroke: #fff; stroke-width: 1; } svg .axis { stroke: #666; }
svg .frame { fill: none; stroke: #999; } code { font-size: 12px; }
svg .band { fill: #777; font-size: 10px; } svg .level { stroke: #111; stroke-width: 2; }
.inconclusive { color: #b35900; font-weight: bold; } dt { font-weight: bold; margin-top: .4em; }
.key span { display: inline-block; padding: 0 .6em; margin-right: .4em; }
"""


def _memory_paragraph(document: dict[str, Any]) -> str:
    rss = next((c for c in document["verdict"]["checks"] if c["name"] == "rss"), {})
    if "levels" not in rss:   # a format 1 report
        return "<p>The RSS slope is fitted over the steady phase only.</p>"
    cycle, warmup, steady = rss["cycle_s"], rss["warmup_cycles"], rss["steady_cycles"]
    return f"""<p><b>How memory is judged.</b> The load ran in identical cycles of {cycle:g} s
(every cycle sends the same requests, client by client), so memory at the same point of
successive cycles can be compared. Each short black bar on the memory chart is one cycle's
level: the median of the RSS samples taken in it. The first {warmup} cycle{'s' if warmup != 1 else ''}
(shaded <i>warm-up</i>) are left out: threads start, pools and allocator arenas fill. Over the
{steady} steady cycle{'s' if steady != 1 else ''} the thick line is the Theil-Sen trend (the
median of the slopes between every pair of cycles, which outliers cannot move), green for no
leak, red for a leak, orange when the run cannot tell. A leak rises cycle after cycle to the end;
a healthy server levels off.</p>"""


def render_html(document: dict[str, Any]) -> str:
    plan, verdict, phases = document["plan"], document["verdict"], document["phases"]
    esc = html.escape
    status = _outcome(verdict)
    rows = "\n".join(f'<tr><td class="{c.get("outcome") or ("pass" if c["passed"] else "fail")}">'
                     f'{_mark(c)}</td><td>{esc(c["name"])}</td><td>{esc(c["summary"])}</td></tr>'
                     for c in verdict["checks"])
    reasons = "".join(f"<tr><td>{esc(reason)}</td><td>{n:,}</td></tr>"
                      for reason, n in (verdict.get("close_reasons") or {}).items()) or "<tr><td>none</td></tr>"
    shown = {kind: client_events(kind, counts, every=True)
             for kind, counts in document["driver"].items()}
    clients = "".join(f"<tr><td>{esc(kind)}</td><td>{esc(', '.join(f'{e} {v}' for e, v in events.items()))}"
                      f"</td></tr>" for kind, events in shown.items() if events)
    counted = {event for kind, counts in document["driver"].items() for event in counts}
    counted |= {event for events in shown.values() for event in events}
    glossary = "".join(f"<dt>{esc(event)}</dt><dd>{esc(meaning)}</dd>"
                       for event, meaning in CLIENT_EVENTS.items() if event in counted)
    settings = ", ".join(f"{key}={value}" for key, value in plan.items())
    key = "".join(f'<span style="background:{colour}">{name}</span>' for name, colour in _PHASE_COLOURS.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>connserver soak {esc(plan['target'])}: {status.upper()}</title>
<style>{_STYLE}</style></head>
<body>
<h1>connserver soak of {esc(plan['target'])}: <span class="{status}">{status.upper()}</span></h1>
<p>Started {esc(document['started_at'])}; {phases['load_end'] - phases['load_start']:.0f} s of load,
{phases['end'] - phases['load_end']:.0f} s settle, {len(document['samples'])} samples of
<code>/stats</code> from {esc(plan['admin'])}{' (load interrupted)' if document.get('interrupted') else ''}.</p>
<table>{rows}</table>
<p class="key">Phases: {key}</p>
{_memory_paragraph(document)}
{''.join(_charts(document))}
<h2>Close reasons counted during the soak</h2>
<table>{reasons}</table>
<h2>Clients</h2>
<p>What the soak's own clients saw, per behaviour.</p>
<table>{clients}</table>
<h3>What the counts mean</h3>
<dl>{glossary}</dl>
<h2>Settings</h2>
<p><code>{esc(settings)}</code></p>
</body></html>
"""


def write_html(document: dict[str, Any], path: str) -> None:
    _write_atomically(path, render_html(document))
