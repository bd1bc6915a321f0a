"""The benchmark suite: connserver beside its alternatives, measured so that a skeptic can check it.

    python benchmarks/run.py --quick            # a subset, about 3 minutes
    python benchmarks/run.py --full             # the committed results, about 31 minutes
    python benchmarks/run.py --full --at HEAD   # measure a commit rather than the working tree
    python benchmarks/run.py --full --cells burst,paced --servers connserver-parked,uvloop   # a part of it

How it measures:

* Builds the C programs with the system ``cc``; every server runs pinned to
  CPU 0 and the load generator (``loadgen.c``) to CPU 1 (``taskset``).
* The servers of a group are started together and stay up for the whole
  group; the load alternates between them, A B C … C B A, ``repeats`` times
  per cell. Noise from the rest of the machine then falls on all of them
  alike and shows up as the range of the repeats, not as a ratio.
* Every run reads the server's CPU time from ``/proc/PID/stat`` at the start
  and end of the counted window (``loadgen --server-pid``): CPU time per
  operation is the headline, because it holds still when throughput swings.
* Bursts apart from steady state: each echo run starts with every connection
  sending one request and none sending a second until all have had their
  first reply (``--barrier``); the steady state is measured after that.
  Bursts of 10,000 run the same way, repeated on the same server processes.
* Paced scenarios: N connections, each sending one message every 1/R s,
  spread evenly; latency from when each message was due.
* A few cells are measured again with ``xcheck.py``, an independent client.
* ``render.py`` turns the results into ``docs/benchmarks.md``, with the rule
  that decides when a ratio may be printed and when it says "inconclusive".

Loopback only; every run is bounded in time and count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import platform
import resource
import selectors
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from typing import Iterable, Iterator, Sequence, TypeVar

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import backplane_fanout  # noqa: E402
import render  # noqa: E402
from servers import (BY_NAME, CHAT, CONNSERVER, CONNSERVER_FAIR, CONNSERVER_RELAY, ECHO, HERE,  # noqa: E402
                     HOSTILE, WS, WS_RELAY, Server)

ROOT = HERE.parent
LOADGEN = HERE / "loadgen"
XCHECK = HERE / "xcheck.py"
HOSTILE_PEERS = HERE / "hostile.py"
WS_STATE = HERE / "ws_state.py"
# websockets' sync server holds four descriptors per connection (the socket, a socketpair to
# wake its reader, the reader's epoll set): under the 20,000 hard descriptor limit it cannot
# hold 10,000 (it fails with EMFILE near 5,000), so its idle cell holds at most this many.
WS_HOLD_CAP = {"websockets-sync": 4_500}
FD_LIMIT = 40_000
INSTALL_HINT = "pip install -e '.[bench]'   (uvloop, gevent and websockets, peers; wsproto for connserver's WebSocket)"
T = TypeVar("T")
# The kinds of cell, in the order a run measures them (``--cells`` picks some).
KINDS = ("echo", "burst", "paced", "crosscheck", "hold", "hold-chat", "hostile", "churn", "churn-growth", "fanout",
         "fanout-redis", "ws-echo", "ws-hold", "ws-fanout")
# The chat app in each mode counts as named when the echo server in the same mode is.
CHAT_MODE_OF = {"chat-thread": "connserver-framed", "chat-parked": "connserver-parked"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a mode measures, and for how long."""

    name: str
    repeats: int                                # runs per cell, alternating A B C … C B A
    warmup: float                               # seconds of steady state before each window
    window: float                               # seconds measured per echo/churn run
    echo: tuple[tuple[int, int], ...]           # (connections, size) cells for every echo server
    bursts: tuple[int, ...]                     # burst-only cells (connections)
    paced: tuple[tuple[int, float], ...]        # (connections, messages/s per connection)
    paced_warmup: float
    paced_window: float
    paced_slice: float
    crosscheck: tuple[str, ...]                 # servers measured by both clients
    hold: int                                   # idle connections per server
    churn: tuple[str, ...]
    churn_growth: int                           # cycles, 0 = skip
    fanout: bool
    hostile: tuple[int, int]                    # (tricklers, non-readers) beside one honest client
    hostile_window: float                       # seconds the honest client is measured
    chat_hold: int                              # idle joined chat members per server (thread, parked)
    ws_echo: tuple[int, ...] = ()               # WebSocket echo cells (connections; 64-byte binary messages)
    ws_hold: int = 0                            # idle WebSocket connections per server
    ws_fanout: tuple[int, ...] = ()             # WebSocket fan-out cells (stalled subscribers beside 100)


