"""Lab 4, slowloris: a per-call timeout a trickling peer resets forever, vs a per-message deadline.

The article's fix for a read that blocks forever is
``conn.SetReadDeadline(time.Now().Add(timeout))`` before each ``conn.Read``:
a bound on each *call*. A peer that sends one byte every interval shorter
than the timeout makes every call succeed, so the timeout never fires and
the message, and its thread, lasts as long as the peer likes. Python's
``settimeout()`` (and ``socketserver.StreamRequestHandler.timeout``, which
applies it) is the same bound per call.

Both sides are a line echo with the same number of seconds, ``timeout``:

- Broken (a demonstration): ``StreamRequestHandler`` with ``timeout`` set, on
  the standard library's ``ThreadingTCPServer``: each ``recv`` under the
  line's ``readline()`` gets ``timeout`` seconds afresh. It admits at most
  ``max_connections`` at once and reads lines of at most ``MAX_LINE`` bytes.
- Fixed: a :class:`connserver.LineHandler` with ``read_timeout``: from a
  line's first byte, the whole line must arrive within ``timeout`` (absolute),
  so a trickled line is cut at its deadline (close reason ``read_deadline``).

The load: ``tricklers`` clients connect at once and each sends one byte of a
line that never ends every ``trickle_interval``; beside them an honest client
does ``honest_rate`` round trips a second, each on a new connection (so the
connections that last are the tricklers').

Both sides time every connection they serve (:class:`Served`): how many are
held now for more than twice ``timeout`` (twice, so that the fixed side's
deadline and the few milliseconds of its close do not count), and the most
held at once (judged). The tricklers measure how long each was served.
"""

from __future__ import annotations

import itertools
import select
import socket
import socketserver
import statistics
import threading
import time
from typing import Any, Callable, Mapping

from ..config import Config
from ..core.handler import LineHandler
from .driver import Session
from .sides import ConnserverSide, StdlibSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "MAX_LINE", "PerCallTimeoutEcho", "LineEcho", "Served"]

#: The broken side's longest line, so a trickler can never make it hold much memory.
MAX_LINE = 4096
_LOOK_INTERVAL = 0.05   # seconds: how soon the tricklers notice the load's end


# --- the broken side: a demonstration --------------------------------------------------

class PerCallTimeoutEcho(socketserver.StreamRequestHandler):
    """BROKEN ON PURPOSE, for ``connserver lab slowloris``: a timeout per call, not per line."""

    # socketserver applies it with settimeout(): each recv() under readline() gets
    # one second afresh, so a byte every half second never lets it fire.
    timeout = 1.0

    def handle(self) -> None:
        while line := self.rfile.readline(MAX_LINE):
            self.wfile.write(line)


# --- the fixed side ---------------------------------------------------------------------

class LineEcho(LineHandler):
    """The same echo on connserver: a line must be whole ``read_timeout`` after its first byte."""

    def handle_line(self, line: str) -> str:
        return line


# --- timing what each side serves -------------------------------------------------------

