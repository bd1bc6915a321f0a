"""Lab 6, rate-limiter: the article's rate limiter, a ticker per limiter, vs a clock-computed bucket.

The article's ``NewRateLimiter(rate)`` fills a buffered channel with ``rate``
tokens and starts a goroutine that puts one token back each time a
``time.Ticker`` ticks, once a second. Used per connection, as the article
suggests, it has two bugs:

- nothing ever stops the goroutine or its ticker: every limiter ever made keeps
  one running (and keeps the limiter alive), so a limiter per connection leaks
  one per connection;
- it refills **one token a second, whatever** ``rate`` **says**:
  ``NewRateLimiter(100)`` lets 100 through at once, then one a second.

Both sides are the same :class:`connserver.LineHandler` echo, one reply per
token; only the limiter differs.

- Broken (a demonstration): :class:`TickerRateLimiter`, the article's code in
  Python, a thread per limiter. The lab bounds it: at most ``max_tickers``
  tickers in the process (past that a connection is answered ``busy``), and
  they end when the side's server shuts down (:class:`Tickers`).
- Fixed: :class:`connserver.TokenBucket`, whose refill is computed from the
  clock when tokens are taken (``Config(rate=...)`` gives every connection
  one): no thread, and ``rate`` tokens a second.

The load: ``clients`` clients at once, each opening one connection after
another for the whole load, each connection living ``lifetime`` seconds and
sending requests as fast as the replies come.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from typing import Iterator, Mapping

from ..config import Config
from ..core.handler import LineHandler
from ..core.rate_limits import TokenBucket
from .driver import Session
from .sides import ConnserverSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "Tickers", "TickerRateLimiter", "TickerLimitedEcho", "BucketLimitedEcho"]


class Tickers:
    """The lab's bound on the broken side's ticker threads: counted, capped, ended at shutdown.

    Not part of the pattern: the article's goroutines run until the process
    exits. This is a server resource (``server.resource``), so the server's
    shutdown calls :meth:`close`, which ends every ticker at its next tick.
    """

    def __init__(self, max_tickers: int) -> None:
        self.max_tickers = max_tickers
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self.live = 0

    def full(self) -> bool:
        return self.live >= self.max_tickers

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        with self._lock:
            self.live += 1
        try:
            yield
        finally:
            with self._lock:
                self.live -= 1

    def close(self) -> None:
        self.stopped.set()


def tickers_of(handler: LineHandler) -> Tickers:
    """The server's :class:`Tickers` (one per server, closed at its shutdown)."""
    max_tickers = getattr(handler, "max_tickers", 400)
    return handler.server.resource("lab-tickers", lambda: Tickers(max_tickers))


# --- the broken side: a demonstration --------------------------------------------------

class TickerRateLimiter:
    """BROKEN ON PURPOSE, for ``connserver lab rate-limiter``: the article's ``NewRateLimiter``."""

    def __init__(self, rate: int, bound: Tickers) -> None:
        self.tokens: queue.Queue[None] = queue.Queue(maxsize=rate)   # make(chan struct{}, rate)
        for _ in range(rate):
            self.tokens.put_nowait(None)
        # go func() { ticker := time.NewTicker(time.Second); for range ticker.C {...} }()
        # Nothing ever stops it, and it holds self: the limiter lives as long as it does.
        threading.Thread(target=self._tick, args=(bound,)).start()

    def _tick(self, bound: Tickers) -> None:
        with bound.counted():
            while not bound.stopped.wait(1.0):   # (the lab's bound: the side's shutdown)
                try:
                    self.tokens.put_nowait(None)   # one token a second, whatever the rate
                except queue.Full:
                    pass

    def acquire(self) -> None:
        self.tokens.get()


class TickerLimitedEcho(LineHandler):
    """BROKEN ON PURPOSE, for ``connserver lab rate-limiter``: the article's limiter per connection."""

    rate = 20
    max_tickers = 400   # the lab's safety bound, not part of the pattern

    def setup(self) -> None:
        tickers = tickers_of(self)
        self.limiter = None if tickers.full() else TickerRateLimiter(self.rate, tickers)

    def handle_line(self, line: str) -> str:
        if self.limiter is None:
            return "busy"
        self.limiter.acquire()
        return line


# --- the fixed side ---------------------------------------------------------------------

