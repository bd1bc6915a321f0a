"""The registry of live connections: who is open, how each ended, what it moved.

One owner for the books the server keeps per connection: a connection is
added when its thread opens it and removed when it has closed, in the same
step that counts its close reason and bytes (so ``statistics()`` counts every
byte exactly once, live or ended), and each end writes one access-log line.
``wait_empty`` is what a shutdown's drain waits on. Everything here is bounded
by the number of live connections.

What the handler says about its end (:class:`EndedWith`: its protocol's close
code, extra access-log fields) comes in with the removal, so the core needs to
know nothing of any protocol: a WebSocket's ``ws_close=1001`` is one such field.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .deadline import Clock
from ..errors import CloseReason
from .stats import ConnectionInfo, ServerStatistics, ServerStats

if TYPE_CHECKING:
    from .connection import Connection
    from .run_slots import RunGate

__all__ = ["ConnectionRegistry", "EndedWith"]

access_log = logging.getLogger("connserver.access")


@dataclasses.dataclass(frozen=True)
class EndedWith:
    """What a connection's handler says about its end, for the books."""

    close_code: int | None = None                  # its protocol's close code, counted
    fields: Mapping[str, int | str] = dataclasses.field(default_factory=dict)   # logged

    @classmethod
    def of(cls, handler: Any) -> "EndedWith":
        """Read from a handler that has ended (``close_code``, ``access_log_fields()``)."""
        code = getattr(handler, "close_code", None)
        fields = handler.access_log_fields() if hasattr(handler, "access_log_fields") else {}
        return cls(code if isinstance(code, int) else None, fields)

    def log_text(self) -> str:
        return "".join(f" {key}={value}" for key, value in self.fields.items())


_NOTHING = EndedWith()


class ConnectionRegistry:
    """The live connections of one server, and the counters of those that ended."""

    def __init__(self, stats: ServerStats, clock: Clock, run_gate: "RunGate | None" = None) -> None:
        self._stats = stats
        self._clock = clock
        self._run_gate = run_gate   # engaged by the number of live connections
        self._live: dict[int, Connection] = {}
        self._cond = threading.Condition(threading.Lock())

    def add(self, conn: "Connection") -> None:
        with self._cond:
            self._live[conn.id] = conn
            if self._run_gate is not None:
                self._run_gate.connections += 1
        self._stats.opened()

    def remove(self, conn: "Connection", reason: CloseReason, ended: EndedWith = _NOTHING) -> None:
        """``conn`` has closed: log its end, then count it and wake a drain waiting on it
        (in that order, so whoever sees it counted finds its access-log line)."""
        if access_log.isEnabledFor(logging.INFO):
            # bytes_out: what the peer acknowledged; unacked: sent, maybe never delivered.
            access_log.info("#%d %s duration=%.3fs bytes_in=%d bytes_out=%d reason=%s%s%s",
                            conn.id, conn.peer_label, self._clock() - conn.created_at,
                            conn.bytes_received, conn.bytes_sent - conn.bytes_unacked,
                            reason.value,
                            f" unacked={conn.bytes_unacked}" if conn.bytes_unacked else "",
                            ended.log_text())
        with self._cond:
            self._live.pop(conn.id, None)
            self._stats.closed(reason, conn.bytes_received, conn.bytes_sent, conn.bytes_unacked,
                               ended.close_code)
            if self._run_gate is not None:
                self._run_gate.connections -= 1
            self._cond.notify_all()

    def log_stuck(self, conn: "Connection") -> None:
        """An access-log line for a connection whose handler outlived the shutdown.

        Its thread never removed it; without this line the connection would
        vanish from the access log. Its socket was shut both ways.
        """
        access_log.info("#%d %s duration=%.3fs bytes_in=%d bytes_out=%d reason=%s stuck "
                        "(handler thread still running at shutdown; socket shut, not closed)",
                        conn.id, conn.peer_label, self._clock() - conn.created_at,
                        conn.bytes_received, conn.bytes_sent,
                        (conn.cancel_token.reason or CloseReason.SHUTDOWN).value)

    def get(self, conn_id: int) -> "Connection | None":
        with self._cond:
            return self._live.get(conn_id)

    def live(self, *, except_thread: int | None = None) -> list["Connection"]:
        """The live connections (but the one served by thread ``except_thread``)."""
        with self._cond:
            return [conn for conn in self._live.values() if conn.thread_ident != except_thread]

    def infos(self) -> list[ConnectionInfo]:
        return [conn.info() for conn in self.live()]

    def __len__(self) -> int:
        return len(self._live)

    def wait_empty(self, timeout: float, *, except_thread: int | None = None,
                   stop_waiting: Callable[[], bool] = lambda: False) -> bool:
        """Wait up to ``timeout`` until no connection is live (but ``except_thread``'s),
        or ``stop_waiting()``; return whether the registry emptied."""
        timeout = min(timeout, threading.TIMEOUT_MAX)
        with self._cond:
            return self._cond.wait_for(
                lambda: stop_waiting() or all(conn.thread_ident == except_thread
                                              for conn in self._live.values()), timeout)

    def wake(self) -> None:
        """Wake ``wait_empty`` to look at ``stop_waiting()`` again."""
        with self._cond:
            self._cond.notify_all()

    def statistics(self, **threads: int) -> ServerStatistics:
        """The counters now; byte totals include what live connections moved so far."""
        with self._cond:
            live = list(self._live.values())
            received = sum(conn.bytes_received for conn in live)
            sent = sum(conn.bytes_sent for conn in live)
            return self._stats.snapshot(live_bytes=(received, sent), **threads)
