"""Did a change cost throughput, CPU or memory? Two servers, A B B A (issue 11).

A restructuring should cost nothing at run time, and a new serving mode
should be measured against the old one on the same app. This script measures
two checkouts of connserver (``--a DIR`` and ``--b DIR``, e.g. made with
``git archive COMMIT | tar -x -C DIR``), or one checkout given twice with
different server flags (``--a-flags`` / ``--b-flags``, e.g.
``--b-flags=--park``), side by side. Each side runs
``python -m connserver serve APP --bind 127.0.0.1:0 --max-connections 20000
FLAGS`` (``--app``, default ``echo``); ``--framed`` makes every loadgen
message a length-prefixed frame (loadgen ``--framed``, for ``framed-echo``),
``--websocket`` a masked binary WebSocket frame after an upgrade (loadgen
``--websocket``, for ``ws-echo``; the idle connections are upgraded, no greeting).
When A and B are the same tree, the report names each side by its flags.

- **echo**, N=10 and N=100 connections (``--connections``), 64 B requests:
  one server per side, both up for the whole echo part, the load alternating
  A B B A (``--repeats`` times, so 4 x repeats runs per cell and side). For
  each run: round trips per second in loadgen's window, and the server's CPU
  time per round trip -- utime + stime of the server process
  (``/proc/PID/stat``) read before and after the loadgen run, divided by every
  round trip of that run (warm-up and drain included). CPU per round trip is
  the headline: it holds still when the machine's other load moves
  throughput. Also recorded: the server's most threads during the window, and
  loadgen's fairness over the window -- connections with no round trip
  (starved; more than none means the warm-up was too short or a connection
  was left out) and Jain's index.
- **idle memory**: per run a fresh server; its RSS (``VmRSS``) and threads at
  rest, then with ``--idle-connections`` connections held idle (``loadgen
  --mode hold --hello x --wait-reply``: every connection has been served
  once, so its thread or parked state and its buffers exist); KiB per
  connection = delta / connections. Also A B B A, ``--repeats`` times.

Servers run on ``--server-cpu`` (0), loadgen on ``--client-cpu`` (1). Before
each block the script looks at those two CPUs for one second and for another
benchmark's processes (``benchmarks/run.py``, a ``loadgen``); while either CPU
is busier than ``--busy`` or such a process runs, it waits, re-checking every
10 s for at most ``--quiet-max`` (3 minutes), then goes on and says so. Each
run records whether another benchmark was running when it ended. Between runs the server
just measured must be at rest (its thread count and CPU time steady for half a
second). A cell is *within noise* when the two sides' ranges (min-max) overlap.

    python benchmarks/ab_compare.py --a /tmp/ab_A --b /tmp/ab_B \\
        --json /tmp/ab.json > /tmp/ab.md
    python benchmarks/ab_compare.py --a /tmp/src --b /tmp/src \\
        --app framed-echo --framed --b-flags=--park > /tmp/park.md
    python benchmarks/ab_compare.py --a /tmp/ab_A --b /tmp/ab_B \\
        --app ws-echo --websocket --connections 10 100 1000 > /tmp/ws.md

Standard library only (plus ``cc`` to build ``benchmarks/loadgen.c`` when
``--loadgen`` is not given); loopback only; every wait is bounded and every
server is killed at the end whatever happens. Prints the report (Markdown) on
stdout, progress on stderr. Exit status 0 when every run completed, 1 when a
run failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0     # server start until its "accepting on" line
STOP_TIMEOUT = 10.0      # SIGTERM until SIGKILL
SETTLE_TIMEOUT = 15.0    # a server back at rest after a run
QUIET_POLL = 10.0        # re-check a busy machine this often (see --quiet-max)
ACCEPTING = re.compile(r"accepting on 127\.0\.0\.1:(\d+)")
HOLD_READY = "hold: ready"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- /proc readers ------------------------------------------------------------

def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all its threads, live and dead)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])   # fields 14 and 15 of proc(5)


def status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise LookupError(name)


def cpu_busy(cpus: tuple[int, ...], interval: float = 1.0) -> dict[int, float]:
    """Busy fraction of each CPU over `interval` seconds (/proc/stat)."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                m = re.match(r"cpu(\d+) (.*)", line)
                if m and int(m.group(1)) in cpus:
                    v = [int(x) for x in m.group(2).split()]
                    idle = v[3] + v[4]             # idle + iowait
                    out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
        return out
    a = sample()
    time.sleep(interval)
    b = sample()
    return {c: round((b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]), 3) for c in cpus}


