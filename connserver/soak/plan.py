"""What a soak run does: its plan (loads, rates, thresholds), validated when it is built.

Shared by the driver (what to simulate) and the runner (how long, how to judge).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import socket
from typing import Any

from .trend import MIN_STEADY_CYCLES



class SoakError(Exception):
    """The soak cannot run as asked (a refused host, an unreachable admin endpoint)."""


# --- parsing ------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """``"90"``, ``"1.5"``, ``"30s"``, ``"10m"``, ``"1h30m"``, ``"250ms"`` -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        return float(cleaned)
    if cleaned and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+", cleaned):
        return sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(cleaned))
    raise ValueError(f"expected a duration such as 30s, 10m, 1h or a number of seconds, got {text!r}")


def _split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise SoakError(f"{what} {text!r}: expected HOST:PORT (or [IPv6]:PORT)")
    return host, int(port)


def resolve(text: str, what: str, allow_remote: bool) -> list[tuple[int, Any]]:
    """(family, sockaddr) for every address of ``text``; loopback only unless allowed."""
    host, port = _split_hostport(text, what)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SoakError(f"{what} {text!r}: cannot resolve {host!r}: {exc.strerror}") from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not allow_remote:
        remote = sorted({sockaddr[0] for _, sockaddr in addresses
                         if not ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback})
        if remote:
            raise SoakError(f"{what} {text!r} is not a loopback address ({', '.join(remote)}); "
                            f"a soak opens hostile connections, so only 127.0.0.0/8 and ::1 "
                            f"are allowed unless --allow-remote is given")
    return addresses


# --- the plan -----------------------------------------------------------------------

