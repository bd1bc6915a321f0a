"""``connserver soak``: hold a mix of ordinary and hostile clients against a running
server, watch its admin ``/stats``, and judge whether it leaks.

Three parts, run in this order by :func:`run_soak`:

1. **Load.** One driver thread runs every simulated client on one selector
   loop (:mod:`.driver`). The behaviours, each with a count or a rate:
   echo clients, idle holders, churners, slowloris drips, zero-window
   readers, oversized-frame senders and abrupt resets (docs/howto/soak.md
   says what each simulates).
2. **Watching.** The calling thread samples ``GET /stats`` every ``interval``
   (urllib, a timeout on every request, proxies ignored) before, during and
   after the load; after the load it keeps sampling for ``settle`` seconds, so
   it can see threads, fds and connections come back.
3. **Verdict.** :func:`judge` asks :mod:`.trend` whether memory is still
   growing: the load runs in identical cycles, each cycle's RSS is reduced to
   its median, and the steady cycles (after the warm-up) get a Theil-Sen trend
   and a Mann-Kendall test, so the answer is *no leak*, *leak* or
   *inconclusive* (too short to tell). It also compares threads (spare handler
   threads excepted), fds, connections and buffer leases at the end of the
   settle period with the baseline taken before the load.

Only loopback targets are accepted unless ``allow_remote`` is set: this tool
opens hundreds of hostile connections and should not be pointed at someone
else's server by a typo. What it shows (progress, JSON, HTML, the verdict text)
is in :mod:`.report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import socket
import sys
import time
from typing import Any, Callable

from .driver import BEHAVIOURS, Driver
from .plan import (SoakError, SoakPlan, parse_duration, plan_fields, resolve,
                   shortest_judged_duration, warmup_cycles)
from .trend import cycle_levels, judge_memory

__all__ = ["SoakPlan", "SoakError", "parse_duration", "judge", "run_soak", "add_soak_parser",
           "run_from_args", "warmup_cycles", "shortest_judged_duration", "BEHAVIOURS",
           "EXIT_PASS", "EXIT_FAIL", "EXIT_USAGE", "EXIT_INCONCLUSIVE"]

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3

_BASELINE_SAMPLES = 2           # the last one before the load is the baseline


class AdminClient:
    """``GET /stats`` from the admin endpoint, with a timeout, ignoring proxy settings."""

    def __init__(self, address: tuple[int, Any], timeout: float) -> None:
        family, sockaddr = address
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        self.url = f"http://{host}:{sockaddr[1]}/stats"
        self.timeout = timeout
        import urllib.request   # here: `connserver serve` need not load it

        # An http_proxy in the environment must not send loopback requests elsewhere.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stats(self) -> dict[str, Any]:
        """The /stats document; OSError (or ValueError for bad JSON) if it cannot be had."""
        import http.client

        try:
            with self._opener.open(self.url, timeout=self.timeout) as response:
                return json.loads(response.read())
        except http.client.HTTPException as exc:   # a garbled or cut response
            raise OSError(f"bad HTTP response: {exc!r}") from exc


def spare_threads(threads_by_role: dict[str, int]) -> int:
    """Threads waiting for work (``spare``, ``admin-spare``): expected to come and go."""
    return sum(n for role, n in threads_by_role.items() if role == "spare" or role.endswith("-spare"))


def sample_record(t: float, phase: str, stats: dict[str, Any]) -> dict[str, Any]:
    roles = dict(stats.get("threads_by_role", {}))
    return {
        "t": round(t, 3), "phase": phase, "rss_bytes": stats["rss_bytes"],
        "threads": stats["threads"], "threads_non_spare": stats["threads"] - spare_threads(roles),
        "threads_by_role": roles, "fds": stats["fds"],
        "connections_active": stats["connections_active"],
        "connections_total": stats.get("connections_total", 0),
        "pool_leased": stats.get("pool", {}).get("leased", 0),
        "stuck_threads": stats.get("stuck_threads", 0),
        "allocated_blocks": stats.get("allocated_blocks", -1),
        "close_reasons": dict(stats.get("close_reasons", {})),
    }


# --- the verdict ----------------------------------------------------------------------

def _check(name: str, passed: bool, summary: str, outcome: str | None = None,
           **values: Any) -> dict[str, Any]:
    outcome = outcome or ("pass" if passed else "fail")
    return {"name": name, "passed": bool(passed), "outcome": outcome, "summary": summary, **values}


def _memory_check(plan: SoakPlan, samples: list[dict[str, Any]],
                  phases: dict[str, float]) -> dict[str, Any]:
    """The ``rss`` check: :func:`.soak_trend.judge_memory` over the load's cycles."""
    points = [(s["t"], s["rss_bytes"] / 1024) for s in samples if s["phase"] == "load"]
    levels = cycle_levels(points, phases["load_start"], phases["load_end"], plan.cycle)
    trend = judge_memory(levels, cycle=plan.cycle, warmup_cycles=int(phases["warmup_cycles"]),
                         max_slope=plan.max_rss_slope, allowance=plan.rss_noise)
    outcome = {"no leak": "pass", "leak": "fail"}.get(trend.outcome, "inconclusive")
    steady = trend.steady
    if trend.slope is None:
        need = shortest_judged_duration(plan)
        summary = (f"{trend.outcome}, {trend.reason} (cycles of {plan.cycle:g} s): run "
                   f"--duration {need:g}s or more")
    else:
        summary = (f"{trend.outcome}, {trend.reason}: trend {trend.slope:+,.0f} KiB/min, later "
                   f"half {trend.late_slope:+,.0f} (limit {plan.max_rss_slope:,.0f}); "
                   f"{steady[0].kib / 1024:,.1f} -> {steady[-1].kib / 1024:,.1f} MiB over "
                   f"{len(steady)} steady cycles of {plan.cycle:g} s ({steady[0].start:.0f}-"
                   f"{steady[-1].end:.0f} s), up on the one before in {trend.cycles_grown} of "
                   f"{len(steady) - 1}, Mann-Kendall p = {trend.p_value:.2g}")
    return _check("rss", outcome == "pass", summary, outcome, **trend.as_dict())