QUICK = Plan("quick", repeats=2, warmup=0.2, window=0.8, echo=((10, 64), (1000, 64)), bursts=(),
             paced=((5000, 2.0), (1000, 10.0)), paced_warmup=0.5, paced_window=1.5, paced_slice=0.5,
             crosscheck=("connserver", "stdlib-threading"), hold=1000,
             churn=("connserver", "stdlib-threading"), churn_growth=0, fanout=False,
             hostile=(100, 100), hostile_window=1.0, chat_hold=500, ws_echo=(10, 100), ws_hold=1000,
             ws_fanout=(0, 1))
FULL = Plan("full", repeats=5, warmup=0.5, window=1.5,
            echo=((1, 64), (10, 64), (100, 64), (1000, 64)), bursts=(10_000,),
            paced=((10_000, 1.0), (1000, 10.0)), paced_warmup=2.0, paced_window=30.0, paced_slice=5.0,
            crosscheck=("connserver", "stdlib-threading", "asyncio-protocol"), hold=10_000,
            churn=("connserver", "stdlib-threading", "asyncio-streams"), churn_growth=100_000,
            fanout=True, hostile=(500, 500), hostile_window=2.0, chat_hold=2000, ws_echo=(10, 100, 1000),
            ws_hold=10_000, ws_fanout=(0, 1, 10))


def alternate(items: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """A B C … then C B A, and so on: each item's runs are spread over the whole group."""
    for repeat in range(repeats):
        for item in (items if repeat % 2 == 0 else items[::-1]):
            yield repeat, item


# ------------------------------------------------------------------ processes

def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def build() -> None:
    for binary in (LOADGEN, HERE / "epoll_echo"):
        source = binary.with_suffix(".c")
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source), "-lm"], check=True)


class ServerProcess:
    """One server under test, pinned to CPU 0; its stderr goes to a log file."""

    def __init__(self, server: Server, pythonpath: str, log_dir: pathlib.Path) -> None:
        command = [str(server.binary)] if server.binary else [sys.executable, "-c", server.program or ""]
        self.name = server.name
        self.log_path = log_dir / f"{server.name}.log"
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=pythonpath)
        self.proc = subprocess.Popen(["taskset", "-c", "0", *command], stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, preexec_fn=_raise_fd_limit)
        self.pid = self.proc.pid   # taskset execs the server: same process
        self.port = 0
        self.base_fds: int | None = None   # descriptors at rest with no connection, once known

    def wait_port(self, timeout: float = 30.0) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise RuntimeError(f"{self.name} printed no port within {timeout:.0f} s")
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
        self.port = int(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-400:]
        except OSError:
            return ""

    def stat(self) -> tuple[float, int]:
        """CPU seconds (process, threads, children) and thread count."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK"), int(fields[17])

    def threads(self) -> int:
        return self.stat()[1]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def listen_queue(self) -> int:
        """Connections the kernel completed that the server has not accepted yet (ss Recv-Q)."""
        if not shutil.which("ss"):
            return 0
        out = subprocess.run(["ss", "-Hltn", f"sport = :{self.port}"], capture_output=True, text=True).stdout
        fields = out.split()
        return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0

    def settle(self, timeout: float = 60.0) -> tuple[float, bool]:
        """Wait until the server is back at rest: nothing in the listen queue, thread and
        descriptor counts no longer changing, descriptors back to the baseline (a server that
        keeps a few more after its first use, such as the hub's, counts as at rest once they
        have held still for a second; connections left open do not). Returns the seconds it
        took and whether it got there."""
        start = time.monotonic()
        previous, steady = (-1, -1), 0
        while time.monotonic() - start < timeout and self.alive():
            now = (self.threads(), self.fd_count())
            steady = steady + 1 if now == previous and self.listen_queue() == 0 else 0
            at_base = self.base_fds is None or now[1] <= self.base_fds
            near_base = self.base_fds is None or now[1] <= self.base_fds + 16
            if steady >= (2 if at_base else 20) and near_base:
                return round(time.monotonic() - start, 2), True
            previous = now
            time.sleep(0.05)
        return round(time.monotonic() - start, 2), False

    def thread_states(self) -> dict[str, int]:
        """How many of the server's threads are in each state, and where they sleep (wchan)."""
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{self.pid}/task/{task}/stat") as stat:
                        state = stat.read().rsplit(")", 1)[1].split()[0]
                    with open(f"/proc/{self.pid}/task/{task}/wchan") as wchan:
                        where = wchan.read().strip() or "-"
                    key = f"{state}:{where}"
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