class Served:
    """How long each connection is served, on either side: the lab's figures.

    ``held_after`` is how long a connection must have been served to count as
    held past its timeout. Bounded: one entry per open connection.
    """

    def __init__(self, held_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.held_after = held_after
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._serving: dict[int, float] = {}   # id -> when it started being served
        self._held_peak = 0

    def begin(self) -> int:
        with self._lock:
            key = next(self._ids)
            self._serving[key] = self._clock()
            return key

    def end(self, key: int) -> None:
        with self._lock:
            self._serving.pop(key, None)

    def figures(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            ages = [now - started for started in self._serving.values()]
            held = sum(age > self.held_after for age in ages)
            self._held_peak = max(self._held_peak, held)
            return {"held": held, "held_peak": self._held_peak}


class _Timed:
    """Mixed into each side's handler by :func:`start_side`: begin and end its timing."""

    served: Served

    def setup(self) -> None:
        self._served_key = self.served.begin()
        super().setup()   # type: ignore[misc]

    def finish(self) -> None:
        try:
            super().finish()   # type: ignore[misc]
        finally:
            self.served.end(self._served_key)


# --- the two sides and the load ---------------------------------------------------------

def start_side(side: str, plan: Plan) -> Side:
    timeout = plan["timeout"]
    served = Served(held_after=2 * timeout)
    if side == "broken":
        handler: Any = type("PerCallTimeoutEcho", (_Timed, PerCallTimeoutEcho),
                            {"timeout": timeout, "served": served})
        return StdlibSide(handler, max_connections=plan["max_connections"],
                          figures=lambda _: {**served.figures(), "deadline_closes": 0})

    def figures(side: ConnserverSide) -> Mapping[str, float]:
        reasons = side.server.stats().close_reasons
        return {**served.figures(), "deadline_closes": reasons.get("read_deadline", 0)}

    handler = type("LineEcho", (_Timed, LineEcho), {"served": served})
    config = Config(idle_timeout=timeout, read_timeout=timeout,
                    min_spare_threads=0, max_spare_threads=0)
    return ConnserverSide(handler, config, figures=figures)


def _trickle(session: Session) -> None:
    """``tricklers`` peers, each sending a byte of an endless line every ``trickle_interval``.

    Between bytes it waits on the peers' sockets, so a server's close is seen
    when it comes: each peer's time held (from its connect to that close, or
    to now) is measured at the peer, and the longest is ``longest_ms``.
    """
    interval = session.plan["trickle_interval"]
    peers: dict[int, tuple[socket.socket, float]] = {}
    for _ in range(session.plan["tricklers"]):
        sock = session.connect()
        peers[sock.fileno()] = (sock, time.monotonic())
        sock.send(b"x")   # the line starts at once: a silent peer is lab 1's lesson
        session.count("trickled")
    poller = select.poll()
    for fd in peers:
        poller.register(fd, select.POLLIN)
    longest = 0.0
    next_byte = time.monotonic() + interval
    while session.running():
        wait = min(next_byte - time.monotonic(), _LOOK_INTERVAL)
        # The server never writes to a trickler: anything readable is its close.
        for fd, _events in poller.poll(max(0.0, wait) * 1000):
            if not session.running():
                return   # the load's end shuts the sockets down: not the server's doing
            poller.unregister(fd)
            sock, connected_at = peers.pop(fd)
            longest = max(longest, time.monotonic() - connected_at)
            session.close(sock)
            session.count("cut")
        now = time.monotonic()
        longest = max([longest, *(now - connected_at for _, connected_at in peers.values())])
        session.set("longest_ms", longest * 1000)
        if now < next_byte:
            continue
        next_byte += interval
        for sock, _ in peers.values():
            try:
                sock.send(b"x")
            except OSError:   # cut meanwhile: a reset, which the next look sees
                continue
            session.count("trickled")


def _honest(session: Session) -> None:
    """One honest client: a line and its echo on a new connection, ``honest_rate`` a second."""
    round_trips: list[float] = []
    for _ in session.ticks(session.plan["honest_rate"]):
        started = time.monotonic()
        sock = session.connect()
        try:
            sock.sendall(b"ping\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            reply = b""
        finally:
            session.close(sock)
        if reply == b"ping\n":
            round_trips.append((time.monotonic() - started) * 1000)
            session.set("honest_ms", statistics.median(round_trips))
        elif session.running():
            session.count("honest_failed")


def drive(session: Session) -> None:
    """The tricklers and the honest client, at once."""
    session.in_parallel(2, lambda index: (_trickle, _honest)[index](session))


LAB = Lab(
    number=4, name="slowloris",
    title="a per-call timeout a trickling peer resets forever, vs an absolute per-message deadline",
    broken="socketserver, settimeout()", fixed="connserver, read_timeout",
    explanation="deadlines",
    figures=(
        Figure("connections", "open connections"),
        Figure("held", "held past timeout"),
        Figure("held_peak", "most held at once"),
        Figure("deadline_closes", "cut at the deadline"),
        Figure("trickled", "bytes trickled", source="driver"),
        Figure("longest_ms", "longest trickler held", "ms", source="driver"),
        Figure("honest_ms", "honest round trip", "ms", source="driver"),
        Figure("honest_failed", "honest trips failed", source="driver"),
    ),
    check=Check("held_peak",
                leaked="Every trickler kept its handler thread far past the timeout: each byte "
                       "reset it, so it never fired.",
                held="Every trickled line was cut at its read deadline, whatever the peer's "
                     "pace; no thread was held past it."),
    full=Plan(load_timeout=15.0, settle_timeout=1.0, threshold=50,
              params={"tricklers": 100, "trickle_interval": 0.5, "timeout": 1.0,
                      "honest_rate": 10.0, "max_connections": 200}),
    short=Plan(load_timeout=2.0, settle_timeout=0.3, threshold=15,
               params={"tricklers": 30, "trickle_interval": 0.1, "timeout": 0.3,
                       "honest_rate": 20.0, "max_connections": 100}),
    start_side=start_side, drive=drive,
)