def judge(plan: SoakPlan, samples: list[dict[str, Any]], phases: dict[str, float],
          driver: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The verdict: each check's outcome, with the numbers behind it.

    ``outcome`` is ``fail`` if any check failed, else ``inconclusive`` if the
    memory check could not decide, else ``pass``; ``passed`` is true only for
    ``pass``.
    """
    checks = [_memory_check(plan, samples, phases)]
    baseline = next((s for s in reversed(samples) if s["phase"] == "baseline"), None)
    final = next((s for s in reversed(samples) if s["phase"] == "settle"), None)
    if baseline is None or final is None:
        checks.append(_check("admin", False, "no /stats sample "
                             + ("before the load" if baseline is None else "after it")
                             + ": the server stopped answering?"))
        return _verdict(checks, {})

    base_roles, end_roles = baseline["threads_by_role"], final["threads_by_role"]
    grown = {role: end_roles.get(role, 0) - base_roles.get(role, 0)
             for role in set(base_roles) | set(end_roles)
             if role != "spare" and not role.endswith("-spare")}
    grown_text = ", ".join(f"{role} {delta:+d}" for role, delta in sorted(grown.items()) if delta)
    delta = final["threads_non_spare"] - baseline["threads_non_spare"]
    checks.append(_check(
        "threads", delta <= plan.thread_tolerance,
        f"{baseline['threads_non_spare']} -> {final['threads_non_spare']} non-spare threads "
        f"(tolerance +{plan.thread_tolerance}{'; ' + grown_text if grown_text else ''}); "
        f"{final['threads'] - final['threads_non_spare']} spare",
        baseline=baseline["threads_non_spare"], final=final["threads_non_spare"]))
    delta = final["fds"] - baseline["fds"]
    checks.append(_check("fds", delta <= plan.fd_tolerance,
                         f"{baseline['fds']} -> {final['fds']} (tolerance +{plan.fd_tolerance})",
                         baseline=baseline["fds"], final=final["fds"]))
    for name, key, noun in (("connections", "connections_active", "active connections"),
                            ("pool", "pool_leased", "pooled buffers leased"),
                            ("stuck", "stuck_threads", "stuck handler threads")):
        checks.append(_check(name, final[key] <= baseline[key],
                             f"{final[key]} {noun} at the end (baseline {baseline[key]})",
                             baseline=baseline[key], final=final[key]))
    reasons = {reason: final["close_reasons"].get(reason, 0) - baseline["close_reasons"].get(reason, 0)
               for reason in final["close_reasons"]}
    reasons = {reason: n for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]) if n}
    errors = reasons.get("error", 0)
    checks.append(_check("errors", errors <= plan.max_errors,
                         f"{errors} connections ended with reason 'error' (limit {plan.max_errors})",
                         value=errors))
    if plan.verify and (plan.echo_clients or plan.churn_rate):
        echo, churn = driver.get("echo", {}), driver.get("churn", {})
        trips = echo.get("round_trips", 0) + churn.get("round_trips", 0)
        bad = {what: echo.get(what, 0) + churn.get(what, 0) for what in ("mismatches", "timeouts")}
        checks.append(_check(
            "echo", trips > 0 and not any(bad.values()),
            f"{trips:,} round trips verified, {bad['mismatches']} mismatched, "
            f"{bad['timeouts']} timed out (over {plan.reply_timeout:g} s)", round_trips=trips, **bad))
    return _verdict(checks, reasons)


def _verdict(checks: list[dict[str, Any]], reasons: dict[str, int]) -> dict[str, Any]:
    outcomes = {check["outcome"] for check in checks}
    outcome = ("fail" if "fail" in outcomes
               else "inconclusive" if "inconclusive" in outcomes else "pass")
    return {"passed": outcome == "pass", "outcome": outcome, "checks": checks,
            "close_reasons": reasons}


# --- running it -----------------------------------------------------------------------

def _reachable(addresses: list[tuple[int, Any]], what: str, timeout: float) -> tuple[int, Any]:
    """The first address that accepts a connection (``localhost`` may be ::1 or 127.0.0.1)."""
    errors = []
    for family, sockaddr in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(timeout)
                probe.connect(sockaddr)
            return family, sockaddr
        except OSError as exc:
            errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
    raise SoakError(f"cannot connect to the {what}: {'; '.join(errors)}")


def run_soak(plan: SoakPlan, progress: Any = None) -> dict[str, Any]:
    """Run the soak; return the report document (samples, phases, driver counts, verdict).

    ``progress``, if given, has ``update(t, phase, sample, driver_counts)`` and ``close()``.
    A KeyboardInterrupt during the load ends it early; the settle and verdict still run.
    """
    seed = plan.seed if plan.seed is not None else random.SystemRandom().randrange(2 ** 32)
    target = _reachable(resolve(plan.target, "target", plan.allow_remote), "target", 5.0)
    admin_address = _reachable(resolve(plan.admin, "--admin", plan.allow_remote), "admin endpoint", 5.0)
    admin = AdminClient(admin_address, timeout=max(2.0, min(10.0, 5 * plan.interval)))
    samples: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    started_wall = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    driver: Driver | None = None

    def sample(phase: str) -> dict[str, Any] | None:
        asked = time.monotonic()
        try:
            stats = admin.stats()
        except (OSError, ValueError, KeyError) as exc:
            failures.append({"t": round(asked - t0, 3), "phase": phase, "error": str(exc)})
            return None
        record = sample_record((asked + time.monotonic()) / 2 - t0, phase, stats)
        samples.append(record)
        return record

    def sample_until(start: float, end: float, phase: str) -> None:
        assert driver is not None
        tick = start
        while True:
            record = sample(phase)
            if progress is not None:
                progress.update(time.monotonic() - t0, phase, record, driver.counts())
            if phase == "load" and driver.failure is not None:
                return
            tick += plan.interval
            now = time.monotonic()
            if tick < now:   # a slow sample: skip the ticks it overran
                tick += math.ceil((now - tick) / plan.interval) * plan.interval
            if tick > end + 0.001:   # the phase lasts its full length, then ends unsampled
                time.sleep(max(0.0, end - now))
                return
            time.sleep(tick - now)

    interrupted = False
    try:
        for index in range(_BASELINE_SAMPLES):
            if sample("baseline") is None and index == _BASELINE_SAMPLES - 1:
                raise SoakError(f"GET {admin.url} failed: {failures[-1]['error']}")
            if index < _BASELINE_SAMPLES - 1:
                time.sleep(plan.interval)
        driver = Driver(plan, target, seed)   # its sockets exist only from here
        load_start = time.monotonic()
        driver.start()
        try:
            sample_until(load_start, load_start + plan.duration, "load")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            driver.stop()
        load_end = time.monotonic()
        # At least one sample after the load, even with --settle 0.
        sample_until(load_end, load_end + plan.settle, "settle")
    finally:
        if progress is not None:
            progress.close()
    warmup = warmup_cycles(plan)
    phases = {"load_start": round(load_start - t0, 3),
              "steady_start": round(load_start - t0 + warmup * plan.cycle, 3),
              "load_end": round(load_end - t0, 3), "end": round(time.monotonic() - t0, 3),
              "cycle": plan.cycle, "warmup_cycles": warmup}
    counts = driver.counts()
    verdict = judge(plan, samples, phases, counts)
    if driver.failure is not None:
        verdict["checks"].append(_check("driver", False, f"the load driver failed: {driver.failure!r}"))
        verdict = _verdict(verdict["checks"], verdict["close_reasons"])
    plan_doc = dataclasses.asdict(plan)
    plan_doc["seed"] = seed
    return {"tool": "connserver soak", "format": 2, "started_at": started_wall.isoformat(),
            "interrupted": interrupted, "plan": plan_doc, "phases": phases, "samples": samples,
            "sample_failures": failures, "driver": counts, "verdict": verdict}


# --- the command line -----------------------------------------------------------------

def _duration_arg(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _number_arg(minimum: float, maximum: float | None, kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _text_arg(text: str) -> str:
    """Text with backslash escapes (``\\n``) decoded, as a shell cannot easily type them."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "duration": _duration_arg, "count": _number_arg(0, 100_000, int),
    "positive": _number_arg(1, None, int), "rate": _number_arg(0, 100_000, float),
    "fraction": _number_arg(0, 0.9, float), "number": _number_arg(0, None, float),
    "int": _number_arg(0, 2 ** 63, int), "text": _text_arg,
}
_GROUPS = {"run": "the run", "behaviours": "client behaviours (0 turns one off)",
           "verdict": "verdict thresholds"}


