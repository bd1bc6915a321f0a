"""Lab 1, vanished-peer: a handler thread blocked forever on a peer that vanished.

The article's ``handleWS`` loops on ``conn.ReadMessage()`` with no deadline;
when the network drops a peer without a FIN (a cable pulled, a NAT entry
expired, a laptop closed), the read waits forever, and so does the goroutine
with its stack. Python's thread per connection is the same, only dearer.

- Broken (a demonstration): an echo on the standard library's
  ``socketserver.ThreadingTCPServer`` with no timeout, as socketserver's own
  examples write it. It admits at most ``max_blocked`` connections.
- Fixed: the same echo on :class:`connserver.Server`: every wait for the next
  message is bounded by ``idle_timeout`` (and a message, once started, by
  ``read_timeout``), so the thread ends and the connection is counted as
  closed ``idle``.

The load: ``peers`` clients, ``rate`` a second, each says hello, reads the
echo and then vanishes: the driver holds its socket open and silent.
"""

from __future__ import annotations

import socketserver
import time
from typing import Mapping

from ..config import Config
from ..core.handler import Handler
from .driver import Session
from .sides import ConnserverSide, StdlibSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "NoDeadlineEcho", "Echo"]


# --- the broken side: a demonstration --------------------------------------------------

class NoDeadlineEcho(socketserver.BaseRequestHandler):
    """BROKEN ON PURPOSE, for ``connserver lab vanished-peer``: echo with no deadline."""

    def handle(self) -> None:
        # No timeout: if the peer vanishes, recv() waits for it forever.
        while data := self.request.recv(4096):
            self.request.sendall(data)


# --- the fixed side ---------------------------------------------------------------------

class Echo(Handler):
    """The same echo on connserver: each wait is bounded by ``idle_timeout``."""

    def handle(self) -> None:
        # recv() waits at most idle_timeout for the next message, then raises
        # DeadlineExceeded: the connection ends as "idle" and the thread is free.
        while data := self.conn.recv():
            self.conn.sendall(data)


# --- the two sides and the load ---------------------------------------------------------

def _no_deadline_closes(side: StdlibSide) -> Mapping[str, float]:
    return {"deadline_closes": 0}   # it has no deadline to close anything


def _deadline_closes(side: ConnserverSide) -> Mapping[str, float]:
    reasons = side.server.stats().close_reasons
    return {"deadline_closes": reasons.get("idle", 0) + reasons.get("read_deadline", 0)}


def start_side(side: str, plan: Plan) -> Side:
    if side == "broken":
        return StdlibSide(NoDeadlineEcho, max_connections=plan["max_blocked"],
                          figures=_no_deadline_closes)
    config = Config(idle_timeout=plan["idle_timeout"], read_timeout=plan["idle_timeout"],
                    min_spare_threads=0, max_spare_threads=0)
    return ConnserverSide(Echo, config, figures=_deadline_closes)


def drive(session: Session) -> None:
    """Peers that say hello, read the echo, and vanish (held open, silent: no FIN)."""
    for _ in session.ticks(session.plan["rate"], limit=session.plan["peers"]):
        peer = session.connect(keep=True)
        started = time.monotonic()
        peer.sendall(b"hello\n")
        if peer.recv(64):   # b"" if the broken side's bound (max_blocked) turned it away
            session.count("vanished")
            session.set("echo_ms", (time.monotonic() - started) * 1000)


LAB = Lab(
    number=1, name="vanished-peer",
    title="a handler thread blocked forever on a peer that vanished, vs idle and read deadlines",
    broken="socketserver, no timeout", fixed="connserver, idle_timeout",
    explanation="deadlines",
    figures=(
        Figure("connections", "open connections"),
        Figure("deadline_closes", "closed by a deadline"),
        Figure("vanished", "peers vanished", source="driver"),
        Figure("echo_ms", "last hello echo", "ms", source="driver"),
    ),
    check=Check("threads",
                leaked="Handler threads are still blocked in recv() on peers that are gone; "
                       "nothing will ever wake them.",
                held="Every vanished peer's connection ended at its idle deadline, and its "
                     "thread with it."),
    full=Plan(load_timeout=15.0, settle_timeout=4.0, threshold=150,
              params={"peers": 300, "rate": 20.0, "idle_timeout": 2.0, "max_blocked": 400}),
    short=Plan(load_timeout=2.0, settle_timeout=1.0, threshold=20,
               params={"peers": 40, "rate": 20.0, "idle_timeout": 0.5, "max_blocked": 100}),
    start_side=start_side, drive=drive,
)