def top_processes(exclude: set[int], count: int = 5) -> list[str]:
    """The busiest other processes right now (ps), to say what the noise was."""
    out = subprocess.run(["ps", "-eo", "pid,psr,pcpu,comm,args", "--sort=-pcpu", "--no-headers"],
                         capture_output=True, text=True, timeout=10).stdout.splitlines()
    rows = [r for r in out if int(r.split()[0]) not in exclude]
    return [r[:160] for r in rows[:count]]


def other_benchmarks(exclude: set[int]) -> list[str]:
    """Running processes of someone else's benchmark (run.py, loadgen)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in exclude or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "benchmarks/run.py" in args or ("loadgen" in args and "--mode" in args):
            found.append(f"{pid} {args[:120]}")
    return found


# -- servers ------------------------------------------------------------------

@dataclass
class Server:
    """One `python -m connserver serve APP FLAGS` importing connserver from `source`."""

    label: str
    source: str
    python: str
    cpu: int
    logdir: str
    app: str = "echo"
    flags: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    port: int = 0
    errfile: str = ""

    def start(self) -> None:
        self.errfile = os.path.join(self.logdir, f"server-{self.label}-{time.monotonic_ns()}.err")
        env = dict(os.environ, PYTHONPATH=self.source, PYTHONDONTWRITEBYTECODE="1")
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(self.cpu), self.python, "-m", "connserver", "serve", self.app,
                 "--bind", f"{HOST}:0", "--max-connections", "20000", *self.flags],
                cwd=self.source, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(self.errfile) as f:
                m = ACCEPTING.search(f.read())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label} exited {self.proc.returncode}; see {self.errfile}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"server {self.label}: no 'accepting on' line in {START_TIMEOUT} s")
        with open(f"/proc/{self.pid}/environ", "rb") as f:   # the right tree, not an installed copy
            if f"PYTHONPATH={self.source}".encode() not in f.read().split(b"\0"):
                raise RuntimeError(f"server {self.label}: PYTHONPATH is not {self.source}")
        self.settle()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def settle(self) -> float:
        """Wait until thread count and CPU time hold still for 0.5 s; return the wait."""
        t0 = time.monotonic()
        deadline = t0 + SETTLE_TIMEOUT
        last = (status_field(self.pid, "Threads"), cpu_ticks(self.pid))
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = (status_field(self.pid, "Threads"), cpu_ticks(self.pid))
            if now[0] == last[0] and now[1] - last[1] <= 1:
                return round(time.monotonic() - t0, 2)
            last = now
        log(f"server {self.label}: not at rest after {SETTLE_TIMEOUT} s; going on")
        return round(time.monotonic() - t0, 2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


# -- runs ---------------------------------------------------------------------

@dataclass
class Bench:
    loadgen: str
    client_cpu: int
    server_cpu: int
    busy: float
    quiet_max: float
    framed: bool = False
    websocket: bool = False
    notes: list[dict] = field(default_factory=list)

    def loadgen_cmd(self, *args: str) -> list[str]:
        framed = ["--framed"] if self.framed else ["--websocket"] if self.websocket else []
        return ["taskset", "-c", str(self.client_cpu), self.loadgen, "--host", HOST, *framed, *args]

    def wait_quiet(self, block: str, ours: set[int]) -> dict:
        """Before a block: wait (bounded) while someone else keeps our CPUs busy."""
        waited = 0.0
        while True:
            busy = cpu_busy((self.server_cpu, self.client_cpu))
            note = {"block": block, "time": time.strftime("%H:%M:%S"),
                    "loadavg": open("/proc/loadavg").read().split()[:3],
                    "cpu_busy": busy, "waited_s": waited,
                    "other_benchmarks": other_benchmarks(ours),
                    "top": top_processes(ours)}
            quiet = max(busy.values()) <= self.busy and not note["other_benchmarks"]
            if quiet or waited >= self.quiet_max:
                note["went_on_busy"] = not quiet
                log(f"{block}: cpu busy {busy}, load {note['loadavg']}, waited {waited:.0f} s"
                    + (f", other benchmarks: {note['other_benchmarks']}" if note["other_benchmarks"] else ""))
                self.notes.append(note)
                return note
            log(f"{block}: cpu busy {busy} (others: {note['other_benchmarks'] or note['top'][:2]}); waiting")
            time.sleep(QUIET_POLL)
            waited += QUIET_POLL + 1.0

    def echo(self, server: Server, connections: int, warmup: float, duration: float) -> dict:
        before = cpu_ticks(server.pid)
        out = subprocess.run(
            self.loadgen_cmd("--mode", "echo", "--port", str(server.port),
                             "--connections", str(connections), "--size", "64",
                             "--warmup", str(warmup), "--duration", str(duration),
                             "--server-pid", str(server.pid)),
            capture_output=True, text=True, timeout=warmup + duration + 60)
        after = cpu_ticks(server.pid)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        if not run["ok"]:
            raise RuntimeError(f"loadgen failed against {server.label}: {run['error']}")
        res = run["results"]
        cpu_s = (after - before) / CLK_TCK
        return {
            "build": server.label, "connections": connections,
            "round_trips_per_s": res["round_trips_per_s"],
            "cpu_us_per_rt": cpu_s / res["total_round_trips"] * 1e6,
            "server_cpu_s": cpu_s, "total_round_trips": res["total_round_trips"],
            "window_cpu_us_per_rt": run["server"]["cpu_s"] / res["round_trips"] * 1e6,
            "p99_us": res["latency"]["p99_us"], "jain": res["fairness"]["jain"],
            "starved": res["fairness"]["starved"], "never_served": res["fairness"]["never_served"],
            "threads_max": run["server"]["threads_max"],
            "loadgen_util": run["loadgen_cpu"]["util"], "server_util": run["server"]["util"],
            "settle_s": server.settle(),
            "others_running": bool(other_benchmarks({server.pid})),
        }

    def idle(self, server: Server, connections: int, hold: float) -> dict:
        """A fresh server's RSS at rest and with `connections` idle ones (each served once)."""
        rss0 = status_field(server.pid, "VmRSS")
        threads0 = status_field(server.pid, "Threads")
        proc = subprocess.Popen(
            self.loadgen_cmd("--mode", "hold", "--port", str(server.port),
                             "--connections", str(connections),
                             *([] if self.websocket else ["--hello", "x"]), "--wait-reply",
                             "--duration", str(hold), "--connect-timeout", "30",
                             "--server-pid", str(server.pid)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        err_lines: list[str] = []

        def read_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err_lines.append(line)
                if HOLD_READY in line:
                    ready.set()

        reader = threading.Thread(target=read_err, name="loadgen-stderr", daemon=True)
        reader.start()
        try:
            if not ready.wait(60):
                raise RuntimeError(f"hold never ready against {server.label}: {''.join(err_lines)[-400:]}")
            # every connection has had its echo, so its thread exists; let RSS stop moving
            deadline = time.monotonic() + min(2.0, hold / 2)
            rss = status_field(server.pid, "VmRSS")
            while time.monotonic() < deadline:
                time.sleep(0.2)
                now = status_field(server.pid, "VmRSS")
                if now == rss:
                    break
                rss = now
            threads = status_field(server.pid, "Threads")
            proc.wait(hold + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            reader.join(10)    # ends at loadgen's EOF on stderr
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.stdout.close()
        if proc.stderr is not None and not reader.is_alive():
            proc.stderr.close()
        run = json.loads(stdout.strip().splitlines()[-1])
        if not run["ok"] or run["results"]["served"] != connections:
            raise RuntimeError(f"hold against {server.label}: {run['error'] or run['results']}")
        return {"build": server.label, "connections": connections,
                "rss_kib_before": rss0, "rss_kib_held": rss, "threads_before": threads0,
                "threads_held": threads, "kib_per_conn": (rss - rss0) / connections}


# -- report -------------------------------------------------------------------

def summary(runs: list[dict], key: str, a: str, b: str, lower_is_better: bool) -> dict:
    va = [r[key] for r in runs if r["build"] == a]
    vb = [r[key] for r in runs if r["build"] == b]
    ma, mb = statistics.median(va), statistics.median(vb)
    overlap = min(va) <= max(vb) and min(vb) <= max(va)
    if overlap:
        verdict = "within noise"
    else:
        b_better = (mb < ma) == lower_is_better
        verdict = "B better (ranges apart)" if b_better else "B worse (ranges apart)"
    return {"a": (ma, min(va), max(va)), "b": (mb, min(vb), max(vb)),
            "ratio": mb / ma if ma else None, "verdict": verdict, "n": (len(va), len(vb))}


def markdown(cells: list[tuple[str, str, int, dict]], names: dict[str, str]) -> str:
    """The table; `names` heads the A and B columns (e.g. "A", or "A: `--park`")."""
    lines = [f"| cell | metric | {names['A']} median (min–max) | {names['B']} median (min–max) | B/A | |",
             "|---|---|---|---|---|---|"]
    for cell, metric, digits, s in cells:
        def fmt(t: tuple[float, float, float]) -> str:
            return f"{t[0]:,.{digits}f} ({t[1]:,.{digits}f}–{t[2]:,.{digits}f})"
        ratio = f"{s['ratio']:.3f}" if s["ratio"] is not None else "–"
        lines.append(f"| {cell} | {metric} | {fmt(s['a'])} | {fmt(s['b'])} | "
                     f"{ratio} | {s['verdict']} |")
    return "\n".join(lines)


def side_names(src: dict[str, str], flags: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Column names: the flags when both sides run one tree, else just A and B."""
    if src["A"] != src["B"]:
        return {"A": "A", "B": "B"}
    return {label: f"{label}: `{shlex.join(f)}`" if f else f"{label}: no extra flags"
            for label, f in flags.items()}


def build_loadgen(dest: str) -> str:
    exe = os.path.join(dest, "loadgen")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "loadgen.c"), "-lm"],
                   check=True, timeout=120)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="source tree A (holds connserver/)")
    p.add_argument("--b", required=True, help="source tree B")
    p.add_argument("--python", default=sys.executable, help="interpreter for both servers")
    p.add_argument("--app", default="echo", help="the `connserver serve` app (default echo)")
    p.add_argument("--a-flags", default="", metavar="FLAGS",
                   help="extra server flags for A, one shell-quoted string (--a-flags=--park)")
    p.add_argument("--b-flags", default="", metavar="FLAGS",
                   help="extra server flags for B (--b-flags='--park --park-threads 4')")
    p.add_argument("--framed", action="store_true",
                   help="loadgen sends length-prefixed frames (loadgen --framed; for framed-echo)")
    p.add_argument("--websocket", action="store_true",
                   help="loadgen upgrades and sends WebSocket frames (loadgen --websocket; for ws-echo)")
    p.add_argument("--loadgen", help="a built loadgen (default: build benchmarks/loadgen.c)")
    p.add_argument("--repeats", type=int, default=3, help="A B B A rounds per cell (default 3)")
    p.add_argument("--duration", type=float, default=3.0, help="echo window, s (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="echo warm-up, s (default 1)")
    p.add_argument("--connections", type=int, nargs="+", default=[10, 100],
                   help="echo cells (default 10 100)")
    p.add_argument("--idle-connections", type=int, default=2000, help="idle cell (default 2000)")
    p.add_argument("--hold", type=float, default=4.0, help="idle hold, s (default 4)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--busy", type=float, default=0.25,
                   help="a CPU busier than this fraction means someone else is measuring")
    p.add_argument("--quiet-max", type=float, default=180.0,
                   help="wait at most this long (s) for a quiet machine before each block (default 180)")
    p.add_argument("--skip-idle", action="store_true", help="measure echo only")
    p.add_argument("--json", help="write every run and the summary here")
    args = p.parse_args(argv)
    for d in (args.a, args.b):
        if not os.path.isfile(os.path.join(d, "connserver", "__init__.py")):
            p.error(f"{d}: no connserver/ package")
    if args.repeats < 1 or args.idle_connections < 1:
        p.error("--repeats and --idle-connections must be at least 1")
    try:
        flags = {"A": tuple(shlex.split(args.a_flags)), "B": tuple(shlex.split(args.b_flags))}
    except ValueError as e:
        p.error(f"--a-flags / --b-flags: {e}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # children inherit it
    tmp = tempfile.mkdtemp(prefix="ab_compare-")
    loadgen = args.loadgen or build_loadgen(tmp)
    if args.framed and args.websocket:
        p.error("--framed and --websocket exclude each other")
    bench = Bench(loadgen, args.client_cpu, args.server_cpu, args.busy, args.quiet_max, args.framed,
                  args.websocket)
    order = ["A", "B", "B", "A"]
    src = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    names = side_names(src, flags)
    servers: list[Server] = []
    echo_runs: list[dict] = []
    idle_runs: list[dict] = []
    failed = False

    def new_server(label: str) -> Server:
        s = Server(label, src[label], args.python, args.server_cpu, tmp, args.app, flags[label])
        servers.append(s)
        s.start()
        return s

    try:
        pair = {label: new_server(label) for label in ("A", "B")}
        ours = {s.pid for s in servers}
        for n in args.connections:
            bench.wait_quiet(f"echo N={n}", ours)
            for label in ("A", "B"):     # not counted: both trees start their threads
                bench.echo(pair[label], n, 0.5, 1.0)
            for rep in range(args.repeats):
                for label in order:
                    r = bench.echo(pair[label], n, args.warmup, args.duration)
                    r["round"] = rep
                    echo_runs.append(r)
                    log(f"echo N={n} {label}: {r['round_trips_per_s']:,.0f} rt/s, "
                        f"{r['cpu_us_per_rt']:.2f} µs CPU/rt (window {r['window_cpu_us_per_rt']:.2f}), "
                        f"loadgen util {r['loadgen_util']}, starved {r['starved']}, "
                        f"jain {r['jain']}, threads {r['threads_max']}")
        for s in pair.values():
            s.stop()
        if not args.skip_idle:
            bench.wait_quiet(f"idle {args.idle_connections}", ours)
        for rep in range(0 if args.skip_idle else args.repeats):
            for label in order:
                s = new_server(label)
                try:
                    r = bench.idle(s, args.idle_connections, args.hold)
                finally:
                    s.stop()
                r["round"] = rep
                idle_runs.append(r)
                log(f"idle {label}: {r['rss_kib_before']} -> {r['rss_kib_held']} KiB, "
                    f"{r['kib_per_conn']:.2f} KiB/conn, threads {r['threads_held']}")
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as e:
        log(f"failed: {e}")
        failed = True
    finally:
        for s in servers:
            s.stop()

    cells: list[tuple[str, str, int, dict]] = []
    echo_cell = "framed echo" if args.framed else "WebSocket echo" if args.websocket else "echo"
    for n in args.connections:
        runs = [r for r in echo_runs if r["connections"] == n]
        if runs:
            cell = f"{echo_cell} N={n}, 64 B"
            cells.append((cell, "server CPU µs / round trip", 2,
                          summary(runs, "cpu_us_per_rt", "A", "B", lower_is_better=True)))
            cells.append((cell, "round trips/s", 0,
                          summary(runs, "round_trips_per_s", "A", "B", lower_is_better=False)))
            cells.append((cell, "starved connections", 0,
                          summary(runs, "starved", "A", "B", lower_is_better=True)))
            cells.append((cell, "Jain fairness", 3,
                          summary(runs, "jain", "A", "B", lower_is_better=False)))
            cells.append((cell, "server threads", 0,
                          summary(runs, "threads_max", "A", "B", lower_is_better=True)))
    if idle_runs:
        cell = f"idle, {args.idle_connections:,} connections"
        cells.append((cell, "RSS KiB / connection", 2,
                      summary(idle_runs, "kib_per_conn", "A", "B", lower_is_better=True)))
        cells.append((cell, "server threads", 0,
                      summary(idle_runs, "threads_held", "A", "B", lower_is_better=True)))
    print(markdown(cells, names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": src["A"], "b": src["B"], "app": args.app, "flags": flags,
                       "names": names, "loadgen": loadgen, "args": vars(args),
                       "conditions": bench.notes, "echo": echo_runs, "idle": idle_runs,
                       "summary": [{"cell": c, "metric": m, **s} for c, m, _, s in cells]},
                      f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
