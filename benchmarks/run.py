"""The benchmark suite: connserver beside its alternatives, measured side by side.

    python benchmarks/run.py --quick            # under 3 minutes
    python benchmarks/run.py --full             # the committed results

Builds the C programs with the system ``cc``, pins every server to CPU 0 and
the load generator to CPU 1 (``taskset``), runs each cell ``--repeat`` times,
and writes the raw results (JSON) and ``docs/benchmarks.md`` (medians, spread,
ratios to stdlib's ThreadingTCPServer). Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from servers import C_SERVERS, HERE, PYTHON_SERVERS  # noqa: E402

ROOT = HERE.parent
LOADGEN = HERE / "loadgen"
FD_LIMIT = 40_000
ECHO_SERVERS = ["connserver", "stdlib-threading", "asyncio-streams", "asyncio-protocol", "c-epoll"]


def build() -> None:
    for source, binary in ((HERE / "loadgen.c", LOADGEN), (HERE / "epoll_echo.c", C_SERVERS["c-epoll"])):
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source), "-lm"],
                           check=True)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


class ServerProcess:
    """One server under test, pinned to CPU 0."""

    def __init__(self, name: str) -> None:
        if name in C_SERVERS:
            command = [str(C_SERVERS[name])]
        else:
            command = [sys.executable, "-c", PYTHON_SERVERS[name]]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.name = name
        self.proc = subprocess.Popen(["taskset", "-c", "0", *command], stdout=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=_raise_fd_limit)
        self.port = int(self.proc.stdout.readline())

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


def loadgen(port: int, mode: str, timeout: float, **options: object) -> dict:
    command = ["taskset", "-c", "1", str(LOADGEN), "--mode", mode, "--host", "127.0.0.1",
               "--port", str(port)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_raise_fd_limit)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen printed no result: {done.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def run_cell(server_name: str, mode: str, repeat: int, duration: float, **options: object) -> list[dict]:
    runs = []
    for _ in range(repeat):
        server = ServerProcess(server_name)
        try:
            time.sleep(0.2)   # let the server finish starting its threads before load
            result = loadgen(server.port, mode, timeout=duration + 60, duration=duration, **options)
            result["server_rss_bytes"] = server.rss_bytes()
            runs.append(result)
        finally:
            server.stop()
    return runs


def hold_cell(server_name: str, connections: int, duration: float) -> dict:
    """Idle memory per connection: server RSS while N connections are held, minus before."""
    server = ServerProcess(server_name)
    try:
        time.sleep(0.5)
        before = server.rss_bytes()
        proc = subprocess.Popen(["taskset", "-c", "1", str(LOADGEN), "--mode", "hold", "--host",
                                 "127.0.0.1", "--port", str(server.port), "--connections",
                                 str(connections), "--duration", str(duration)],
                                stdout=subprocess.PIPE, text=True, preexec_fn=_raise_fd_limit)
        time.sleep(duration * 0.8)
        during = server.rss_bytes()
        out, _ = proc.communicate(timeout=duration + 60)
        result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        result["rss_delta_per_connection_bytes"] = (during - before) / connections
        return result
    finally:
        server.stop()


def churn_growth_cell(server_name: str, cycles: int) -> dict:
    """Many short connections: fds and RSS of the server before and after, once settled."""
    server = ServerProcess(server_name)
    try:
        time.sleep(0.5)
        fds_before, rss_before = server.fd_count(), server.rss_bytes()
        result = loadgen(server.port, "churn", timeout=180, duration=120, warmup=0,
                         connections=32, size=64, max_cycles=cycles)
        deadline = time.monotonic() + 10
        while server.fd_count() > fds_before and time.monotonic() < deadline:
            time.sleep(0.1)   # the last connections are still being torn down
        result["fd_delta"] = server.fd_count() - fds_before
        result["rss_delta_bytes"] = server.rss_bytes() - rss_before
        return result
    finally:
        server.stop()


def median_spread(values: list[float]) -> str:
    if not values:
        return "—"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:,.0f}"
    return f"{middle:,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def probe_summary(runs: list[dict]) -> str:
    """Fresh connections among the busy ones: median p50, worst max, and how many were served."""
    p50s = field(runs, "results", "probe", "latency", "p50_us")
    if not field(runs, "results", "probe", "started"):
        return "—"
    served = sum(field(runs, "results", "probe", "completed"))
    started = sum(field(runs, "results", "probe", "started"))
    worst = max(field(runs, "results", "probe", "latency", "max_us"), default=None)
    if not p50s:
        return f"none of {started:.0f} served"
    return f"{statistics.median(p50s):,.0f} ({worst:,.0f}); {served:.0f}/{started:.0f} served"


def field(runs: list[dict], *path: str) -> list[float]:
    values = []
    for run in runs:
        value: object = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset, under 3 minutes (default)")
    mode.add_argument("--full", action="store_true", help="the whole matrix")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if not shutil.which("taskset") or not shutil.which("cc"):
        sys.exit("benchmarks need taskset (util-linux) and cc (gcc)")
    _raise_fd_limit()
    build()
    full = args.full
    repeat, duration = (3, 5.0) if full else (1, 2.0)
    counts = [1, 10, 100, 1000] if full else [10, 1000]
    sizes = [64, 4096] if full else [64]
    results: dict[str, object] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                  "mode": "full" if full else "quick", "cells": []}
    cells = results["cells"]
    started = time.monotonic()
    for size in sizes:
        for n in counts:
            # At N=1,000 also: run slots (Config.max_running) and a fresh connection every
            # 0.25 s among the busy ones (how long until it is served).
            busy = n >= 1000
            options = {"probe_interval": 0.25} if busy else {}
            for name in ECHO_SERVERS + (["connserver-fair"] if busy else []):
                runs = run_cell(name, "echo", repeat, duration, connections=n, size=size, warmup=0.5,
                                **options)
                cells.append({"kind": "echo", "server": name, "connections": n, "size": size,
                              "runs": runs})
                print(f"echo N={n} S={size} {name}: {median_spread(field(runs, 'results', 'round_trips_per_s'))}"
                      f" rt/s", file=sys.stderr)
    for name in ("connserver-framed", "c-epoll"):
        runs = run_cell(name, "framed", repeat, duration, connections=100, size=64, warmup=0.5)
        cells.append({"kind": "framed", "server": name, "connections": 100, "size": 64, "runs": runs})
    for name in ("connserver", "stdlib-threading", "asyncio-streams"):
        runs = run_cell(name, "churn", repeat, duration, connections=32, size=64)
        cells.append({"kind": "churn", "server": name, "runs": runs})
    if full:
        cells.append({"kind": "churn-growth", "server": "connserver", "cycles": 100_000,
                      "runs": [churn_growth_cell("connserver", 100_000)]})
    for n in ([1000, 10000] if full else [1000]):
        for name in ("connserver", "stdlib-threading", "asyncio-streams", "asyncio-protocol"):
            cells.append({"kind": "hold", "server": name, "connections": n,
                          "runs": [hold_cell(name, n, 6.0 if n > 1000 else 3.0)]})
    for stalled in (0, 1):
        runs = run_cell("connserver-relay", "fanout", repeat, duration, subscribers=100, size=64,
                        rate=2000, stalled=stalled)
        cells.append({"kind": "fanout", "server": "connserver-relay", "stalled": stalled, "runs": runs})
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "kernel": platform.release(), "platform": platform.platform()}
    results["commit"] = _commit()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    pathlib.Path(args.doc).write_text(render(results, " ".join(["python", "benchmarks/run.py"] + sys.argv[1:])))
    print(f"wrote {out} and {args.doc} in {results['seconds']} s", file=sys.stderr)
    return 0


def _commit() -> str:
    """The commit measured (with "+changes" if the tree was not clean), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def render(results: dict, command: str) -> str:
    cells = results["cells"]
    machine = results["machine"]
    lines = [
        "# Benchmarks", "",
        "<!-- Written by benchmarks/run.py; do not edit by hand. -->", "",
        f"Command: `{command}` ({results['mode']} mode, {results['seconds']} s), started "
        f"{results['started']}, commit `{results.get('commit', 'unknown')}`. "
        f"Machine: {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"Python {machine['python']}. Each server is pinned to CPU 0 and the C load generator "
        "(`benchmarks/loadgen.c`) to CPU 1; values are medians with the range of the repeats "
        "in parentheses. connserver runs with its protections on (default `Config`); "
        "`connserver-fair` is the same with `max_running=4` (FIFO run slots, "
        "docs/explanation/admission.md). How the results compare with the project's "
        "targets, and why some are missed: {doc}`explanation/performance`.", "",
        "## Echo: round trips per second", "",
    ]
    echo = [cell for cell in cells if cell["kind"] == "echo"]
    for size in sorted({cell["size"] for cell in echo}):
        lines += [f"### {size}-byte messages", "",
                  "| N | server | round trips/s | × stdlib | p50 µs | p99 µs | p999 µs | starved | Jain | first reply p99 µs | new connection p50 µs (max) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in sorted({cell["connections"] for cell in echo}):
            row_cells = [c for c in echo if c["size"] == size and c["connections"] == n]
            base = next((c for c in row_cells if c["server"] == "stdlib-threading"), None)
            base_rate = statistics.median(field(base["runs"], "results", "round_trips_per_s")) if base and field(base["runs"], "results", "round_trips_per_s") else None
            for cell in row_cells:
                rates = field(cell["runs"], "results", "round_trips_per_s")
                ratio = (f"{statistics.median(rates) / base_rate:.2f}×" if rates and base_rate else "—")
                lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    n, cell["server"], median_spread(rates), ratio,
                    median_spread(field(cell["runs"], "results", "latency", "p50_us")),
                    median_spread(field(cell["runs"], "results", "latency", "p99_us")),
                    median_spread(field(cell["runs"], "results", "latency", "p999_us")),
                    median_spread(field(cell["runs"], "results", "fairness", "starved")),
                    (f"{statistics.median(field(cell['runs'], 'results', 'fairness', 'jain')):.3f}"
                     if field(cell["runs"], "results", "fairness", "jain") else "—"),
                    median_spread(field(cell["runs"], "results", "first_request", "p99_us")),
                    probe_summary(cell["runs"])))
        lines.append("")
    lines += ["## Framed echo (N=100, 64 B)", "", "| server | round trips/s |", "|---|---|"]
    for cell in (c for c in cells if c["kind"] == "framed"):
        lines.append(f"| {cell['server']} | {median_spread(field(cell['runs'], 'results', 'round_trips_per_s'))} |")
    lines += ["", "## Churn: connect, one round trip, close", "", "| server | connections/s |", "|---|---|"]
    for cell in (c for c in cells if c["kind"] == "churn"):
        lines.append(f"| {cell['server']} | {median_spread(field(cell['runs'], 'results', 'cycles_per_s'))} |")
    for cell in (c for c in cells if c["kind"] == "churn-growth"):
        run = cell["runs"][0]
        lines += ["", f"{cell['server']} after {run['results'].get('cycles', cell['cycles']):,} churn "
                  f"cycles: fd delta {run['fd_delta']}, RSS delta "
                  f"{run['rss_delta_bytes'] / 1048576:+.2f} MiB."]
    lines += ["", "## Idle memory per connection (server RSS delta / N)", "",
              "| N | server | KiB per connection | held |", "|---|---|---|---|"]
    for cell in (c for c in cells if c["kind"] == "hold"):
        run = cell["runs"][0]
        lines.append(f"| {cell['connections']} | {cell['server']} | "
                     f"{run['rss_delta_per_connection_bytes'] / 1024:.1f} | {run.get('results', {}).get('still_open', '—')} |")
    lines += ["", "## Fan-out to 100 subscribers (2,000 messages/s)", "",
              "| stalled subscribers | delivered/s | latency p50 µs | p99 µs |", "|---|---|---|---|"]
    for cell in (c for c in cells if c["kind"] == "fanout"):
        lines.append(f"| {cell['stalled']} | {median_spread(field(cell['runs'], 'results', 'delivered_per_s'))} | "
                     f"{median_spread(field(cell['runs'], 'results', 'latency', 'p50_us'))} | "
                     f"{median_spread(field(cell['runs'], 'results', 'latency', 'p99_us'))} |")
    lines += ["", "Raw results: `benchmarks/results/`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
