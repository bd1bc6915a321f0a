"""Leader/followers, batching, edge-triggered, or a dispatcher? (issue 13)

connserver's parked engine (``connserver/core/parking.py``) serves ready
connections by leader/followers: ``park_threads`` threads wait in one epoll
set, every registration is one-shot, each wake takes one event
(``poll(-1, 1)``), and the thread that got it serves it and re-arms it with
``EPOLL_CTL_MOD``. Issue 13 asked that choice to be measured against the
alternatives. This file is that experiment, apart from connserver: one small
server with the same per-message work in every design, and a driver that
measures them side by side.

**The server** (``--design NAME``, ``--threads K``, default 2) prints its port
on its first line and serves 127.0.0.1 until killed. Per wake and connection
the work is the same in every design (``serve``): non-blocking ``recv`` until a
short read, parse each complete frame (4-byte big-endian length, then the
payload), and send every complete frame of that read back with one
``sendmsg``. Only how a thread comes to serve a connection differs:

- ``lf1``: K threads wait in one epoll set; one-shot registrations;
  ``poll(-1, 1)``; the thread serves what it got and re-arms it
  (``epoll.modify``). What connserver does.
- ``lf16``: the same with ``poll(-1, 16)``: a wake serves up to 16 ready
  connections (batching), each re-armed after it is served.
- ``dispatch``: one dispatcher thread ``poll(-1, 64)`` on one-shot
  registrations and hands each ready connection to K worker threads through a
  ``queue.SimpleQueue``; a worker serves it and re-arms it.
- ``et``: K threads, ``poll(-1, 1)``, edge-triggered registrations
  (``EPOLLET``, never re-armed). A per-connection lock guards a "being
  served" flag and a "more arrived" flag: a thread that gets an event for a
  connection another thread is serving sets "more" and goes back to waiting;
  the serving thread serves again before it lets go, so no two threads serve
  one connection and no wake is lost.
- ``single``: one thread, level-triggered registrations, ``poll(-1, 64)``, the
  listener in the same set: an event loop in plain Python, the floor.

The threaded designs accept in the main thread (blocking ``accept``, as
connserver's accept thread); it is idle during a measured window.

**The driver** (``--compare``) starts every design at once, each pinned to
CPU 0 (``taskset``), primes each (10 connections, 0.5 s), then per cell
(``--connections``, 64-byte frames, ``loadgen --mode echo --framed`` on
CPU 1) alternates the load A B C D E E D C B A, ``--rounds`` times. Before each
run the server just measured must be back at rest (its descriptors back to
their count at rest, its CPU time still). It reports, per design and cell,
median (min–max) of the server's CPU time per round trip in loadgen's window
(the headline), round trips per second, Jain's index and starved connections,
and each design's CPU per round trip against ``lf1`` by the suite's rule for
ratios (``benchmarks/render.py``: a ratio only if at least three runs each and
the ranges do not overlap, and neither range is as wide as the ratio). The
other work on each CPU during each run (busy ticks less the server's and the
client's) is recorded.

    python benchmarks/park_designs.py --design lf1 --threads 2
    python benchmarks/park_designs.py --compare --rounds 3 --json /tmp/pd.json > /tmp/pd.md
    python benchmarks/park_designs.py --render /tmp/pd.json     # the report again

The server is standard library only; the driver also needs ``cc`` to build
``benchmarks/loadgen.c`` when it is missing, and imports ``render.py`` beside
it. Loopback only; every wait is bounded, the whole comparison by
``--budget`` seconds, and every server is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"
HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20          # a longer announced frame ends the connection
RECV_SIZE = 65536            # a read shorter than this took all there was
BACKLOG = 4096
ONESHOT_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
EDGE_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
LEVEL_IN = select.EPOLLIN | select.EPOLLRDHUP
DESIGNS = ("lf1", "lf16", "dispatch", "et", "single")
SEND_TIMEOUT = 10.0


# --------------------------------------------------------------------- the server

class Conn:
    """One client: its socket, a partial frame, and (et) who is serving it."""

    __slots__ = ("sock", "fd", "pending", "lock", "serving", "more")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pending = b""
        self.lock = threading.Lock()
        self.serving = False
        self.more = False


def serve(conn: Conn) -> bool:
    """Read what has arrived and echo every complete frame; False: the connection is over.

    Identical in every design. Reads until a short read (at 64-byte frames: one
    ``recv``); replies to one read go out in one ``sendmsg``.
    """
    sock = conn.sock
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        buf = conn.pending + data if conn.pending else data
        end = len(buf)
        pos = 0
        parts: list[bytes] = []
        total = 0
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                return False
            if end - pos - 4 < size:
                break
            payload = buf[pos + 4:pos + 4 + size]
            parts.append(HEADER.pack(size))
            parts.append(payload)
            total += 4 + size
            pos += 4 + size
        conn.pending = buf[pos:] if pos < end else b""
        if parts and not send_all(sock, parts, total):
            return False
        if len(data) < RECV_SIZE:
            return True


def send_all(sock: socket.socket, parts: list[bytes], total: int) -> bool:
    """One ``sendmsg``; what the kernel does not take goes out blocking (bounded).

    With one frame outstanding per connection the kernel always takes it all;
    the fallback keeps the echo correct rather than fast.
    """
    try:
        sent = sock.sendmsg(parts)
    except BlockingIOError:
        sent = 0
    except OSError:
        return False
    if sent == total:
        return True
    rest = b"".join(parts)[sent:]
    sock.settimeout(SEND_TIMEOUT)
    try:
        sock.sendall(rest)
    except OSError:
        return False
    finally:
        sock.setblocking(False)
    return True


class Server:
    """The listener, the epoll set, the connections by descriptor, and the design's threads."""

    def __init__(self, design: str, threads: int) -> None:
        self.design = design
        self.threads = threads
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(BACKLOG)
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.mask = {"et": EDGE_IN, "single": LEVEL_IN}.get(design, ONESHOT_IN)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        self.conns[conn.fd] = conn          # before it can be reported
        self.epoll.register(conn.fd, self.mask)

    def drop(self, conn: Conn) -> None:
        """Only the thread serving ``conn`` calls this; the descriptor is reused after close."""
        try:
            self.epoll.unregister(conn.fd)
        except OSError:
            pass
        self.conns.pop(conn.fd, None)
        conn.sock.close()

    # -- the designs -----------------------------------------------------------

    def leader_followers(self, batch: int) -> None:
        poll, conns = self.epoll.poll, self.conns
        modify, drop = self.epoll.modify, self.drop
        while True:
            for fd, _ in poll(-1, batch):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if serve(conn):
                    modify(fd, ONESHOT_IN)
                else:
                    drop(conn)

    def dispatcher(self, work: queue.SimpleQueue) -> None:
        poll, conns, put = self.epoll.poll, self.conns, work.put
        while True:
            for fd, _ in poll(-1, 64):
                conn = conns.get(fd)
                if conn is not None:
                    put(conn)

    def worker(self, work: queue.SimpleQueue) -> None:
        get, modify, drop = work.get, self.epoll.modify, self.drop
        while True:
            conn = get()
            if serve(conn):
                modify(conn.fd, ONESHOT_IN)
            else:
                drop(conn)

    def edge_triggered(self) -> None:
        poll, conns, drop = self.epoll.poll, self.conns, self.drop
        while True:
            for fd, _ in poll(-1, 1):
                conn = conns.get(fd)
                if conn is None:
                    continue
                with conn.lock:
                    if conn.serving:          # another thread has it: it serves again
                        conn.more = True
                        continue
                    conn.serving = True
                while True:
                    if not serve(conn):
                        drop(conn)            # stays "serving": no one touches it again
                        break
                    with conn.lock:
                        if not conn.more:
                            conn.serving = False
                            break
                        conn.more = False

    def event_loop(self) -> None:
        listener = self.listener
        listener.setblocking(False)
        lfd = listener.fileno()
        self.epoll.register(lfd, select.EPOLLIN)
        poll, conns, drop = self.epoll.poll, self.conns, self.drop
        while True:
            for fd, _ in poll(-1, 64):
                if fd == lfd:
                    while True:
                        try:
                            sock, _ = listener.accept()
                        except BlockingIOError:
                            break
                        self.admit(sock)
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if not serve(conn):
                    drop(conn)

    def run(self) -> None:
        print(self.port, flush=True)
        if self.design == "single":
            return self.event_loop()
        if self.design == "dispatch":
            work: queue.SimpleQueue = queue.SimpleQueue()
            targets = [(self.dispatcher, (work,))] + [(self.worker, (work,))] * self.threads
        elif self.design == "et":
            targets = [(self.edge_triggered, ())] * self.threads
        else:
            batch = 16 if self.design == "lf16" else 1
            targets = [(self.leader_followers, (batch,))] * self.threads
        for i, (target, args) in enumerate(targets):
            threading.Thread(target=target, args=args, name=f"{self.design}-{i}", daemon=True).start()
        while True:   # accept in the main thread, as connserver's accept thread
            sock, _ = self.listener.accept()
            self.admit(sock)


