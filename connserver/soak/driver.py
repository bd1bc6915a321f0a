"""The load of ``connserver soak``: every simulated client on one selector loop.

One thread (``connserver-soak-driver``) runs them all with non-blocking sockets
and a heap of timers, so a thousand clients cost one thread, not a thousand,
and the soak itself stays small next to the server it measures. Each
behaviour is a :class:`_Client` subclass; long-lived ones (echo, idle,
slowloris, zero-window) are kept at their count, reconnecting after a pause
when the server closes them; the others (churn, oversized, reset) are started
at their rate, with a bound on how many may be in flight. :meth:`Driver.stop`
closes every socket and joins the thread.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import random
import selectors
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .plan import SoakPlan

__all__ = ["BEHAVIOURS", "Driver"]

BEHAVIOURS = ("echo", "idle", "churn", "slowloris", "zero_window", "oversized", "reset")
_RECONNECT_INTERVAL = 0.5       # a long-lived client the server closed comes back after this
_RAMP_INTERVAL = 1.0            # long-lived clients are opened spread over (at most) this
_TCP_CLOSE_STATES = (7, 8)      # TCP_CLOSE (after a reset), TCP_CLOSE_WAIT (after a FIN)
_OVERSIZED_PREFIX = b"\xff\xff\xff\xff"
_DRIP_FRAME_SIZE = 4096         # the length a slowloris announces, then never completes
_LETTERS = bytes(ord("a") + i % 26 for i in range(256))


# --- what goes on the wire --------------------------------------------------------------

class _Wire:
    """Requests in the target's protocol. For an echo server, the reply equals the request."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def _payload(self, size: int, rng: random.Random) -> bytes:
        data = rng.randbytes(size)
        return data.translate(_LETTERS) if self.protocol == "line" else data

    def message(self, size: int, rng: random.Random) -> bytes:
        if self.protocol == "framed":
            return struct.pack("!I", size) + self._payload(size, rng)
        if self.protocol == "line":
            return self._payload(max(1, size - 1), rng) + b"\n"
        return self._payload(size, rng)

    def unfinished(self, size: int, rng: random.Random) -> bytes:
        """The start of a message that will never be completed."""
        if self.protocol == "framed":
            return struct.pack("!I", 2 * size) + self._payload(size, rng)
        data = self._payload(size, rng)
        return data if self.protocol == "raw" else data.rstrip(b"\n")

    def drip_start(self) -> bytes:
        return struct.pack("!I", _DRIP_FRAME_SIZE) if self.protocol == "framed" else b""

    def bulk(self, total: int, rng: random.Random) -> bytes:
        """About ``total`` bytes of whole requests (each one a frame or line the server takes)."""
        chunk = 1000 if self.protocol == "line" else 65536
        return b"".join(self.message(min(chunk, total - offset), rng)
                        for offset in range(0, total, chunk))


# --- the clients ------------------------------------------------------------------------

