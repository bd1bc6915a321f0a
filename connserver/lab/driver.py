"""The bounded load: the same script against each side at once, on loopback.

A lab's ``drive(session)`` runs once per side, each in a thread of its own
(``connserver-lab-drive-<side>``), for the plan's ``load_timeout``. The
:class:`Session` it gets is the only way it touches the network, and bounds
it: sockets go only to the side's 127.0.0.1 port, at most
:data:`MAX_SOCKETS` of them, every socket call has a timeout, and
:meth:`Session.running` turns false when the load time is over (a drive
loop checks it, and :meth:`Session.wait` returns at once then).

A side's other ports (an admin endpoint) are in :attr:`Session.ports`, for a
load that is a tool with bounds of its own: lab 8's is ``connserver soak``,
which opens its own sockets, loopback only and at most its
``max_client_connections``.

Sockets opened with ``connect(keep=True)`` are peers that *vanished*: the
driver holds them open and silent until the sides' processes have ended, so
the server sees neither data nor a FIN, as when a cable is pulled. All others
are closed when the drive returns, or at the latest when the load ends.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterator, Mapping, Sequence

from .spec import Plan

__all__ = ["Session", "Load", "LoadLimit", "MAX_SOCKETS", "MAX_PARALLEL", "SOCKET_TIMEOUT"]

MAX_SOCKETS = 1000       # per side: far above any lab's plan, far below a machine's limits
MAX_PARALLEL = 32        # client threads per side (Session.in_parallel)
SOCKET_TIMEOUT = 5.0     # seconds, on every socket the driver opens
_GRACE_TIMEOUT = 0.3     # seconds a drive has to notice the load's end by itself
_JOIN_TIMEOUT = 10.0


class LoadLimit(RuntimeError):
    """The drive asked for more than the driver allows (a lab bug, not the learner's)."""


class Session:
    """One side's load: its address, the plan, bounded sockets, counts shown as figures."""

    def __init__(self, side: str, address: tuple[str, int], plan: Plan,
                 stop: threading.Event, ports: Mapping[str, int] | None = None) -> None:
        if address[0] != "127.0.0.1":
            raise LoadLimit(f"the lab load goes to 127.0.0.1 only, not {address[0]}")
        self.side = side
        self.address = address
        #: The side's other ports on 127.0.0.1, by name (``{"admin": 41234}``), if it has any.
        self.ports: dict[str, int] = dict(ports or {})
        self.plan = plan
        self._stop = stop
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._active: list[socket.socket] = []
        self._kept: list[socket.socket] = []

    def running(self) -> bool:
        """True until the plan's load time is over."""
        return not self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return whether the load is still running."""
        return not self._stop.wait(max(0.0, seconds))

    def ticks(self, rate: float, limit: int | None = None) -> Iterator[int]:
        """Yield 0, 1, 2… at ``rate`` per second until the load ends (or ``limit`` ticks).

        A tick that is late is not skipped: the schedule catches up, so each
        side gets the same number of ticks unless it is too slow to take them.
        """
        start = time.monotonic()
        tick = 0
        while self.running() and (limit is None or tick < limit):
            if not self.wait(start + tick / rate - time.monotonic()):
                return
            yield tick
            tick += 1

    def in_parallel(self, count: int, work: Callable[[int], None]) -> None:
        """Run ``work(0)`` … ``work(count - 1)`` at once, each in a thread; wait for all.

        For loads that are several clients at a time (at most
        :data:`MAX_PARALLEL`). An exception in one is raised here once all have
        ended, so the load is reported as failed.
        """
        if not 1 <= count <= MAX_PARALLEL:
            raise LoadLimit(f"in_parallel({count}): from 1 to {MAX_PARALLEL} clients at once")
        failures: list[BaseException] = []

        def run(index: int) -> None:
            try:
                work(index)
            except Exception as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(index,),
                                    name=f"connserver-lab-drive-{self.side}-{index}")
                   for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.plan.load_timeout + _JOIN_TIMEOUT)
        if failures:
            raise failures[0]

    def connect(self, keep: bool = False) -> socket.socket:
        """A new client socket to the side, with a timeout on every call.

        ``keep=True``: the peer vanishes after this; the socket stays open and
        silent until the sides' processes have ended (never close it yourself).
        """
        with self._lock:
            if len(self._active) + len(self._kept) >= MAX_SOCKETS:
                raise LoadLimit(f"more than {MAX_SOCKETS} sockets open to the {self.side} side")
        sock = socket.create_connection(self.address, timeout=SOCKET_TIMEOUT)
        with self._lock:
            (self._kept if keep else self._active).append(sock)
        return sock

    def close(self, sock: socket.socket) -> None:
        """Close a socket from :meth:`connect` (not a kept one). Close them this way,
        not with ``sock.close()``: :meth:`interrupt` may be shutting it down."""
        with self._lock:
            if sock in self._active:
                self._active.remove(sock)
            sock.close()

    def count(self, key: str, amount: float = 1) -> None:
        """Add ``amount`` to the driver figure ``key`` (shown live, like the others)."""
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def set(self, key: str, value: float) -> None:
        """Set the driver figure ``key``."""
        with self._lock:
            self._counts[key] = value

    def figures(self) -> dict[str, float]:
        with self._lock:
            return dict(self._counts)

    def interrupt(self) -> None:
        """Wake a drive blocked on one of its sockets: shut them down (the drive closes them)."""
        # Under the lock that close() holds: a shutdown never meets a descriptor
        # number closed and reused meanwhile (docs/explanation/cancellation.md).
        with self._lock:
            for sock in self._active:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:   # not connected any more
                    pass

    def close_open(self) -> None:
        """Close every socket but the kept ones."""
        with self._lock:
            sockets, self._active = self._active, []
            for sock in sockets:
                sock.close()

    def close_all(self) -> None:
        """Close every socket, the kept ones too: only once the sides have ended."""
        self.close_open()
        with self._lock:
            sockets, self._kept = self._kept, []
        for sock in sockets:
            sock.close()


class Load:
    """Runs ``drive`` against every side at once, one thread per side.

    ``counts`` are the driver figures that are counts: they start at 0.
    """

    def __init__(self, drive: Callable[[Session], None], plan: Plan,
                 addresses: Mapping[str, tuple[str, int]], counts: Sequence[str] = (),
                 ports: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self._stop = threading.Event()
        self.sessions = {side: Session(side, address, plan, self._stop, (ports or {}).get(side))
                         for side, address in addresses.items()}
        for session in self.sessions.values():
            for key in counts:   # a count nothing happened to yet is 0, not missing
                session.set(key, 0)
        self.failures: dict[str, str] = {}
        self._drive = drive
        self._threads = [threading.Thread(target=self._run, args=(session,),
                                          name=f"connserver-lab-drive-{side}")
                         for side, session in self.sessions.items()]

    def _run(self, session: Session) -> None:
        try:
            self._drive(session)
        except Exception as exc:   # shown in the verdict: the lab could not run its load
            self.failures[session.side] = f"{type(exc).__name__}: {exc}"
        finally:
            session.close_open()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def figures(self) -> dict[str, dict[str, float]]:
        return {side: session.figures() for side, session in self.sessions.items()}

    def stop(self) -> None:
        """End the load: drives see running() turn false; their threads are joined.

        A drive still waiting on a reply after a short grace has its sockets shut
        down, so the load ends on time whatever the side does.
        """
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(_GRACE_TIMEOUT)
        for session in self.sessions.values():
            session.interrupt()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(_JOIN_TIMEOUT)
                if thread.is_alive():
                    self.failures.setdefault(thread.name, "the drive did not end within "
                                             f"{_JOIN_TIMEOUT:g} s of the load's end")

    def close(self) -> None:
        """Close every socket, the vanished peers' too (after the sides have ended)."""
        for session in self.sessions.values():
            session.close_all()
