"""Cell ``fanout-redis`` (issue 15): the hub's fan-out across processes, through Redis.

The ``fanout`` cell's load (100 subscribers, 64-byte messages, one publisher)
in three cases, alternated on the same processes:

* ``cross``: the publisher connects to relay A, the subscribers to relay B, both
  with ``Config(backplane=...)`` on one redis-server, so every message goes
  A → Redis → B before B's hub fans it out;
* ``local``: publisher and subscribers on one relay with the backplane on (local
  delivery, plus the publish to Redis that nobody else reads);
* ``none``: publisher and subscribers on one relay without a backplane (the
  ``fanout`` cell's server).

Each case runs at a fixed rate (2,000 messages/s for the window, as ``fanout``)
and at the maximum rate: ``MAX_MESSAGES`` messages sent as fast as the relay
takes them (``loadgen --rate 0 --messages N``), then drained until every one is
delivered or counted lost. A fixed count, not a fixed time: a publisher
flooding for a fixed time leaves a backlog in the socket buffers whose tail the
drain cuts off, and that tail would pass for loss. The throughput is then the
deliveries over the time from the first publish to the last delivery, and the
latency is mostly the time a message waited behind the backlog. The relays are ``servers.RELAY``
with an admin endpoint (``/stats`` gives the backplane's books after each run)
and a hub name of their own: the ``local`` relay's hub is not the pair's, so
its messages reach no other process, and the pair's reach no one during the
``local`` runs. redis-server runs pinned to CPU 0 beside the relays (the
servers' CPU), without persistence, in a temporary directory of its own.

run.py passes itself as ``suite`` (it is ``__main__`` when run, so this module
cannot import it back).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Iterator

from servers import RELAY, Server

REDIS_SERVER = shutil.which("redis-server")
CASES = ("cross", "local", "none")
RATES = (2000, 0)            # messages per second; 0 = as fast as the publisher can send
SUBSCRIBERS, SIZE = 100, 64  # as the ``fanout`` cell
MAX_MESSAGES = 20_000        # published at the maximum rate (2,000,000 deliveries)
DRAIN = 5.0                  # seconds a fixed-rate run waits at most for deliveries after publishing
MAX_DRAIN = 30.0             # the same at the maximum rate (it ends as soon as everything arrived)
# The backplane's counters the report keeps per run (differences over the run).
BOOKS = ("published", "sent", "outbound_dropped", "unconfirmed", "received", "gaps", "lost", "duplicates",
         "malformed", "disconnects", "reconnects")
# redis-server's own counters of interest (INFO stats), per run.
REDIS_BOOKS = ("total_commands_processed", "client_output_buffer_limit_disconnections")


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"servers.RELAY changed: {old!r} is not in it exactly once")
    return text.replace(old, new)


def relay_program(hub: str, backplane: str | None) -> str:
    """``servers.RELAY`` with hub ``hub``, ``Config.backplane`` and an admin endpoint on a free
    port, whose number it prints on the second line."""
    program = _replace_once(RELAY, 'self.server.hub("relay",', f'self.server.hub({hub!r},')
    program = _replace_once(program, "write_timeout=5.0)",
                            f'write_timeout=5.0, admin_address="127.0.0.1:0", backplane={backplane!r})')
    return _replace_once(program, "print(server.server_address[1], flush=True)\n",
                         "print(server.server_address[1], flush=True)\n"
                         "print(server.admin_address[1], flush=True)\n")


class RedisProcess:
    """One redis-server on a free loopback port, pinned to CPU 0, no persistence, its own
    temporary directory (removed at the end)."""

    def __init__(self, log_dir: Any, timeout: float = 10.0) -> None:
        self.directory = tempfile.mkdtemp(prefix="connserver-bench-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / "redis-server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", "0", REDIS_SERVER or "redis-server", "--port", str(self.port),
                 "--bind", "127.0.0.1", "--daemonize", "no", "--save", "", "--appendonly", "no",
                 "--dir", self.directory, "--logfile", ""],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        self.pid = self.proc.pid   # taskset execs redis-server: same process
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.log_path}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        return self.command(b"PING").startswith(b"+PONG")

    def command(self, inline: bytes) -> bytes:
        """One inline command on a fresh connection; its reply (b"" if Redis did not answer)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
                sock.sendall(inline + b"\r\n")
                reply = sock.recv(65536)
                if reply.startswith(b"$"):   # a bulk string: read to its announced length
                    size = int(reply[1:reply.index(b"\r\n")])
                    while len(reply) < reply.index(b"\r\n") + 2 + size:
                        more = sock.recv(65536)
                        if not more:
                            break
                        reply += more
                return reply
        except (OSError, ValueError):
            return b""

    def info(self) -> dict[str, int]:
        """The integer fields of INFO stats that the report keeps."""
        fields = {}
        for line in self.command(b"INFO stats").decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key in REDIS_BOOKS and value.strip().isdigit():
                fields[key] = int(value)
        return fields

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admin_stats(admin_port: int) -> dict:
    """The relay's ``GET /stats`` document."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5.0) as reply:
        return json.loads(reply.read())


def books(admin_port: int) -> dict[str, int]:
    """The relay's backplane counters ({} if it did not answer: the run's record says why)."""
    try:
        backplane = admin_stats(admin_port).get("backplane") or {}
    except (OSError, ValueError):
        return {}
    return {key: backplane[key] for key in BOOKS if key in backplane}


def wait_books(ports: list[int], timeout: float = 10.0) -> list[dict[str, int]]:
    """The backplane books of these relays once they hold still (nothing more on its way from
    Redis) for 0.3 s, or as they are at ``timeout``."""
    deadline = time.monotonic() + timeout
    last, still_since = [books(port) for port in ports], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [books(port) for port in ports]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 0.3:
            break
    return last


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


@contextlib.contextmanager
def relays(suite: Any, env: Any, redis: RedisProcess) -> Iterator[dict[str, Any]]:
    """The four relays (A and B of ``cross``, ``local``, ``none``), each with its admin port."""
    servers = [Server("connserver-relay-redis-a", relay_program("relay", redis.url)),
               Server("connserver-relay-redis-b", relay_program("relay", redis.url)),
               Server("connserver-relay-redis-local", relay_program("relay-local", redis.url)),
               Server("connserver-relay-none", relay_program("relay", None))]
    with suite.fleet(servers, env, prime=False) as procs:
        for proc in procs.values():
            line = proc.proc.stdout.readline().strip()   # printed right after the port
            if not line.isdigit():
                raise RuntimeError(f"{proc.name} printed no admin port: {proc.log_tail()}")
            proc.admin_port = int(line)
        yield procs


def sides(procs: dict[str, Any], case: str) -> dict[str, Any]:
    """The relays a case uses, by role: ``publishing`` and ``receiving``, or the one ``relay``."""
    if case == "cross":
        return {"publishing": procs["connserver-relay-redis-a"], "receiving": procs["connserver-relay-redis-b"]}
    return {"relay": procs["connserver-relay-redis-local" if case == "local" else "connserver-relay-none"]}


def one_run(suite: Any, plan: Any, redis: RedisProcess, procs: dict[str, Any], case: str, rate: int) -> dict:
    """One loadgen fanout run in ``case`` at ``rate``, with the books of the backplane and Redis
    and the CPU of every server-side process around it."""
    roles = sides(procs, case)
    publishing, receiving = roles.get("publishing", roles.get("relay")), roles.get("receiving", roles.get("relay"))
    ports = [proc.admin_port for proc in roles.values()] if case != "none" else []
    pids = {role: proc.pid for role, proc in roles.items()}
    pids["redis"] = redis.pid
    before, redis_before = [books(port) for port in ports], redis.info()
    cpu_before, start = {role: _cpu_s(pid) for role, pid in pids.items()}, time.monotonic()
    # the maximum rate: MAX_MESSAGES, however long they take (up to a minute)
    duration, drain = (plan.window, DRAIN) if rate else (60.0, MAX_DRAIN)
    result = suite.loadgen(receiving, "fanout", timeout=duration + drain + 60, subscribers=SUBSCRIBERS,
                           size=SIZE, rate=rate, duration=duration, drain=drain,
                           messages=None if rate else MAX_MESSAGES,
                           publisher_port=publishing.port if case == "cross" else None)
    wall = time.monotonic() - start
    cpu = {role: _cpu_s(pid) - cpu_before[role] for role, pid in pids.items()}
    result["whole_run"] = {"wall_s": round(wall, 3), "cpu_s": {k: round(v, 3) for k, v in cpu.items()}}
    others = result.get("others")
    if isinstance(others, dict) and "0" in others:
        # loadgen's --server-pid is the receiving relay: the case's other processes on CPU 0 (relay A,
        # redis-server) are its own work, not interference, so they leave "others" (kept as "others_raw")
        result["others_raw"] = dict(others)
        own = sum(v for role, v in cpu.items() if roles.get(role) is not receiving)
        others["0"] = round(max(0.0, others["0"] - own / wall), 3)
    after = wait_books(ports)
    result["backplane"] = {role: difference(a, b) for role, a, b in zip(roles, after, before)} if ports else None
    result["redis"] = difference(redis.info(), redis_before)
    return result


def summary(result: dict) -> str:
    """One run in a line, for the progress log."""
    outcome, latency = result.get("results") or {}, (result.get("results") or {}).get("latency") or {}
    line = (f"{outcome.get('delivered_per_s') or 0:,.0f} delivered/s, p50 {(latency.get('p50_us') or 0) / 1e3:.2f} ms, "
            f"p99 {(latency.get('p99_us') or 0) / 1e3:.2f} ms, lost {outcome.get('lost')}")
    for role, counts in (result.get("backplane") or {}).items():
        line += (f"; {role}: sent {counts.get('sent')}, dropped {counts.get('outbound_dropped')}, "
                 f"received {counts.get('received')}, lost {counts.get('lost')}")
    return line if result.get("ok") else f"failed: {result.get('error')}"


def cells(plan: Any, env: Any, suite: Any) -> list[dict]:
    """Every case at every rate, alternated (A B … B A), ``plan.repeats`` times."""
    if not REDIS_SERVER:
        suite.progress("  fanout-redis: redis-server is not installed (apt-get install redis-server); skipped")
        return []
    if importlib.util.find_spec("redis") is None:   # the relays' backplane needs the client library
        suite.progress("  fanout-redis: the redis client library is missing (pip install -e '.[redis]'); skipped")
        return []
    variants = [(case, rate) for rate in RATES for case in CASES]
    runs: dict[tuple[str, int], list[dict]] = {variant: [] for variant in variants}
    try:
        redis_server = RedisProcess(env.log_dir)
    except RuntimeError as exc:
        suite.progress(f"  fanout-redis: {exc}; skipped")
        return []
    try:
        with relays(suite, env, redis_server) as procs:
            for repeat, (case, rate) in suite.alternate(variants, plan.repeats):
                at = round(time.monotonic() - env.started, 1)
                result = one_run(suite, plan, redis_server, procs, case, rate)
                roles = sides(procs, case)
                suite.measured(env, roles.get("receiving", roles.get("relay")), result, repeat=repeat, at_s=at)
                if case == "cross":
                    roles["publishing"].settle()
                runs[(case, rate)].append(result)
                suite.progress(f"  fanout-redis {case} rate={rate or 'max'} #{repeat + 1}: {summary(result)}")
    finally:
        redis_server.close()
    return [{"kind": "fanout-redis", "server": "connserver-relay", "case": case, "rate": rate,
             "subscribers": SUBSCRIBERS, "size": SIZE, "messages": None if rate else MAX_MESSAGES, "runs": r}
            for (case, rate), r in runs.items()]