@contextlib.contextmanager
def fleet(servers: Sequence[Server], env: "Environment", prime: bool = True,
          websocket: bool = False) -> Iterator[dict[str, ServerProcess]]:
    """The servers of one group, started together and all up until the group ends.

    Each is primed first: 10 connections for 0.2 s, recorded apart and not counted. A fresh
    asyncio process serves its first set of connections at a quarter of its later speed for
    as long as they stay open (measured: 23-28 us of CPU per round trip, then 6.0-6.5 us),
    which is the bimodality issue 12 reported; the report shows the priming runs beside the
    steady state so that the effect stays visible without deciding the comparisons.
    """
    procs: dict[str, ServerProcess] = {}
    try:
        for server in servers:
            procs[server.name] = ServerProcess(server, env.pythonpath, env.log_dir)
        for proc in procs.values():
            proc.wait_port()
        for proc in procs.values():
            proc.settle(timeout=10)
            proc.base_fds = proc.fd_count()
        if prime:
            for proc in procs.values():
                at = round(time.monotonic() - env.started, 1)
                result = loadgen(proc, "echo", timeout=60, framed=not websocket, websocket=websocket,
                                 connections=10, size=64, warmup=0, duration=0.2)
                env.priming.append({"server": proc.name, "at_s": at, "result": result})
                proc.settle(timeout=10)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@dataclasses.dataclass
class Environment:
    pythonpath: str
    log_dir: pathlib.Path
    names: frozenset[str] | None = None           # --servers: only these (None: every server)
    cells: frozenset[str] = frozenset(KINDS)      # --cells: only these kinds
    started: float = dataclasses.field(default_factory=time.monotonic)
    priming: list[dict] = dataclasses.field(default_factory=list)

    def pick(self, servers: Iterable[Server]) -> list[Server]:
        """Those of the servers that are installed and named by --servers (all without it)."""
        return [server for server in servers if server.available() and
                (self.names is None or {server.name, CHAT_MODE_OF.get(server.name)} & self.names)]

    @property
    def servers(self) -> list[Server]:
        """The echo peers measured: every echo, burst, paced, hold and hostile cell."""
        return self.pick(ECHO)

    @property
    def ws_servers(self) -> list[Server]:
        """The WebSocket echo servers measured: every ws-echo and ws-hold cell."""
        return self.pick(WS)

    @property
    def ws_relays(self) -> list[Server]:
        """connserver's WebSocket relays measured: the ws-fanout cells."""
        return self.pick(WS_RELAY)


def measured(env: Environment, proc: ServerProcess, result: dict, **labels: object) -> dict:
    """A finished run, labelled; the server is settled before the next run, so that its
    teardown (10,000 threads take seconds to end) never shares CPU 0 with another's window."""
    result.update(labels)
    if not result.get("ok") or not (render.dig(result, "results", "round_trips") or
                                    render.dig(result, "results", "answered") or
                                    render.dig(result, "results", "cycles") or
                                    render.dig(result, "results", "delivered") or
                                    render.dig(result, "results", "burst", "served")):
        # something is wrong: keep what the server was doing, for the report
        result["server_threads"] = proc.thread_states()
        result["server_log"] = proc.log_tail()
        result["listen_queue"] = proc.listen_queue()
    result["settle_s"], result["settled"] = proc.settle()
    return result


def loadgen(server: ServerProcess, mode: str, timeout: float, **options: object) -> dict:
    """One loadgen run against a server; its JSON, or a failed record if there was none."""
    command = ["taskset", "-c", "1", str(LOADGEN), "--mode", mode, "--host", "127.0.0.1",
               "--port", str(server.port), "--server-pid", str(server.pid)]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return _json_run(command, timeout, server)


