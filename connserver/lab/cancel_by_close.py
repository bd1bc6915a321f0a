"""Lab 5, cancel-by-close: cancelling by close() from another thread, vs the watchdog's shutdown().

The article cancels a handler with ``context.WithTimeout`` and a goroutine
that calls ``conn.Close()`` on ``ctx.Done()``. In Go that works: the runtime's
poller wakes the blocked ``Read``, and the descriptor is only released once
no call is using it. Written the same way in Python, with a thread that
calls ``sock.close()``, it does neither: on Linux, closing a descriptor does
not wake a thread blocked in ``recv()`` on it, the connection stays open (no
FIN: the blocked call still holds the kernel's socket), and the descriptor
*number* is free at once, so the next ``accept()`` gets it while the old
handler still thinks it is its own.

- Broken (a demonstration): an echo on the standard library's
  ``ThreadingTCPServer`` whose cancel, ``cancel_timeout`` after the
  connection started, is a ``threading.Timer`` that closes the socket. It
  admits at most ``max_connections`` at once.
- Fixed: the same echo on :class:`connserver.Server` with ``max_lifetime``:
  the watchdog (one thread per server, no timer per connection) sets the
  connection's :class:`~connserver.CancelToken` and shuts the socket down
  (never closes it); the blocked ``recv()`` returns at once, the next call
  raises :class:`~connserver.Cancelled`, and the connection ends, counted as
  ``lifetime``. Only the handler's own thread closes the socket.

The load: ``peers`` clients, ``rate`` a second, each says hello, reads the
echo and then stays connected and silent, watching for the server's close.

Both sides keep the same books on their handlers (:class:`CancelBooks`):
how many are still blocked after their cancel was due (judged), the slowest
wake-up from the cancel, and how often a new connection got a descriptor
number that a live handler of this process still holds. Those are only
counted: nothing ever uses a number that is not its own.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
import time
from typing import Any, Callable, Mapping

from ..config import Config
from ..core.handler import Handler
from .driver import Session
from .sides import ConnserverSide, StdlibSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "CloseToCancelEcho", "LifetimeEcho", "CancelBooks"]


# --- the broken side: a demonstration --------------------------------------------------

class CloseToCancelEcho(socketserver.BaseRequestHandler):
    """BROKEN ON PURPOSE, for ``connserver lab cancel-by-close``: cancelled by close()."""

    cancel_timeout = 1.0

    def handle(self) -> None:
        # The article's context.WithTimeout and the goroutine that closes the conn
        # on ctx.Done(), in Python: a timer thread that closes the socket.
        canceller = threading.Timer(self.cancel_timeout, self.request.close)
        canceller.start()
        try:
            # On Linux, close() from another thread does not wake this recv().
            while data := self.request.recv(4096):
                self.request.sendall(data)
        finally:
            canceller.cancel()


# --- the fixed side ---------------------------------------------------------------------

class LifetimeEcho(Handler):
    """The same echo on connserver, run with ``max_lifetime``: the watchdog cancels it."""

    def handle(self) -> None:
        # At max_lifetime the watchdog sets self.cancel and shuts the socket down:
        # recv() returns at once and raises Cancelled; the server closes the socket.
        while data := self.conn.recv():
            self.conn.sendall(data)


# --- the books both sides keep ----------------------------------------------------------

class _Entry:
    __slots__ = ("fd", "due", "woke")

    def __init__(self, fd: int, due: float) -> None:
        self.fd, self.due, self.woke = fd, due, None


class CancelBooks:
    """Each live handler's descriptor number, when its cancel is due, and when it woke.

    Bounded: one entry per live handler (the side's connection bound).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[int, _Entry] = {}   # id(handler) -> its entry
        self._slowest_ended = 0.0
        self.fd_reuses = 0

    def begin(self, key: int, fd: int, due: float) -> None:
        with self._lock:
            # The kernel gives out a number only when it is free: one that a live
            # handler still holds was closed under it, and is now this connection's.
            if any(entry.fd == fd for entry in self._live.values()):
                self.fd_reuses += 1
            self._live[key] = _Entry(fd, due)

    def woke(self, key: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is not None:
                entry.woke = self._clock()

    def end(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None and entry.woke is not None and entry.woke >= entry.due:
                self._slowest_ended = max(self._slowest_ended, entry.woke - entry.due)

    def figures(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            blocked = [entry for entry in self._live.values()
                       if entry.woke is None and entry.due <= now]
            slowest = max([self._slowest_ended, *(now - entry.due for entry in blocked)])
            return {"blocked": len(blocked), "wakeup_ms": slowest * 1000,
                    "fd_reuses": self.fd_reuses}


class _Booked:
    """Mixed into each side's handler by :func:`start_side`: keeps :class:`CancelBooks`."""

    books: CancelBooks

    def cancel_due(self) -> float:
        raise NotImplementedError

    def setup(self) -> None:
        fd = self.request.fileno()   # type: ignore[attr-defined]
        self.books.begin(id(self), fd, self.cancel_due())
        super().setup()   # type: ignore[misc]

    def handle(self) -> None:
        try:
            super().handle()   # type: ignore[misc]
        finally:
            self.books.woke(id(self))

    def finish(self) -> None:
        try:
            super().finish()   # type: ignore[misc]
        finally:
            self.books.end(id(self))


# --- the two sides and the load ---------------------------------------------------------

def start_side(side: str, plan: Plan) -> Side:
    cancel_timeout = plan["cancel_timeout"]
    books = CancelBooks()
    if side == "broken":
        def broken_due(handler: Any) -> float:
            return time.monotonic() + cancel_timeout   # its Timer starts now, in handle()

        handler: Any = type("CloseToCancelEcho", (_Booked, CloseToCancelEcho), {
            "cancel_timeout": cancel_timeout, "books": books, "cancel_due": broken_due})
        return StdlibSide(handler, max_connections=plan["max_connections"],
                          figures=lambda _: {**books.figures(), "lifetime_closes": 0})

    def fixed_due(handler: Any) -> float:
        return handler.conn.created_at + cancel_timeout   # the watchdog's expiry (no jitter)

    def figures(side: ConnserverSide) -> Mapping[str, float]:
        reasons = side.server.stats().close_reasons
        return {**books.figures(), "lifetime_closes": reasons.get("lifetime", 0)}

    handler = type("LifetimeEcho", (_Booked, LifetimeEcho),
                   {"books": books, "cancel_due": fixed_due})
    config = Config(max_lifetime=cancel_timeout, lifetime_jitter=0.0, idle_timeout=60.0,
                    min_spare_threads=0, max_spare_threads=0)
    return ConnserverSide(handler, config, figures=figures)


def _hello(sock: socket.socket) -> bool:
    """Say hello and read the echo; False if the side turned the peer away."""
    sock.sendall(b"hello\n")
    echo = b""
    while len(echo) < 6:
        chunk = sock.recv(64)
        if not chunk:
            return False
        echo += chunk
    return True


def drive(session: Session) -> None:
    """Peers that say hello, then stay silent and watch for the server's close (a FIN)."""
    plan = session.plan
    poller = select.poll()
    peers: dict[int, socket.socket] = {}
    connected = 0
    for _ in session.ticks(plan["rate"]):
        if connected < plan["peers"]:
            connected += 1
            peer = session.connect(keep=True)   # silent after its hello, never closed by us
            if _hello(peer):
                session.count("peers")
                peers[peer.fileno()] = peer
                poller.register(peer, select.POLLIN)
        # A silent peer reads nothing but the server's close: its end of stream (or a reset).
        for fd, _events in poller.poll(0):
            if not session.running():
                return
            poller.unregister(fd)
            try:
                peers.pop(fd).recv(64)
            except OSError:
                pass
            session.count("told")


LAB = Lab(
    number=5, name="cancel-by-close",
    title="cancelling with close() from another thread, vs shutdown() by the watchdog",
    broken="socketserver, a Timer that close()s", fixed="connserver, max_lifetime",
    explanation="cancellation",
    figures=(
        Figure("connections", "open connections"),
        Figure("blocked", "blocked after cancel"),
        # In ms but shown as a count: "16,000.0 ms (+16,000.0)" would not fit its column.
        Figure("wakeup_ms", "slowest wake-up, ms"),
        Figure("fd_reuses", "fd numbers reused"),
        Figure("lifetime_closes", "closed as lifetime"),
        Figure("peers", "peers", source="driver"),
        Figure("told", "peers saw the close", source="driver"),
    ),
    check=Check("blocked",
                leaked="close() from another thread woke no handler: each is still blocked in "
                       "recv(), its connection open, its fd number given to another.",
                held="Each cancel woke its handler at once (the watchdog's shutdown()), and the "
                     "connection closed as lifetime."),
    full=Plan(load_timeout=15.0, settle_timeout=2.0, threshold=125,
              params={"peers": 250, "rate": 20.0, "cancel_timeout": 1.0, "max_connections": 300}),
    short=Plan(load_timeout=2.0, settle_timeout=0.3, threshold=25,
               params={"peers": 50, "rate": 40.0, "cancel_timeout": 0.3, "max_connections": 100}),
    start_side=start_side, drive=drive,
)