class BucketLimitedEcho(LineHandler):
    """The same echo with a TokenBucket per connection: plain data, refilled from the clock."""

    rate = 20

    def setup(self) -> None:
        # rate tokens a second, and the same burst as the article's: rate saved up.
        self.limiter = TokenBucket(self.rate, burst=self.rate)

    def handle_line(self, line: str) -> str:
        # Sleeps exactly as long as the missing token needs; a cancel wakes it.
        self.limiter.acquire(cancel=self.conn.cancel_token)
        return line


# --- the two sides and the load ---------------------------------------------------------

def start_side(side: str, plan: Plan) -> Side:
    if side == "broken":
        handler: type[LineHandler] = type("TickerLimitedEcho", (TickerLimitedEcho,), {
            "rate": plan["rate"], "max_tickers": plan["max_tickers"]})
    else:
        handler = type("BucketLimitedEcho", (BucketLimitedEcho,), {"rate": plan["rate"]})

    def figures(side: ConnserverSide) -> Mapping[str, float]:
        tickers = side.server.resource("lab-tickers", lambda: Tickers(plan["max_tickers"]))
        return {"tickers": tickers.live}

    config = Config(min_spare_threads=0, max_spare_threads=0)
    return ConnserverSide(handler, config, figures=figures)


class _SteadyRate:
    """The limiters' refill rate: replies beyond each connection's first burst, per second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replies = 0
        self.seconds = 0.0

    def add(self, replies: int, seconds: float) -> float:
        """Add one connection's; return the rate over all of them."""
        with self._lock:
            self.replies += replies
            self.seconds += seconds
            return self.replies / self.seconds if self.seconds > 0 else 0.0


def _one_connection(session: Session, steady: _SteadyRate) -> None:
    """Request, reply, as fast as the replies come, for ``lifetime``; then close."""
    rate, lifetime = session.plan["rate"], session.plan["lifetime"]
    sock = session.connect()
    connected_at = time.monotonic()
    ends_at = connected_at + lifetime
    replies, pending, last_reply_at = 0, b"", connected_at
    try:
        while session.running():
            left = ends_at - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)   # a reply still waiting for its token when the time is up
            sock.sendall(b"ping %d\n" % replies)
            try:
                while b"\n" not in pending:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    pending += chunk
            except (socket.timeout, OSError):
                if session.running() and time.monotonic() < ends_at:
                    raise
                break   # the time was up, or the load's end shut the socket down
            _, pending = pending.split(b"\n", 1)
            replies += 1
            last_reply_at = time.monotonic()
            session.count("replies")
    finally:
        session.close(sock)
    session.count("conns_made")
    if replies > rate:
        # Both limiters start with a burst of `rate` tokens and refill from the start:
        # the refill rate is the replies beyond the burst over the time they took.
        session.set("rate_measured", steady.add(replies - rate, last_reply_at - connected_at))


def drive(session: Session) -> None:
    """``clients`` clients, each a connection after another of ``lifetime`` seconds."""
    session.set("rate_configured", session.plan["rate"])
    steady = _SteadyRate()

    def client(index: int) -> None:
        while session.running():
            _one_connection(session, steady)

    session.in_parallel(session.plan["clients"], client)


LAB = Lab(
    number=6, name="rate-limiter",
    title="the article's rate limiter, a ticker thread per limiter, vs a clock-computed bucket",
    broken="a ticker thread per limiter", fixed="TokenBucket, no thread",
    explanation="rate-limiting",
    figures=(
        Figure("connections", "open connections"),
        Figure("tickers", "ticker threads"),
        Figure("conns_made", "connections made", source="driver"),
        Figure("replies", "replies", source="driver"),
        Figure("rate_configured", "configured rate/conn", "/s", source="driver"),
        Figure("rate_measured", "measured rate/conn", "/s", source="driver"),
    ),
    check=Check("threads",
                leaked="Every connection that had a limiter left its ticker thread behind, "
                       "ticking for a limiter nobody uses.",
                held="Each bucket was plain data: it went with its connection, and no thread "
                     "outlived one."),
    full=Plan(load_timeout=15.0, settle_timeout=2.0, threshold=30,
              params={"clients": 8, "lifetime": 2.0, "rate": 20, "max_tickers": 400}),
    short=Plan(load_timeout=2.4, settle_timeout=0.5, threshold=8,
               params={"clients": 8, "lifetime": 1.2, "rate": 20, "max_tickers": 200}),
    start_side=start_side, drive=drive,
)