def xcheck(server: ServerProcess, timeout: float, **options: object) -> dict:
    command = ["taskset", "-c", "1", sys.executable, str(XCHECK), "--port", str(server.port),
               "--server-pid", str(server.pid)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return _json_run(command, timeout, server)


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """Busy and total clock ticks of each CPU since boot (/proc/stat).

    Busy is user + nice + system + steal: the kernel here accounts interrupt and softirq
    time apart from any process (loopback TCP's receive work lands there, a third of a
    busy CPU), so it is left out on both sides of "others" below.
    """
    out = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                out[name[3:]] = (ticks[0] + ticks[1] + ticks[2] + ticks[7], sum(ticks))
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _json_run(command: list[str], timeout: float, server: ServerProcess) -> dict:
    if not server.alive():
        return {"ok": False, "error": f"server exited ({server.proc.returncode}): {server.log_tail()}"}
    before, server0, client0, start = cpu_ticks(), server.stat()[0], children_cpu(), time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_raise_fd_limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within {timeout:.0f} s"}
    after, wall = cpu_ticks(), time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"no result: {done.stderr.strip()[-300:]}"}
    result = json.loads(lines[-1])
    if not server.alive():
        result.update(ok=False, error=f"server exited ({server.proc.returncode}): {server.log_tail()}")
        return result
    # Other work on each CPU during the run: CPU 0's busy time less the server's, CPU 1's less
    # the client's (the only child that ran); a few per cent either way is accounting.
    tick = os.sysconf("SC_CLK_TCK")
    mine = {"0": server.stat()[0] - server0, "1": children_cpu() - client0}
    result["others"] = {cpu: round(max(0.0, ((after[cpu][0] - before[cpu][0]) / tick - mine.get(cpu, 0.0)) / wall), 3)
                        for cpu in after if cpu in before}
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- cells

def echo_cells(plan: Plan, env: Environment, n: int, size: int) -> list[dict]:
    """Every echo server on N connections: burst (barrier), then the steady state."""
    servers = env.servers + (env.pick([CONNSERVER_FAIR]) if n >= 1000 else [])
    big = n >= 5000
    runs: dict[str, list[dict]] = {server.name: [] for server in servers}
    with fleet(servers, env) as procs:
        for repeat, name in alternate(list(runs), plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "echo", timeout=plan.warmup + plan.window + 150, framed=True,
                             barrier=True, connections=n, size=size, warmup=plan.warmup,
                             duration=plan.window, connect_timeout=30, barrier_timeout=60,
                             probe_interval=0.25 if n >= 1000 else None, source_addrs=4 if big else None)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[name].append(result)
            progress(f"  echo N={n} S={size} {name} #{repeat + 1}: "
                     f"{render.num(render.cpu_per_rt(result), 2)} µs/rt, "
                     f"{render.num(render.dig(result, 'results', 'round_trips_per_s'))} rt/s, burst "
                     f"{render.num(render.dig(result, 'results', 'burst', 'all_served_s'), 2)} s")
    return [{"kind": "echo", "server": name, "connections": n, "size": size, "runs": r}
            for name, r in runs.items()]


def burst_cells(plan: Plan, env: Environment, n: int) -> list[dict]:
    """N connections at once, each until its first reply; repeated on the same processes."""
    runs: dict[str, list[dict]] = {server.name: [] for server in env.servers}
    with fleet(env.servers, env) as procs:
        for repeat, name in alternate(list(runs), plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "echo", timeout=150, framed=True, barrier=True, connections=n, size=64,
                             warmup=0, duration=0, connect_timeout=30, barrier_timeout=60, source_addrs=4)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[name].append(result)
            progress(f"  burst N={n} {name} #{repeat + 1}: "
                     f"{render.num(render.dig(result, 'results', 'burst', 'all_served_s'), 2)} s")
    return [{"kind": "burst", "server": name, "connections": n, "runs": r} for name, r in runs.items()]


def paced_cells(plan: Plan, env: Environment) -> list[dict]:
    """Each paced scenario once per server, the order reversed from one scenario to the next."""
    cells = []
    for index, (n, rate) in enumerate(plan.paced):
        order = env.servers if index % 2 == 0 else env.servers[::-1]
        with fleet(env.servers, env) as procs:
            for server in order:
                proc = procs[server.name]
                at = round(time.monotonic() - env.started, 1)
                result = loadgen(proc, "paced", timeout=plan.paced_warmup + plan.paced_window + 150,
                                 framed=True, connections=n, rate=rate, size=64, warmup=plan.paced_warmup,
                                 duration=plan.paced_window, slice=plan.paced_slice, connect_timeout=30,
                                 barrier_timeout=60, drain=5, source_addrs=4 if n >= 5000 else None)
                measured(env, proc, result, at_s=at)
                cells.append({"kind": "paced", "server": server.name, "connections": n, "rate": rate,
                              "runs": [result]})
                latency = result.get("results", {}).get("latency", {})
                progress(f"  paced {n}x{rate:g}/s {server.name}: p99 "
                         f"{render.num((latency.get('p99_us') or 0) / 1e3, 2)} ms, server CPU "
                         f"{render.num((render.dig(result, 'server', 'util') or 0) * 100, 1)} %")
    return cells