def add_soak_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``soak`` to the ``connserver`` subcommands; flags come from :class:`SoakPlan`."""
    parser = commands.add_parser(
        "soak", help="drive a mix of clients at a server and judge whether it leaks",
        description="Drive ordinary and hostile clients at a running server for --duration, "
                    "sample its admin /stats every --interval, keep sampling for --settle after "
                    "the load, then write a JSON report and an HTML chart and print a verdict: "
                    "is memory still growing cycle after cycle (leak, no leak, or inconclusive "
                    "when the run is too short to tell), are threads/fds/connections back to "
                    "baseline, which close reasons. Exit status 0 if it passes, 1 if it fails, "
                    "2 on a usage error, 3 if it is inconclusive.")
    parser.add_argument("target", metavar="HOST:PORT", help="the server to soak (loopback only "
                        "unless --allow-remote)")
    parser.add_argument("--admin", metavar="HOST:PORT", required=True,
                        help="its admin endpoint (connserver serve --admin)")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for field in plan_fields():
        meta, flag = field.metadata, "--" + field.name.replace("_", "-")
        default = {None: "random", True: "on", False: "off"}.get(field.default, field.default)
        if meta["kind"] == "duration":
            default = f"{field.default:g}s"
        help_text = f"{meta['help']} (default: {default})".replace("%", "%%")
        group = groups[meta["group"]]
        if meta["kind"] == "bool":
            group.add_argument(flag, dest=field.name, default=field.default, help=help_text,
                               action=argparse.BooleanOptionalAction if field.default else "store_true")
        elif meta["kind"].startswith("choice:"):
            group.add_argument(flag, dest=field.name, choices=meta["kind"][7:].split(","),
                               default=field.default, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=_ARG_TYPES[meta["kind"]],
                               default=field.default,
                               metavar=meta["metavar"] or ("DURATION" if meta["kind"] == "duration" else None),
                               help=help_text)
    output = parser.add_argument_group("output")
    output.add_argument("--report", metavar="FILE", default="soak.json",
                        help="JSON report: plan, every sample, driver counts, verdict "
                             "('none' to skip; default: soak.json)")
    output.add_argument("--html", metavar="FILE", default="soak.html",
                        help="self-contained HTML page with SVG charts ('none' to skip; "
                             "default: soak.html)")
    output.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                        help="live figures on stderr: a tqdm bar if installed (pip install "
                             "connserver[soak]), else one line per sample (default: auto)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """``connserver soak``: 0 if the verdict passes, 1 if it fails, 2 if it could not run, 3 if
    it is inconclusive (the run was too short to tell growth from settling)."""
    from . import report as soak_report

    try:
        plan = SoakPlan(target=args.target, admin=args.admin,
                        **{field.name: getattr(args, field.name) for field in plan_fields()})
        progress = soak_report.make_progress(
            args.progress, (_BASELINE_SAMPLES - 1) * plan.interval + plan.duration + plan.settle,
            sys.stderr)
        document = run_soak(plan, progress)
    except SoakError as exc:
        print(f"connserver soak: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("connserver soak: interrupted", file=sys.stderr)
        return 130
    written = []
    for path, write in ((args.report, soak_report.write_json), (args.html, soak_report.write_html)):
        if path and path.lower() != "none":
            write(document, path)
            written.append(path)
    print(soak_report.format_verdict(document, written))
    return {"pass": EXIT_PASS, "inconclusive": EXIT_INCONCLUSIVE}.get(document["verdict"]["outcome"],
                                                                     EXIT_FAIL)