# --------------------------------------------------------------------- the driver

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 10.0
SETTLE_TIMEOUT = 15.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_ticks() -> dict[str, int]:
    """Busy ticks per CPU (user + nice + system + steal, as run.py: softirq apart)."""
    out = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                t = [int(v) for v in values[:8]]
                out[name[3:]] = t[0] + t[1] + t[2] + t[7]
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class DesignProcess:
    """One design's server process, pinned."""

    def __init__(self, design: str, threads: int, cpu: int) -> None:
        self.design = design
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), sys.executable, os.path.abspath(__file__),
             "--design", design, "--threads", str(threads)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"{design}: no port within {START_TIMEOUT} s ({line!r})")
        self.port = int(line)
        self.fds_at_rest = open_fds(self.pid)   # listener, epoll set, stdio: no client yet

    @property
    def pid(self) -> int:
        return self.proc.pid

    def settle(self) -> float:
        """Wait (bounded) until its descriptors are back to rest and its CPU time holds still."""
        t0 = time.monotonic()
        last = proc_cpu_s(self.pid)
        while time.monotonic() - t0 < SETTLE_TIMEOUT:
            time.sleep(0.2)
            now = proc_cpu_s(self.pid)
            if open_fds(self.pid) <= self.fds_at_rest and now - last <= 1 / CLK_TCK:
                break
            last = now
        else:
            log(f"{self.design}: not at rest after {SETTLE_TIMEOUT} s; going on")
        return round(time.monotonic() - t0, 2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def loadgen_run(loadgen: str, server: DesignProcess, connections: int, warmup: float,
                duration: float, client_cpu: int, server_cpu: int) -> dict:
    command = ["taskset", "-c", str(client_cpu), loadgen, "--mode", "echo", "--framed",
               "--host", HOST, "--port", str(server.port), "--server-pid", str(server.pid),
               "--connections", str(connections), "--size", "64",
               "--warmup", str(warmup), "--duration", str(duration)]
    before, server0, client0, start = cpu_ticks(), proc_cpu_s(server.pid), children_cpu(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=warmup + duration + 60)
    after, wall = cpu_ticks(), time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{server.design}: loadgen gave no result: {done.stderr.strip()[-300:]}")
    run = json.loads(lines[-1])
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.design}: server exited {server.proc.returncode}")
    if not run.get("ok"):
        raise RuntimeError(f"{server.design}: loadgen failed: {run.get('error')}")
    res = run["results"]
    mine = {str(server_cpu): proc_cpu_s(server.pid) - server0, str(client_cpu): children_cpu() - client0}
    others = {cpu: round(max(0.0, ((after[cpu] - before[cpu]) / CLK_TCK - mine[cpu]) / wall), 3)
              for cpu in mine}
    return {
        "design": server.design, "connections": connections, "at": time.strftime("%H:%M:%S"),
        "cpu_us_per_rt": run["server"]["cpu_s"] / res["round_trips"] * 1e6,
        "round_trips_per_s": res["round_trips_per_s"], "round_trips": res["round_trips"],
        "server_util": run["server"]["util"], "loadgen_util": run["loadgen_cpu"]["util"],
        "threads": run["server"].get("threads_max"),
        "jain": res["fairness"]["jain"], "starved": res["fairness"]["starved"],
        "p50_us": res["latency"]["p50_us"], "p99_us": res["latency"]["p99_us"],
        "others": others,
    }