def crosscheck_cells(plan: Plan, env: Environment, n: int = 10) -> list[dict]:
    """The same cells with loadgen and with xcheck, alternating, on the same processes (raw echo)."""
    servers = env.pick(BY_NAME[name] for name in plan.crosscheck)
    pairs = [(server.name, client) for server in servers for client in ("loadgen", "xcheck")]
    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    with fleet(servers, env) as procs:
        for repeat, (name, client) in alternate(pairs, plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            if client == "loadgen":
                result = loadgen(proc, "echo", timeout=plan.warmup + plan.window + 60, connections=n, size=64,
                                 warmup=plan.warmup, duration=plan.window)
            else:
                result = xcheck(proc, timeout=plan.warmup + plan.window + 60, connections=n, size=64,
                                warmup=plan.warmup, duration=plan.window)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[(name, client)].append(result)
    return [{"kind": "crosscheck", "server": name, "client": client, "connections": n, "runs": r}
            for (name, client), r in runs.items()]


def hold_cells(plan: Plan, env: Environment) -> list[dict]:
    """Idle memory: N connections served once and held, on a fresh process per server."""
    cells = []
    with fleet(env.servers, env, prime=False) as procs:
        for server in env.servers:
            result = loadgen(procs[server.name], "hold", timeout=180, framed=True, connections=plan.hold,
                             wait_reply=True, duration=0.5, connect_timeout=30,
                             source_addrs=4 if plan.hold >= 5000 else None)
            cells.append({"kind": "hold", "server": server.name, "connections": plan.hold, "runs": [result]})
            procs[server.name].stop()   # RSS per connection needs a process that held nothing before
    return cells


def ws_echo_cells(plan: Plan, env: Environment, n: int) -> list[dict]:
    """Every WebSocket echo server on N connections, one 64-byte binary message outstanding on
    each (``loadgen --websocket``): the upgrade and a burst (barrier), then the steady state."""
    servers = env.ws_servers
    runs: dict[str, list[dict]] = {server.name: [] for server in servers}
    with fleet(servers, env, websocket=True) as procs:
        for repeat, name in alternate(list(runs), plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "echo", timeout=plan.warmup + plan.window + 150, websocket=True,
                             barrier=True, connections=n, size=64, warmup=plan.warmup,
                             duration=plan.window, connect_timeout=30, barrier_timeout=60)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[name].append(result)
            progress(f"  ws-echo N={n} {name} #{repeat + 1}: "
                     f"{render.num(render.cpu_per_rt(result), 2)} µs/rt, "
                     f"{render.num(render.dig(result, 'results', 'round_trips_per_s'))} rt/s, loadgen CPU "
                     f"{render.num(render.dig(result, 'loadgen_cpu', 'util'), 2)}")
    return [{"kind": "ws-echo", "server": name, "connections": n, "size": 64, "runs": r}
            for name, r in runs.items()]


def ws_hold_cells(plan: Plan, env: Environment) -> list[dict]:
    """Idle WebSockets: N connections upgraded (each has had its 101 response) and held idle,
    each server on a fresh process; beside them the parked framed echo server's idle framed
    connection (one round trip each, as in ``hold``) and the heap of one connection's protocol
    state (``ws_state.py``), the two parts of issue 14's memory target."""
    cells = []
    reference = env.pick([BY_NAME["connserver-parked"]]) if env.ws_servers else []
    with fleet(env.ws_servers + reference, env, prime=False) as procs:
        for server in env.ws_servers + reference:
            ws = server in env.ws_servers
            n = min(plan.ws_hold, WS_HOLD_CAP.get(server.name, plan.ws_hold))
            result = loadgen(procs[server.name], "hold", timeout=240, websocket=ws, framed=not ws,
                             connections=n, wait_reply=True, duration=0.5, connect_timeout=30,
                             source_addrs=4 if n >= 5000 else None)
            cells.append({"kind": "ws-hold", "server": server.name, "connections": n,
                          "websocket": ws, "runs": [result]})
            progress(f"  ws-hold N={n} {server.name}: "
                     f"{render.num(render.hold_per_conn(result, n), 2)} KiB/connection, "
                     f"{render.num(render.dig(result, 'results', 'still_open'))} held")
            procs[server.name].stop()
    if env.ws_servers:
        done = subprocess.run([sys.executable, str(WS_STATE)], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=env.pythonpath))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        state = json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-300:]}
        cells.append({"kind": "ws-state", "server": "wsproto", "runs": [dict(state, ok=bool(lines))]})
    return cells