def _opt(default: Any, help: str, kind: str, group: str, metavar: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={
        "help": help, "kind": kind, "group": group, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class SoakPlan:
    """What a soak does, and how it judges. The command-line flags are generated from it."""

    target: str
    admin: str
    duration: float = _opt(600.0, "how long the load runs: 30s, 10m, 1h, or seconds", "duration", "run")
    settle: float = _opt(10.0, "how long to keep sampling after the load stopped", "duration", "run")
    interval: float = _opt(1.0, "how often /stats is sampled", "duration", "run")
    cycle: float = _opt(1.0, "length of one load cycle: every cycle sends the same requests "
                        "(sizes, payloads, timings), and memory is compared cycle by cycle; at "
                        "least one --interval", "duration", "run")
    protocol: str = _opt("raw", "what the server speaks: raw bytes (echo), 4-byte length-prefixed "
                         "frames (framed-echo) or lines", "choice:raw,framed,line", "run")
    verify: bool = _opt(True, "expect replies to be an echo of each request and check them "
                        "byte for byte; --no-verify for a server that is not an echo (replies are "
                        "then read and discarded)", "bool", "run")
    seed: int | None = _opt(None, "random seed for sizes and payloads; the report records the "
                            "one used", "int", "run", "N")
    hello: str | None = _opt(None, "sent by every echo and idle client first, once connected "
                             "(\\n escapes; %d becomes a number unique in the run): a chat "
                             "nickname, so the clients join the room and the load is broadcast "
                             "('soak%d\\n' for the chat apps); needs --no-verify", "text", "run",
                             "TEXT")
    echo_clients: int = _opt(20, "echo clients: long-lived, round trips of random size", "count",
                             "behaviours", "N")
    echo_rate: float = _opt(100.0, "round trips per second, all echo clients together (0: as fast "
                            "as replies come)", "rate", "behaviours", "PER_S")
    echo_max_size: int = _opt(4096, "largest echo request in bytes (sizes are uniform from 1)",
                              "positive", "behaviours", "BYTES")
    idle: int = _opt(50, "idle holders: connect, then say nothing", "count", "behaviours", "N")
    churn_rate: float = _opt(20.0, "churners per second: connect, one round trip, close", "rate",
                             "behaviours", "PER_S")
    slowloris: int = _opt(5, "slowloris clients: start a message, then one byte per drip interval",
                          "count", "behaviours", "N")
    drip_interval: float = _opt(2.0, "seconds between a slowloris client's bytes", "duration",
                                "behaviours")
    zero_window: int = _opt(3, "zero-window readers: tiny SO_RCVBUF, send a request that makes the "
                            "server write, never read", "count", "behaviours", "N")
    zero_window_bytes: int = _opt(4 * 1024 * 1024, "bytes each zero-window reader sends; more "
                                  "than the server's socket send buffer (about 1.5 MiB on Linux "
                                  "loopback), so its write blocks", "positive", "behaviours", "BYTES")
    zero_window_hold: float = _opt(60.0, "a zero-window reader the server has not closed is "
                                   "recycled after this long", "duration", "behaviours")
    oversized_rate: float = _opt(1.0, "oversized-frame senders per second: a 0xFFFFFFFF length "
                                 "prefix", "rate", "behaviours", "PER_S")
    oversized_wait: float = _opt(2.0, "how long an oversized-frame sender waits for the server "
                                 "to close", "duration", "behaviours")
    reset_rate: float = _opt(2.0, "abrupt resets per second: half a message, then SO_LINGER 0 "
                             "and close (RST)", "rate", "behaviours", "PER_S")
    reply_timeout: float = _opt(10.0, "an echo reply later than this counts as timed out",
                                "duration", "behaviours")
    max_client_connections: int = _opt(1000, "most client sockets open at once, all behaviours "
                                       "together", "positive", "behaviours", "N")
    warmup: float = _opt(0.25, "fraction of the load left out of the memory verdict (thread "
                         "starts, pools filling, allocator arenas), rounded up to whole cycles, "
                         "at least one", "fraction", "verdict", "FRACTION")
    max_rss_slope: float = _opt(256.0, "a memory trend above this over the steady cycles is "
                                "growth (Theil-Sen slope of the per-cycle medians)", "number",
                                "verdict", "KIB_PER_MIN")
    rss_noise: float = _opt(1024.0, "a steady rise smaller than this over the steady phase is "
                            "inconclusive, not a leak: an allocator settling in grows as much "
                            "on a short run", "number", "verdict", "KIB")
    thread_tolerance: int = _opt(0, "non-spare threads allowed above the baseline at the end",
                                 "count", "verdict", "N")
    fd_tolerance: int = _opt(0, "fds allowed above the baseline at the end", "count", "verdict", "N")
    max_errors: int = _opt(0, "connections allowed to end with close reason 'error' (a handler "
                           "raised)", "count", "verdict", "N")
    allow_remote: bool = _opt(False, "allow a target or admin address that is not loopback",
                              "bool", "run")

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.interval <= 0:
            raise SoakError("--duration and --interval must be positive")
        if self.duration > 7 * 86400:
            raise SoakError("--duration is at most 7 days")
        if not 0 <= self.warmup <= 0.9:
            raise SoakError("--warmup is a fraction of the load phase, from 0 to 0.9")
        if self.cycle > self.duration:
            raise SoakError(f"--cycle {self.cycle:g}s is longer than --duration {self.duration:g}s")
        if self.cycle < self.interval:
            raise SoakError(f"--cycle {self.cycle:g}s needs a sample in every cycle: use an "
                            f"--interval of at most {self.cycle:g}s, or a longer cycle")
        if self.hello is not None and self.verify:
            raise SoakError("--hello needs --no-verify: the replies to a greeting are not an echo")
        long_lived = self.echo_clients + self.idle + self.slowloris + self.zero_window
        if long_lived > self.max_client_connections:
            raise SoakError(f"{long_lived} long-lived clients asked for, more than "
                            f"--max-client-connections {self.max_client_connections}")
        try:
            import resource
        except ImportError:   # not POSIX: nothing to check
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and self.max_client_connections + 64 > soft:
            raise SoakError(f"--max-client-connections {self.max_client_connections} needs more "
                            f"file descriptors than this process may open ({soft}); raise "
                            f"`ulimit -n` or lower it")


def warmup_cycles(plan: SoakPlan, duration: float | None = None) -> int:
    """Cycles of warm-up: the ``warmup`` fraction of the load rounded up, at least one."""
    cycles = int((plan.duration if duration is None else duration) / plan.cycle + 1e-9)
    return max(1, math.ceil(plan.warmup * cycles - 1e-9))


def shortest_judged_duration(plan: SoakPlan) -> float:
    """The shortest --duration with enough steady cycles for a memory verdict."""
    cycles = MIN_STEADY_CYCLES + 1
    while cycles - warmup_cycles(plan, cycles * plan.cycle) < MIN_STEADY_CYCLES:
        cycles += 1
    return cycles * plan.cycle


def plan_fields() -> list[dataclasses.Field]:
    """The plan's settings that are command-line flags (all but target and admin)."""
    return [field for field in dataclasses.fields(SoakPlan) if field.metadata]


# --- watching the server --------------------------------------------------------------

