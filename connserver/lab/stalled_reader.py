"""Lab 7, stalled-reader: a broadcast to a reader that stopped reading.

When a subscriber stops reading (a phone in a tunnel, a stuck proxy, a
client with a bug), its TCP window closes and the server can no longer write
to it. A broadcast then has two ways to fail: queue for it without bound, so
memory grows with every message; or wait for it, so every other subscriber
waits too. The naive hub below manages both at once.

Both sides are the same relay: every connection is subscribed, is greeted
with ``subscribed``, and every line it sends is published to all the others.

- Broken (a demonstration): :class:`NaiveHub` on the standard library's
  ``socketserver``: a queue per subscriber with no bound, and one writer
  thread that empties them in turn with a blocking ``sendall``. Once the
  stalled reader's socket is full, the writer waits in ``sendall`` for a
  reader that will never read: nobody else gets anything, and every queue
  grows. The lab caps it at ``max_queued_bytes`` in all (past that messages
  are dropped and counted).
- Fixed: connserver's :class:`~connserver.Hub`: the same shape (a queue per
  subscriber, one writer thread), but its queues are bounded in bytes
  (``max_queue_bytes``), its writer never blocks on a socket (non-blocking
  sends, ``epoll`` for the full ones), and a subscriber whose queue is full is
  a slow consumer: disconnected with reason ``slow_consumer``.

The load: one reader that reads its greeting and then never reads again (it
stays open, like a vanished peer), ``honest`` readers that read everything,
and a publisher sending ``rate`` messages of ``size`` bytes a second. Each
message carries its number; the load times its delivery to every honest
reader.
"""

from __future__ import annotations

import collections
import socket
import socketserver
import threading
import time
from typing import Mapping

from ..config import Config
from ..core.handler import LineHandler
from .driver import Session
from .sides import ConnserverSide, StdlibSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "NaiveHub", "NaiveRelay", "Relay"]

GREETING = b"subscribed\n"


# --- the broken side: a demonstration --------------------------------------------------

class NaiveHub:
    """BROKEN ON PURPOSE, for ``connserver lab stalled-reader``: unbounded queues, a blocking writer."""

    def __init__(self, max_queued_bytes: int) -> None:
        self.max_queued_bytes = max_queued_bytes   # the lab's bound, not part of the pattern
        self.lock = threading.Condition()
        self.queues: dict[socket.socket, collections.deque[bytes]] = {}
        self.queued_bytes = 0
        self.capped = 0   # messages the lab's bound dropped
        threading.Thread(target=self._write, name="naive-hub-writer").start()

    def subscribe(self, sock: socket.socket) -> None:
        with self.lock:
            self.queues[sock] = collections.deque()

    def unsubscribe(self, sock: socket.socket) -> None:
        with self.lock:
            queue = self.queues.pop(sock, ())
            self.queued_bytes -= sum(len(message) for message in queue)

    def publish(self, message: bytes, exclude: socket.socket) -> None:
        with self.lock:
            for sock, queue in self.queues.items():
                if sock is exclude:
                    continue
                if self.queued_bytes + len(message) > self.max_queued_bytes:
                    self.capped += 1
                    continue
                queue.append(message)   # no bound: a reader that stopped reading grows it forever
                self.queued_bytes += len(message)
            self.lock.notify()

    def _write(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: any(self.queues.values()))
                subscribers = list(self.queues.items())
            for sock, queue in subscribers:   # each in turn
                while queue:
                    with self.lock:
                        message = queue.popleft()
                        self.queued_bytes -= len(message)
                    try:
                        # Blocks while this reader's window is shut, and everyone waits.
                        sock.sendall(message)
                    except OSError:   # the subscriber has gone
                        self.unsubscribe(sock)
                        break


class NaiveRelay(socketserver.StreamRequestHandler):
    """BROKEN ON PURPOSE, for ``connserver lab stalled-reader``: a relay on the naive hub."""

    send_buffer = 65536

    def handle(self) -> None:
        hub: NaiveHub = self.server.hub   # type: ignore[attr-defined]
        # The kernel's share bounded, on both sides: SO_SNDBUF turns off its growth.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        hub.subscribe(self.request)
        try:
            self.request.sendall(GREETING)
            for line in self.rfile:
                hub.publish(line, exclude=self.request)
        finally:
            hub.unsubscribe(self.request)


# --- the fixed side ---------------------------------------------------------------------

class Relay(LineHandler):
    """The same relay on connserver's Hub: byte-bounded queues, slow consumers disconnected."""

    max_queue_bytes = 256 * 1024
    send_buffer = 65536

    def handle(self) -> None:
        # The kernel's share bounded, on both sides: SO_SNDBUF turns off its growth.
        self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        self.hub = self.server.hub("lab", max_queue_bytes=self.max_queue_bytes)
        with self.hub.subscribe(self.conn) as self.subscription:
            self.send_line("subscribed")   # queued, in order with the broadcasts
            super().handle()               # the read loop: handle_line per line

    def handle_line(self, line: str) -> None:
        self.hub.publish(line.encode() + b"\n", exclude=self.subscription)


# --- the two sides and the load ---------------------------------------------------------

def _naive_figures(side: StdlibSide) -> Mapping[str, float]:
    hub: NaiveHub = side.server.hub   # type: ignore[attr-defined]
    with hub.lock:
        return {"subscribers": len(hub.queues), "queued": hub.queued_bytes,
                "slow_consumers": 0, "capped": hub.capped}