def chat_hold_cells(plan: Plan, env: Environment) -> list[dict]:
    """Idle chat members: each sends its nickname (joining the room: a hub subscriber), then
    stays idle; thread per connection and parked, each on a fresh process. Every join is
    announced to every member already in, so the hold lasts until those notices are delivered."""
    cells = []
    servers = env.pick(CHAT)
    with fleet(servers, env, prime=False) as procs:
        for server in servers:
            result = loadgen(procs[server.name], "hold", timeout=240, connections=plan.chat_hold,
                             hello="m%d\\n", wait_reply=True, duration=5.0, connect_timeout=30)
            cells.append({"kind": "hold-chat", "server": server.name, "connections": plan.chat_hold,
                          "runs": [result]})
            progress(f"  chat hold N={plan.chat_hold} {server.name}: "
                     f"{render.num(render.hold_per_conn(result, plan.chat_hold), 2)} KiB/connection")
            procs[server.name].stop()
    return cells


def hostile_run(proc: ServerProcess, plan: Plan) -> tuple[dict, dict]:
    """Tricklers and non-readers connect and settle, the honest client is measured among them,
    then they stop; their report says how many the server had closed by then."""
    trickle, stall = plan.hostile
    # The read deadline (30 s by default) would close the tricklers: the whole attack, ramp
    # included, is kept well inside it (hostile.py ends by itself after 25 s at most).
    command = ["taskset", "-c", "1", sys.executable, str(HOSTILE_PEERS), "--port", str(proc.port),
               "--trickle", str(trickle), "--stall", str(stall), "--duration", "25", "--ready-timeout", "12"]
    attacker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(attacker.stdout, selectors.EVENT_READ)
            ready = bool(selector.select(20)) and attacker.stdout.readline().strip() == "ready"
        if not ready:
            return {"ok": False, "error": "hostile peers never ready"}, {}
        result = loadgen(proc, "echo", timeout=plan.hostile_window + 30, framed=True, connections=1, size=64,
                         warmup=0.3, duration=plan.hostile_window)
        out, err = attacker.communicate("", timeout=30)   # stdin closed: the peers stop
        report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err[-400:]}
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
    return result, report


def hostile_cells(plan: Plan, env: Environment) -> list[dict]:
    """An honest client's framed round trips (1 connection) alone, then among hostile peers;
    per repeat both runs back to back on the same process, the servers alternating."""
    servers = [server for server in env.servers if server.name in HOSTILE]
    runs: dict[tuple[str, bool], list[dict]] = {(s.name, a): [] for s in servers for a in (False, True)}
    with fleet(servers, env) as procs:
        for repeat, server in alternate(servers, plan.repeats):
            proc = procs[server.name]
            for attacked in (False, True):
                at = round(time.monotonic() - env.started, 1)
                if attacked:
                    result, report = hostile_run(proc, plan)
                    result["attackers"] = report
                else:
                    result = loadgen(proc, "echo", timeout=plan.hostile_window + 30, framed=True, connections=1,
                                     size=64, warmup=0.3, duration=plan.hostile_window)
                measured(env, proc, result, repeat=repeat, at_s=at)
                runs[(server.name, attacked)].append(result)
                latency = render.dig(result, "results", "latency", "p99_us")
                progress(f"  hostile {server.name} {'attacked' if attacked else 'alone'} #{repeat + 1}: p99 "
                         f"{render.num((latency or 0) / 1e3, 2)} ms"
                         + (f", still open {render.hostile_open(result)}" if attacked else ""))
    return [{"kind": "hostile", "server": name, "attacked": attacked, "trickle": plan.hostile[0],
             "stall": plan.hostile[1], "runs": r} for (name, attacked), r in runs.items()]


def churn_cells(plan: Plan, env: Environment) -> list[dict]:
    servers = env.pick(BY_NAME[name] for name in plan.churn)
    runs: dict[str, list[dict]] = {server.name: [] for server in servers}
    with fleet(servers, env) as procs:
        for repeat, name in alternate(list(runs), plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "churn", timeout=plan.warmup + plan.window + 60, framed=True,
                             connections=32, size=64, warmup=plan.warmup, duration=plan.window)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[name].append(result)
    return [{"kind": "churn", "server": name, "runs": r} for name, r in runs.items()]


def churn_growth_cell(plan: Plan, env: Environment) -> dict:
    """Many short connections: the server's descriptors and RSS before and after, once settled."""
    with fleet([BY_NAME["connserver"]], env, prime=False) as procs:
        proc = procs["connserver"]
        fds, rss = proc.fd_count(), proc.rss_bytes()
        result = loadgen(proc, "churn", timeout=180, framed=True, duration=120, warmup=0, connections=32,
                         size=64, max_cycles=plan.churn_growth)
        result["settle_s"], result["settled"] = proc.settle()
        result["fd_delta"] = proc.fd_count() - fds
        result["rss_delta_bytes"] = proc.rss_bytes() - rss
    return {"kind": "churn-growth", "server": "connserver", "cycles": plan.churn_growth, "runs": [result]}