def fmt(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def report(runs: list[dict], designs: list[str], cells: list[int]) -> str:
    sys.path.insert(0, HERE)
    from render import against, claim, spread   # the suite's rule for ratios

    lines = ["| N | design | server CPU µs / round trip | vs `lf1` (CPU per round trip) "
             "| round trips/s | p99 µs | Jain (min) | starved (max) | server util | others on CPU 0 / 1 (max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in cells:
        base = spread(r["cpu_us_per_rt"] for r in runs if r["connections"] == n and r["design"] == "lf1")
        for design in designs:
            mine = [r for r in runs if r["connections"] == n and r["design"] == design]
            if not mine:
                continue
            cpu = [r["cpu_us_per_rt"] for r in mine]
            if design == "lf1":
                versus = "–"
            else:
                c = claim(base, spread(cpu), "lf1", design)
                v = against(base, spread(cpu), 1.0, at_least=False)
                versus = c.text() + (f"; possible {v.low:.2f}–{v.high:.2f}×" if v.low is not None else "")
            jains = [r["jain"] for r in mine if r["jain"] is not None]
            lines.append(
                f"| {n:,} | `{design}` | {fmt(cpu, 2)} | {versus} | {fmt([r['round_trips_per_s'] for r in mine], 0)} "
                f"| {fmt([r['p99_us'] for r in mine], 0)} | {min(jains):.3f} | {max(r['starved'] for r in mine)} "
                f"| {fmt([r['server_util'] for r in mine], 2)} "
                f"| {max(r['others']['0'] for r in mine):.2f} / {max(r['others']['1'] for r in mine):.2f} |")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    raise_fd_limit()
    loadgen = args.loadgen or os.path.join(HERE, "loadgen")
    if not os.path.exists(loadgen):
        subprocess.run(["cc", "-O2", "-o", loadgen, os.path.join(HERE, "loadgen.c"), "-lm"], check=True)
    designs = args.designs
    deadline = time.monotonic() + args.budget
    servers: list[DesignProcess] = []
    runs: list[dict] = []
    failures: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        for design in designs:
            servers.append(DesignProcess(design, args.threads, args.server_cpu))
        for s in servers:   # a fresh process is slower for its first connections: prime each
            loadgen_run(loadgen, s, 10, 0, 0.5, args.client_cpu, args.server_cpu)
        order = servers + servers[::-1]
        for n in args.connections:
            for rnd in range(args.rounds):
                for s in order:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"budget of {args.budget:.0f} s spent")
                    s.settle()
                    try:
                        run = loadgen_run(loadgen, s, n, args.warmup, args.duration,
                                          args.client_cpu, args.server_cpu)
                    except (RuntimeError, subprocess.TimeoutExpired, KeyError, TypeError) as exc:
                        log(f"N={n} round {rnd + 1} {s.design}: failed: {exc}")
                        failures.append({"design": s.design, "connections": n, "round": rnd,
                                         "error": str(exc)})
                        continue
                    run["round"] = rnd
                    run["settle_s"] = s.settle()
                    runs.append(run)
                    log(f"N={n} round {rnd + 1} {s.design}: {run['cpu_us_per_rt']:.2f} µs/rt, "
                        f"{run['round_trips_per_s']:,.0f} rt/s, util {run['server_util']}, "
                        f"others {run['others']}")
    except TimeoutError as exc:
        log(f"stopped early: {exc}")
    finally:
        for s in servers:
            s.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "args": vars(args), "runs": runs, "failures": failures},
                      f, indent=1)
    print(f"park_designs --compare, started {started}, designs {' '.join(designs)}, "
          f"{args.threads} threads, {args.rounds} rounds, warm-up {args.warmup} s, window {args.duration} s\n")
    print(report(runs, designs, args.connections))
    for failure in failures:
        print(f"\nfailed: N={failure['connections']} {failure['design']}: {failure['error']}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", choices=DESIGNS, help="serve with this design until killed")
    p.add_argument("--threads", type=int, default=2, help="K: serving threads (workers for dispatch)")
    p.add_argument("--compare", action="store_true", help="measure every design side by side")
    p.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    p.add_argument("--connections", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--rounds", type=int, default=3, help="A..E E..A this many times per cell")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--budget", type=float, default=720.0, help="stop starting runs after this many s")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--loadgen", help="a built loadgen (default: benchmarks/loadgen, built if missing)")
    p.add_argument("--json", help="write every run here")
    p.add_argument("--render", metavar="JSON", help="print the report of a stored --json, measure nothing")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            stored = json.load(f)
        print(report(stored["runs"], stored["args"]["designs"], stored["args"]["connections"]))
        return 0
    if args.compare:
        if "lf1" not in args.designs or args.threads < 1:
            p.error("--compare needs lf1 (the baseline) and --threads >= 1")
        return compare(args)
    if args.design is None:
        p.error("give --design NAME or --compare")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    Server(args.design, args.threads).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