class _Client:
    """One simulated client socket; subclasses are the behaviours. Runs on the driver thread."""

    kind = ""
    long_lived = True

    def __init__(self, driver: "Driver", index: int) -> None:
        self.driver = driver
        self.index = index   # which one of its kind (rate behaviours: in this cycle)
        self._rng = random.Random()
        self._rng_cycle = -1
        self.sock: socket.socket | None = None
        self.connecting = False
        self.mask = 0
        self.out = bytearray()
        self.generation = 0   # bumped on close: timers of a closed socket do nothing

    # plumbing
    def rng(self) -> random.Random:
        """This client's random numbers, restarted every cycle from the same seed.

        Per client, not one stream for all: the echo client that sent 812 bytes
        first in one cycle sends them first in every cycle, on the same
        connection, so the server's allocations repeat thread by thread.
        """
        driver = self.driver
        if self._rng_cycle != driver.cycle:
            self._rng.seed(f"{driver.seed}/{self.kind}/{self.index}")
            self._rng_cycle = driver.cycle
        return self._rng

    def count(self, event: str, n: int = 1) -> None:
        self.driver.count(self.kind, event, n)

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay`` unless this socket was closed meanwhile."""
        generation = self.generation

        def fire() -> None:
            if self.generation != generation:
                return
            try:
                action()
            except OSError as exc:
                if self.sock is not None:
                    self.failed(exc)

        self.driver.call_later(delay, fire)

    def start(self) -> None:
        driver = self.driver
        if driver.stopping:
            return
        if len(driver.open) >= driver.plan.max_client_connections:
            self.count("skipped_at_cap")
            self.ended()
            return
        family, sockaddr = driver.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:   # out of fds or buffers: count it, try again later
            self.count("connect_failed")
            self.ended()
            return
        try:
            sock.setblocking(False)
            self.prepare(sock)
            error = sock.connect_ex(sockaddr)
        except OSError as exc:
            error = exc.errno or -1
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            self.count("connect_failed")
            self.ended()
            return
        self.sock, self.connecting = sock, True
        driver.open.add(self)
        self.watch(selectors.EVENT_WRITE)

    def watch(self, mask: int) -> None:
        if self.sock is None or mask == self.mask:
            return
        selector = self.driver.selector
        if not self.mask:
            selector.register(self.sock, mask, self)
        elif not mask:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, mask, self)
        self.mask = mask

    def on_event(self, mask: int) -> None:
        assert self.sock is not None
        if self.connecting:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.count("connect_failed")
                self.close()
                self.ended()
                return
            self.connecting = False
            self.watch(0)
            self.count("connected")
            self.connected()
            return
        if mask & selectors.EVENT_READ:
            self.readable()
        if self.sock is not None and mask & selectors.EVENT_WRITE:
            self.flush()

    def send(self, data: bytes) -> None:
        self.out += data
        self.flush()

    def flush(self) -> None:
        assert self.sock is not None
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            del self.out[:sent]
        reading = self.mask & selectors.EVENT_READ
        self.watch(reading | (selectors.EVENT_WRITE if self.out else 0))

    def receive(self) -> bytes | None:
        """What arrived, or None (after counting it) when the server closed the connection."""
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return b""
        if not data:
            self.server_closed("server_eof")
            return None
        return data

    def server_closed(self, event: str) -> None:
        self.count(event)
        self.close()
        self.ended()

    def failed(self, exc: OSError) -> None:
        """An OSError on this socket: the server reset it, or something else broke."""
        resets = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
        self.server_closed("server_reset" if isinstance(exc, resets) else "socket_error")

    def close(self, reset: bool = False) -> None:
        sock, self.sock = self.sock, None
        self.generation += 1
        self.out.clear()
        if sock is None:
            return
        if self.mask:
            self.driver.selector.unregister(sock)
            self.mask = 0
        self.driver.open.discard(self)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def ended(self) -> None:
        """After the socket is gone: long-lived behaviours come back after a pause."""
        if self.long_lived and not self.driver.stopping:
            self.later(_RECONNECT_INTERVAL, self.start)

    def greet(self) -> None:
        """``--hello``, if given (a nickname: the client joins the room)."""
        hello = self.driver.plan.hello
        if hello is not None:
            self.send((hello.replace("%d", str(next(self.driver.hello_numbers)))).encode())

    # behaviour hooks
    def prepare(self, sock: socket.socket) -> None:
        """Socket options before connecting."""

    def connected(self) -> None:
        raise NotImplementedError

    def readable(self) -> None:
        self.receive()   # read and discard


class _Echo(_Client):
    """Round trips of random size at a steady pace, each reply checked byte for byte."""

    kind = "echo"
    expected: bytes | None = None

    def connected(self) -> None:
        self.watch(selectors.EVENT_READ)
        self.greet()
        self.rounds = itertools.count()
        self.round_trip()

    def pace(self) -> float:
        plan = self.driver.plan
        return plan.echo_clients / plan.echo_rate if plan.echo_rate > 0 else 0.0

    def round_trip(self) -> None:
        driver = self.driver
        rng = self.rng()
        message = driver.wire.message(rng.randint(1, driver.plan.echo_max_size), rng)
        self.started, self.received = time.monotonic(), 0
        self.send(message)
        if not driver.plan.verify:
            self.count("requests")
            self.sent_unverified()
            return
        self.expected = message
        number = next(self.rounds)
        self.number = number
        self.later(driver.plan.reply_timeout,
                   lambda: self.number == number and self.expected is not None and self.timed_out())

    def sent_unverified(self) -> None:
        """No reply is awaited (``--no-verify``): the next request at the pace."""
        self.later(self.pace() or 0.01, self.round_trip)

    def timed_out(self) -> None:
        self.count("timeouts")
        self.close()
        self.ended()

    def readable(self) -> None:
        data = self.receive()
        if not data:
            return
        self.count("bytes_received", len(data))
        expected = self.expected
        if expected is None:
            if self.driver.plan.verify:   # a reply to nothing: the server is not an echo
                self.mismatch()
            return
        if expected[self.received:self.received + len(data)] != data:
            self.mismatch()
            return
        self.received += len(data)
        if self.received == len(expected):
            self.expected = None
            self.completed()

    def mismatch(self) -> None:
        self.count("mismatches")
        self.close()
        self.ended()

    def completed(self) -> None:
        self.count("round_trips")
        self.count("latency_us", int((time.monotonic() - self.started) * 1e6))
        self.later(max(0.0, self.started + self.pace() - time.monotonic()), self.round_trip)


class _Churn(_Echo):
    """Connect, one round trip, close; started at a rate."""

    kind = "churn"
    long_lived = False

    def sent_unverified(self) -> None:
        # Any reply, or a second without one, ends the visit.
        self.later(min(1.0, self.driver.plan.reply_timeout), self.close)

    def readable(self) -> None:
        if not self.driver.plan.verify:
            if self.receive():
                self.close()
            return
        super().readable()

    def completed(self) -> None:
        self.count("round_trips")
        self.close()

    def ended(self) -> None:
        pass


class _Idle(_Client):
    """Connects and says nothing; reads (and drops) whatever the server sends."""

    kind = "idle"

    def connected(self) -> None:
        self.watch(selectors.EVENT_READ)
        self.greet()


class _Slowloris(_Client):
    """Starts a message, then sends one byte of it every ``drip_interval``."""

    kind = "slowloris"

    def connected(self) -> None:
        self.watch(selectors.EVENT_READ)
        start = self.driver.wire.drip_start()
        self.left = _DRIP_FRAME_SIZE
        if start:
            self.send(start)
        self.later(self.driver.plan.drip_interval, self.drip)

    def drip(self) -> None:
        if self.left == 0:   # a frame finished after hours: announce the next one
            self.send(self.driver.wire.drip_start())
            self.left = _DRIP_FRAME_SIZE
        self.send(b"x")
        self.left -= 1
        self.count("drips")
        self.later(self.driver.plan.drip_interval, self.drip)


class _ZeroWindow(_Client):
    """Tiny receive buffer, a request that makes the server write, and never a read."""

    kind = "zero_window"

    def prepare(self, sock: socket.socket) -> None:
        # Before connect(), so the window announced in the handshake is already tiny.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)

    def connected(self) -> None:
        self.send(self.driver.wire.bulk(self.driver.plan.zero_window_bytes, self.rng()))
        self.since = time.monotonic()
        self.later(1.0, self.check)

    def check(self) -> None:
        """Has the server given up on us? Seen without reading: the TCP state or a reset."""
        assert self.sock is not None
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        state = -1
        if hasattr(socket, "TCP_INFO"):
            state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        if error or state in _TCP_CLOSE_STATES:
            self.server_closed("server_reset" if error or state == 7 else "server_eof")
        elif time.monotonic() - self.since >= self.driver.plan.zero_window_hold:
            self.count("recycled")
            self.close()   # unread data: the kernel sends a reset
            self.ended()
        else:
            self.later(1.0, self.check)


class _Oversized(_Client):
    """Announces a 4 GiB frame and waits to be closed."""

    kind = "oversized"
    long_lived = False

    def connected(self) -> None:
        self.watch(selectors.EVENT_READ)
        self.send(_OVERSIZED_PREFIX)
        self.count("sent")
        self.later(self.driver.plan.oversized_wait, self.give_up)

    def give_up(self) -> None:
        self.count("left_open")
        self.close()


class _Reset(_Client):
    """Half a message, then SO_LINGER 0 and close: a reset mid-stream."""

    kind = "reset"
    long_lived = False

    def connected(self) -> None:
        driver = self.driver
        rng = self.rng()
        self.send(driver.wire.unfinished(rng.randint(1024, 32768), rng))
        self.later(rng.uniform(0.02, 0.2), self.abort)

    def abort(self) -> None:
        self.count("resets_sent")
        self.close(reset=True)


# --- the driver ---------------------------------------------------------------------------

class Driver:
    """Runs the simulated clients on one thread until :meth:`stop`."""

    def __init__(self, plan: "SoakPlan", address: tuple[int, Any], seed: int) -> None:
        self.plan = plan
        self.address = address
        self.seed = seed
        self.cycle = 0                  # which load cycle is running (see SoakPlan.cycle)
        self._started: collections.Counter[type] = collections.Counter()   # in this cycle
        self.wire = _Wire(plan.protocol)
        self.hello_numbers = itertools.count(1)   # --hello's %d
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.open: set[_Client] = set()
        self.stopping = False
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._timers: list[tuple[float, int, Callable[[], Any]]] = []
        self._sequence = itertools.count()
        self._counts: dict[str, collections.Counter[str]] = {
            kind: collections.Counter() for kind in BEHAVIOURS}
        self._counts_lock = threading.Lock()   # the progress display reads them
        self._thread = threading.Thread(target=self._run, name="connserver-soak-driver")

    def count(self, kind: str, event: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[kind][event] += n

    def counts(self) -> dict[str, dict[str, int]]:
        with self._counts_lock:
            return {kind: dict(counter) for kind, counter in self._counts.items()}

    def call_later(self, delay: float, action: Callable[[], Any]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), action))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the load; every driver socket is closed when this returns."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the soak driver thread did not stop within %.0f s" % timeout)
        self._wake_w.close()

    def _begin(self) -> None:
        plan = self.plan
        long_lived = [(_Echo, plan.echo_clients), (_Idle, plan.idle),
                      (_Slowloris, plan.slowloris), (_ZeroWindow, plan.zero_window)]
        clients = [cls(self, index) for cls, n in long_lived for index in range(n)]
        random.Random(self.seed).shuffle(clients)
        self._new_cycle(time.monotonic(), first=True)
        # Spread out (no SYN burst), and done within the first cycle: the warm-up.
        ramp = min(_RAMP_INTERVAL, plan.cycle / 2)
        for index, client in enumerate(clients):
            self.call_later(ramp * index / max(1, len(clients)), client.start)
        for cls, rate in ((_Churn, plan.churn_rate), (_Oversized, plan.oversized_rate),
                          (_Reset, plan.reset_rate)):
            if rate > 0:
                self._tick(cls, rate, time.monotonic())

    def _new_cycle(self, due: float, first: bool = False) -> None:
        """Every ``plan.cycle``: the same requests again (each client's rng restarts)."""
        if not first:
            self.cycle += 1
        self._started.clear()
        due += self.plan.cycle
        self.call_later(due - time.monotonic(), lambda: self._new_cycle(due))

    def _tick(self, cls: type[_Client], rate: float, due: float) -> None:
        # In flight per rate behaviour is bounded, so a stalled server does not pile them up.
        in_flight = sum(1 for client in self.open if type(client) is cls)
        if in_flight < 8 + 2 * rate:
            index = self._started[cls]
            self._started[cls] += 1
            cls(self, index).start()
        else:
            self.count(cls.kind, "skipped_in_flight")
        due = max(due + 1.0 / rate, time.monotonic() - 1.0)   # no catch-up storm after a stall
        self.call_later(due - time.monotonic(), lambda: self._tick(cls, rate, due))

    def _run(self) -> None:
        try:
            self._begin()
            while not self._stop.is_set():
                timeout = 0.5
                if self._timers:
                    timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
                for key, mask in self.selector.select(timeout):
                    client = key.data
                    if client is None:
                        self._wake_r.recv(64)
                        continue
                    if client.sock is None:
                        continue   # closed by an earlier event of this round
                    try:
                        client.on_event(mask)
                    except OSError as exc:
                        if client.sock is not None:
                            client.failed(exc)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now and not self._stop.is_set():
                    heapq.heappop(self._timers)[2]()
        except BaseException as exc:   # reported by run_soak, never lost
            self.failure = exc
        finally:
            self.stopping = True
            for client in list(self.open):
                client.close()
            self._timers.clear()
            self.selector.close()
            self._wake_r.close()