def fanout_cells(plan: Plan, env: Environment) -> list[dict]:
    runs: dict[int, list[dict]] = {0: [], 1: []}
    with fleet([CONNSERVER_RELAY], env, prime=False) as procs:
        proc = procs[CONNSERVER_RELAY.name]
        for repeat, stalled in alternate([0, 1], plan.repeats):
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "fanout", timeout=plan.window + 60, subscribers=100, size=64, rate=2000,
                             duration=plan.window, stalled=stalled)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[stalled].append(result)
    return [{"kind": "fanout", "server": CONNSERVER_RELAY.name, "stalled": stalled, "runs": r}
            for stalled, r in runs.items()]


def ws_fanout_cells(plan: Plan, env: Environment) -> list[dict]:
    """``fanout`` over WebSocket (``loadgen --websocket``): one publisher's text frames relayed to
    100 subscribers as one shared frame each, 2,000 messages/s, with 0, 1 (and 10) stalled
    subscribers beside them; the (server, stalled) pairs alternate A B C … C B A."""
    servers = env.ws_relays
    variants = [(server.name, stalled) for server in servers for stalled in plan.ws_fanout]
    runs: dict[tuple[str, int], list[dict]] = {variant: [] for variant in variants}
    with fleet(servers, env, prime=False) as procs:
        for repeat, (name, stalled) in alternate(variants, plan.repeats):
            proc = procs[name]
            at = round(time.monotonic() - env.started, 1)
            result = loadgen(proc, "fanout", timeout=plan.window + 60, websocket=True, subscribers=100, size=64,
                             rate=2000, duration=plan.window, stalled=stalled)
            measured(env, proc, result, repeat=repeat, at_s=at)
            runs[(name, stalled)].append(result)
            latency = render.dig(result, "results", "latency", "p99_us")
            progress(f"  ws-fanout {name} stalled={stalled} #{repeat + 1}: p99 "
                     f"{render.num((latency or 0) / 1e3, 2)} ms, lost "
                     f"{render.num(render.dig(result, 'results', 'lost'))}")
    return [{"kind": "ws-fanout", "server": name, "stalled": stalled, "subscribers": 100, "rate": 2000,
             "runs": r} for (name, stalled), r in runs.items()]


# --------------------------------------------------------------- the machine

