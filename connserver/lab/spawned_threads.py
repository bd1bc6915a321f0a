"""Lab 2, spawned-threads: a thread spawned per request and never joined, vs bounded work.

The article's ``go process(message)`` starts a goroutine per message; if
``process`` waits on something that never answers, each one stays forever.
In Python the same line is ``threading.Thread(target=process, ...).start()``,
and each thread that waits forever keeps its stack and everything it refers to.

Both sides are :class:`connserver.LineHandler`\\ s in front of the same
backend, a stand-in for a database or an HTTP API that loses the answer to
one call in ``lost_every`` (:class:`FlakyBackend`).

- Broken (a demonstration): replies ``accepted`` at once and hands the work
  to a new thread, never joined, which calls the backend with no timeout. A
  lost answer keeps that thread forever. For the lab's safety it stops
  spawning at ``max_threads`` threads in the process.
- Fixed: does the work on the connection's own thread (it has one already),
  under a deadline of ``work_timeout`` (``conn.deadline()``), so each request
  costs at most that long and no thread outlives its connection.

The load: ``connections`` clients at once, each sending ``rate`` requests a
second and reading every reply.
"""

from __future__ import annotations

import socket
import threading
from typing import Mapping

from ..config import Config
from ..core.handler import LineHandler
from .driver import Session
from .sides import ConnserverSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "FlakyBackend", "backend_of", "SpawningHandler", "BoundedWorkHandler"]


class FlakyBackend:
    """A backend that never answers one call in ``lost_every``: it waits, then times out.

    With no timeout, a lost call waits until :meth:`close` (the server's
    shutdown closes it, as a server-wide resource), which is what bounds the
    broken side's threads in time; it then returns without an answer.
    """

    def __init__(self, lost_every: int) -> None:
        self.lost_every = lost_every
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0
        self.waiting = 0    # lost calls still waiting for their answer

    def call(self, request: str, timeout: float | None = None) -> str:
        """The answer to ``request``; TimeoutError if it was lost."""
        with self._lock:
            self.calls += 1
            lost = self.calls % self.lost_every == 0
            self.waiting += lost
        if not lost:
            return f"done {request}"
        try:
            if self._closed.wait(timeout):
                return "no answer: the backend was closed"
        finally:
            with self._lock:
                self.waiting -= 1
        raise TimeoutError("the backend did not answer")

    def close(self) -> None:
        self._closed.set()


def backend_of(handler: LineHandler) -> FlakyBackend:
    """The server's backend (one per server, closed at its shutdown)."""
    lost_every = getattr(handler, "lost_every", 4)
    return handler.server.resource("lab-backend", lambda: FlakyBackend(lost_every))


# --- the broken side: a demonstration --------------------------------------------------

def process(backend: FlakyBackend, request: str) -> None:
    backend.call(request)   # no timeout: a lost answer keeps this thread forever


class SpawningHandler(LineHandler):
    """BROKEN ON PURPOSE, for ``connserver lab spawned-threads``: a thread per request."""

    lost_every = 4
    max_threads = 400   # the lab's safety bound, not part of the pattern

    def handle_line(self, line: str) -> str:
        if threading.active_count() >= self.max_threads:
            return "busy"
        # One thread per request, never joined, its work bounded by nothing.
        threading.Thread(target=process, args=(backend_of(self), line)).start()
        return "accepted"


# --- the fixed side ---------------------------------------------------------------------

class BoundedWorkHandler(LineHandler):
    """The work on the connection's own thread, under a deadline."""

    lost_every = 4
    work_timeout = 0.1

    def handle_line(self, line: str) -> str:
        with self.conn.deadline(self.work_timeout) as deadline:
            try:
                return backend_of(self).call(line, timeout=deadline.remaining())
            except TimeoutError:
                return "error: the backend did not answer in time"


# --- the two sides and the load ---------------------------------------------------------

def _figures(side: ConnserverSide) -> Mapping[str, float]:
    backend = side.server.resource("lab-backend", lambda: FlakyBackend(4))
    return {"waiting": backend.waiting, "calls": backend.calls}


def start_side(side: str, plan: Plan) -> Side:
    if side == "broken":
        handler: type[LineHandler] = type("SpawningHandler", (SpawningHandler,), {
            "lost_every": plan["lost_every"], "max_threads": plan["max_threads"]})
    else:
        handler = type("BoundedWorkHandler", (BoundedWorkHandler,), {
            "lost_every": plan["lost_every"], "work_timeout": plan["work_timeout"]})
    config = Config(min_spare_threads=0, max_spare_threads=0)
    return ConnserverSide(handler, config, figures=_figures)


def _read_line(sock: socket.socket) -> bytes:
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        reply += chunk
    return reply


def drive(session: Session) -> None:
    """``connections`` clients, each sending ``rate`` requests a second, reading each reply."""
    def client(index: int) -> None:
        sock = session.connect()
        try:
            for tick in session.ticks(session.plan["rate"]):
                sock.sendall(f"job {index}-{tick}\n".encode())
                reply = _read_line(sock)
                session.count("replies")
                if reply.startswith(b"error"):
                    session.count("errors")
        finally:
            session.close(sock)

    session.in_parallel(session.plan["connections"], client)


LAB = Lab(
    number=2, name="spawned-threads",
    title="threads spawned per request and never joined, vs bounded work",
    broken="a thread per request", fixed="the work under a deadline",
    explanation="lifecycle",
    figures=(
        Figure("connections", "open connections"),
        Figure("waiting", "lost calls waiting"),
        Figure("calls", "backend calls"),
        Figure("replies", "replies", source="driver"),
        Figure("errors", "error replies", source="driver"),
    ),
    check=Check("threads",
                leaked="Threads spawned for requests are still waiting for answers that will "
                       "never come, though every client has gone.",
                held="No thread outlived its connection: each lost answer cost one request "
                     "its work_timeout, and an error reply."),
    full=Plan(load_timeout=15.0, settle_timeout=3.0, threshold=75,
              params={"connections": 4, "rate": 10.0, "lost_every": 4, "work_timeout": 0.1,
                      "max_threads": 400}),
    short=Plan(load_timeout=2.0, settle_timeout=1.0, threshold=15,
               params={"connections": 4, "rate": 15.0, "lost_every": 4, "work_timeout": 0.1,
                       "max_threads": 200}),
    start_side=start_side, drive=drive,
)
