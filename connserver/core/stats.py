"""Server-wide counters, and the frozen records ``Server.stats()`` and
``Server.connections()`` return."""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Mapping

from .deadline import Clock, monotonic
from ..errors import CloseReason

__all__ = ["ConnectionInfo", "ServerStats", "ServerStatistics"]


@dataclasses.dataclass(frozen=True)
class ServerStatistics:
    """A consistent snapshot of the server's counters."""

    connections_active: int
    connections_total: int        # connections admitted since start
    connections_rejected: int     # closed at accept time by a limit
    close_reasons: Mapping[str, int]
    deadline_hits: Mapping[str, int]   # DeadlineExceeded raised, by phase
    handler_threads: int          # threads serving a connection now
    spare_threads: int            # threads waiting for the next connection
    uptime: float
    bytes_received: int = 0       # since start, by every connection (live ones so far)
    bytes_sent: int = 0           # since start, handed to the kernel (live ones so far)
    bytes_unacked: int = 0        # of bytes_sent: not acknowledged by the peer at close
    stuck_threads: int = 0        # cancelled connections whose handler has not ended in time
    # Unexpected exceptions the server's own threads survived, by thread role (faults.py).
    internal_errors: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # Ended connections by their protocol's close code (a WebSocket's: 1000, 1001, 1009...),
    # for handlers that have one (Handler.close_code).
    close_codes: Mapping[int, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one live connection (for ``server.connections()``)."""

    id: int
    peer: str
    age: float
    bytes_in: int
    bytes_out: int
    operation: str | None            # "idle", "read", "write", "linger"… or None (handler code)
    deadline_remaining: float | None
    leases: int
    queue_bytes: int
    latency: float | None = None     # the last keepalive ping's round trip, s (WebSocket)


class ServerStats:
    """Thread-safe counters; everything is bounded (reasons and phases are fixed sets)."""

    def __init__(self, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at = clock()
        self.active = 0
        self.total = 0
        self.rejected = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.bytes_unacked = 0
        self._reasons: collections.Counter[str] = collections.Counter()
        self._deadlines: collections.Counter[str] = collections.Counter()
        self._internal_errors: collections.Counter[str] = collections.Counter()
        # Bounded: close codes are 16-bit, and a WebSocket's are checked (1000-4999).
        self._close_codes: collections.Counter[int] = collections.Counter()

    def opened(self) -> None:
        with self._lock:
            self.active += 1
            self.total += 1

    def closed(self, reason: CloseReason, bytes_received: int = 0, bytes_sent: int = 0,
               bytes_unacked: int = 0, close_code: int | None = None) -> None:
        with self._lock:
            self.active -= 1
            self._reasons[reason.value] += 1
            if close_code is not None and 0 <= close_code <= 0xFFFF:
                self._close_codes[close_code] += 1
            self.bytes_received += bytes_received
            self.bytes_sent += bytes_sent
            self.bytes_unacked += bytes_unacked

    def rejected_at_accept(self, reason: CloseReason = CloseReason.LIMIT) -> None:
        with self._lock:
            self.rejected += 1
            self._reasons[reason.value] += 1

    def internal_error(self, role: str) -> None:
        """A long-lived thread (accept, watchdog, hub…) survived an unexpected exception."""
        with self._lock:
            self._internal_errors[role] += 1

    def count_deadline(self, phase: str) -> None:
        with self._lock:
            self._deadlines[phase] += 1

    def snapshot(self, handler_threads: int = 0, spare_threads: int = 0,
                 stuck_threads: int = 0, live_bytes: tuple[int, int] = (0, 0)) -> ServerStatistics:
        """The counters now; ``live_bytes``: (received, sent) by connections still open."""
        with self._lock:
            return ServerStatistics(
                connections_active=self.active, connections_total=self.total,
                connections_rejected=self.rejected, close_reasons=dict(self._reasons),
                deadline_hits=dict(self._deadlines), handler_threads=handler_threads,
                spare_threads=spare_threads, uptime=self._clock() - self.started_at,
                bytes_received=self.bytes_received + live_bytes[0],
                bytes_sent=self.bytes_sent + live_bytes[1], bytes_unacked=self.bytes_unacked, stuck_threads=stuck_threads,
                internal_errors=dict(self._internal_errors), close_codes=dict(self._close_codes))