def background_load(seconds: float = 1.0) -> dict[str, float]:
    """Share of each CPU busy with other work while the suite runs nothing."""
    first = cpu_ticks()
    time.sleep(seconds)
    second = cpu_ticks()
    return {cpu: round((second[cpu][0] - first[cpu][0]) / max(1, second[cpu][1] - first[cpu][1]), 3)
            for cpu in second}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def commit_of(rev: str | None) -> str:
    """The commit measured, with "+changes" if the working tree was measured and was not clean."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", rev or "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        if rev:
            return head
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "connserver"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def export(rev: str, into: pathlib.Path) -> None:
    """The connserver package as committed at rev, so a run measures a commit, not a working tree."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "connserver"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def versions() -> dict[str, str]:
    out = {}
    for package in ("uvloop", "gevent", "websockets", "wsproto"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    return out


# ---------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset, about 3 minutes (default)")
    mode.add_argument("--full", action="store_true", help="the committed results, about 31 minutes")
    parser.add_argument("--at", metavar="REV", help="measure connserver as committed at REV (git archive)")
    parser.add_argument("--cells", metavar="KIND[,KIND...]", type=names_of(KINDS),
                        help="only these kinds of cell: " + ", ".join(KINDS))
    parser.add_argument("--servers", metavar="NAME[,NAME...]", type=names_of(BY_NAME),
                        help="only these servers, in every cell that has them (chat-thread and "
                             "chat-parked come with connserver-framed and connserver-parked)")
    parser.add_argument("--out", help="raw results (default benchmarks/results/MODE.json, "
                                      "MODE-partial.json with --cells or --servers)")
    parser.add_argument("--doc", help="the report (default: --full docs/benchmarks.md, otherwise "
                                      "benchmarks/results/MODE.md or MODE-partial.md)")
    args = parser.parse_args()
    plan = FULL if args.full else QUICK
    # A partial run never replaces the committed report or its raw results.
    partial = bool(args.cells or args.servers)
    name = plan.name + ("-partial" if partial else "")
    out = pathlib.Path(args.out or HERE / "results" / f"{name}.json")
    doc = pathlib.Path(args.doc or (ROOT / "docs" / "benchmarks.md" if args.full and not partial
                                    else HERE / "results" / f"{name}.md"))
    if partial and {out.resolve(), doc.resolve()} & {HERE / "results" / "full.json", ROOT / "docs" / "benchmarks.md"}:
        parser.error("a partial run (--cells, --servers) may not write full.json or docs/benchmarks.md")
    if not shutil.which("taskset") or not shutil.which("cc"):
        sys.exit("benchmarks need taskset (util-linux) and cc (gcc)")
    missing = [server.name for server in ECHO + WS + WS_RELAY if not server.available() and
               (args.servers is None or server.name in args.servers)]
    if missing:
        progress(f"not installed: {', '.join(missing)}; to compare with them: {INSTALL_HINT}")
        if args.full:
            sys.exit("the full run compares every peer; install them first")
    _raise_fd_limit()
    build()
    with tempfile.TemporaryDirectory(prefix="connserver-bench-") as scratch:
        scratch_path = pathlib.Path(scratch)
        pythonpath = str(ROOT)
        if args.at:
            export(args.at, scratch_path)
            pythonpath = str(scratch_path)
        log_dir = HERE / "results" / f"logs-{name}"
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True)
        env = Environment(pythonpath, log_dir, names=args.servers, cells=args.cells or frozenset(KINDS))
        commit = commit_of(args.at)   # now: others may commit while it runs
        results = run_plan(plan, env)
    if partial:
        results["partial"] = {"cells": [kind for kind in KINDS if kind in env.cells],
                              "servers": sorted(args.servers or BY_NAME)}
    results.update(missing=missing, commit=commit,
                   command=" ".join(["python", "benchmarks/run.py"] + sys.argv[1:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    doc.write_text(render.render(results, results["command"]))
    progress(f"wrote {out} and {doc} in {results['seconds']:.0f} s")
    return 0


def names_of(allowed: Iterable[str]):
    """An argparse type: a comma-separated list of names, each one of ``allowed``."""
    def parse(text: str) -> frozenset[str]:
        names = frozenset(name.strip() for name in text.split(",") if name.strip())
        unknown = sorted(names - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown) or '(none)'}; "
                                             f"choose from {', '.join(allowed)}")
        return names
    return parse


def run_plan(plan: Plan, env: Environment) -> dict:
    started = time.monotonic()
    results: dict[str, object] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "mode": plan.name,
        "plan": dataclasses.asdict(plan), "loadavg": {"before": loadavg()},
        "background": {"before": background_load()}, "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "platform": platform.platform()},
    }
    cells: list[dict] = []
    results["cells"] = cells
    steps = {
        "echo": lambda: [cell for n, size in plan.echo for cell in echo_cells(plan, env, n, size)],
        "burst": lambda: [cell for n in plan.bursts for cell in burst_cells(plan, env, n)],
        "paced": lambda: paced_cells(plan, env),
        "crosscheck": lambda: crosscheck_cells(plan, env),
        "hold": lambda: hold_cells(plan, env),
        "hold-chat": lambda: chat_hold_cells(plan, env),
        "hostile": lambda: hostile_cells(plan, env),
        "churn": lambda: churn_cells(plan, env),
        "churn-growth": lambda: ([churn_growth_cell(plan, env)]
                                 if plan.churn_growth and env.pick([CONNSERVER]) else []),
        "fanout": lambda: fanout_cells(plan, env) if plan.fanout and env.pick([CONNSERVER_RELAY]) else [],
        # its own module (the Redis process, the relay pairs); it gets this one's helpers passed in
        "fanout-redis": lambda: (backplane_fanout.cells(plan, env, sys.modules[__name__])
                                 if plan.fanout and env.pick([CONNSERVER_RELAY]) else []),
        "ws-echo": lambda: [cell for n in plan.ws_echo for cell in ws_echo_cells(plan, env, n)],
        "ws-hold": lambda: ws_hold_cells(plan, env) if plan.ws_hold else [],
        "ws-fanout": lambda: ws_fanout_cells(plan, env) if plan.ws_fanout else [],
    }
    for kind in KINDS:
        if kind in env.cells:
            progress(f"{kind} ({time.monotonic() - started:.0f} s)")
            cells += steps[kind]()
    results["priming"] = env.priming
    results["seconds"] = round(time.monotonic() - started, 1)
    results["background"]["after"] = background_load()
    results["loadavg"]["after"] = loadavg()
    return results


if __name__ == "__main__":
    sys.exit(main())