def _hub_figures(side: ConnserverSide) -> Mapping[str, float]:
    stats = side.server.hub("lab").statistics()
    return {"subscribers": stats.subscribers, "queued": stats.queued_bytes,
            "slow_consumers": stats.slow_consumers, "capped": 0}


def start_side(side: str, plan: Plan) -> Side:
    connections = plan["honest"] + 2
    if side == "broken":
        broken = type("NaiveRelay", (NaiveRelay,), {"send_buffer": plan["send_buffer"]})
        return StdlibSide(broken, max_connections=connections,
                          attributes={"hub": NaiveHub(plan["max_queued_bytes"])},
                          figures=_naive_figures)
    handler = type("Relay", (Relay,), {"max_queue_bytes": plan["max_queue_bytes"],
                                       "send_buffer": plan["send_buffer"]})
    config = Config(max_connections=connections, min_spare_threads=0, max_spare_threads=0)
    fixed = ConnserverSide(handler, config, figures=_hub_figures)
    fixed.server.hub("lab", max_queue_bytes=plan["max_queue_bytes"])   # made with its bound
    return fixed


class _Lines:
    """Lines from a socket with a timeout, keeping what follows the last one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def next(self) -> bytes | None:
        """The next line; None on a timeout; ConnectionError at the end of the stream."""
        while b"\n" not in self.pending:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line


class _Deliveries:
    """When each message was sent, and how late it reached each honest reader."""

    def __init__(self, readers: int) -> None:
        self.lock = threading.Lock()
        self.sent_at: list[float] = []
        self.latencies: list[float] = []
        self.received = [0] * readers   # messages each reader has had (they come in order)

    def p99_ms(self) -> float:
        """p99 over every (message, reader): its latency, or its age if it has not arrived."""
        now = time.monotonic()
        with self.lock:
            times = list(self.latencies)
            for count in self.received:
                times.extend(now - sent for sent in self.sent_at[count:])
        if not times:
            return 0.0
        times.sort()
        return times[min(len(times) - 1, int(len(times) * 0.99))] * 1000


def drive(session: Session) -> None:
    """A reader that stops reading, ``honest`` that read all, a publisher at ``rate`` a second."""
    plan = session.plan
    stalled = session.connect(keep=True)   # open and silent until the sides have ended
    if _Lines(stalled).next() != GREETING.strip():
        raise ConnectionError("no greeting")
    # From here it never reads. A small receive buffer fills sooner; the server sees a shut window.
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sockets = [session.connect() for _ in range(plan["honest"] + 1)]
    for sock in sockets:
        if _Lines(sock).next() != GREETING.strip():
            raise ConnectionError("no greeting")
    publisher, readers = sockets[0], sockets[1:]
    deliveries = _Deliveries(len(readers))
    filler = b"." * (plan["size"] - 16)

    def publish() -> None:
        shown = time.monotonic()
        for seq in session.ticks(plan["rate"]):
            with deliveries.lock:
                deliveries.sent_at.append(time.monotonic())
            publisher.sendall(b"%15d" % seq + filler + b"\n")
            session.count("published")
            if time.monotonic() - shown >= 0.25:
                shown = time.monotonic()
                session.set("honest_p99_ms", deliveries.p99_ms())
        session.set("honest_p99_ms", deliveries.p99_ms())

    def read(index: int) -> None:
        sock = readers[index]
        sock.settimeout(0.1)   # to notice the load's end while nothing comes
        lines = _Lines(sock)
        while session.running():
            try:
                line = lines.next()
            except OSError:
                if session.running():
                    raise
                return   # the load's end shut the socket down
            if line is None:
                continue
            arrived = time.monotonic()
            with deliveries.lock:
                deliveries.latencies.append(arrived - deliveries.sent_at[int(line[:15])])
                deliveries.received[index] += 1
            session.count("delivered")

    session.in_parallel(len(sockets), lambda index: publish() if index == 0 else read(index - 1))


LAB = Lab(
    number=7, name="stalled-reader",
    title="a broadcast to a reader that stopped reading: unbounded queues and a stalled "
          "writer, vs bounded queues",
    broken="unbounded queues, blocking writer", fixed="Hub: bounded, slow consumer cut",
    explanation="broadcast",
    figures=(
        Figure("subscribers", "subscribers"),
        Figure("queued", "queued bytes", "MiB"),
        Figure("slow_consumers", "slow consumers cut"),
        Figure("capped", "dropped by lab's cap"),
        Figure("published", "messages published", source="driver"),
        Figure("delivered", "delivered to honest", source="driver"),
        Figure("honest_p99_ms", "honest p99 latency", "ms", source="driver"),
    ),
    check=Check("queued",
                leaked="The reader that stopped reading holds the writer in sendall(); its "
                       "queue grows with every message, and the honest readers get nothing.",
                held="The stalled reader was cut as a slow consumer once its queue was full; "
                     "the honest readers never waited for it."),
    full=Plan(load_timeout=15.0, settle_timeout=2.0, threshold=4 * 1024 * 1024,
              params={"honest": 4, "rate": 125.0, "size": 4096, "send_buffer": 65536,
                      "max_queue_bytes": 256 * 1024, "max_queued_bytes": 64 * 1024 * 1024}),
    short=Plan(load_timeout=2.4, settle_timeout=0.5, threshold=1024 * 1024,
               params={"honest": 4, "rate": 250.0, "size": 4096, "send_buffer": 65536,
                       "max_queue_bytes": 256 * 1024, "max_queued_bytes": 32 * 1024 * 1024}),
    start_side=start_side, drive=drive,
)
