"""The admin endpoint: a tiny HTTP/1.1 server for health, stats and debugging.

It is itself a connserver :class:`~connserver.Server` (named ``admin``, so its
threads are ``connserver-admin-*``) with small limits and short deadlines, so
it is bounded like everything else. One request per connection, GET only.

A health probe must always be answered, even while some client holds admin
connections open without asking anything: :class:`AdminAdmission` closes the
connection that has waited longest to make room for a new one, instead of
refusing the newcomer (see there for why).

    GET /healthz          200 "ok" while accepting, 503 "draining" once a shutdown (or the
                          daemon's drain_delay before it) began
    GET /stats            JSON counters, threads, fds, RSS, pool, run slots, uptime
    GET /connections      JSON list, one object per live connection
    GET /metrics          Prometheus text exposition
    GET /debug/threads    every thread's name and stack
    GET /debug/memory     pympler: the top types, and what grew since the previous call
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable

from ..config import Config, parse_address
from ..core.deadline import Clock, monotonic
from .diagnostics import MemoryTracker, census, thread_stacks
from ..errors import CloseReason, RemoteProtocolError
from ..core.handler import Handler
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, render_metrics
from ..core.addresses import ip_of
from ..core.server import Server


__all__ = ["AdminServer", "AdminHandler", "AdminAdmission", "AdminAdmissionStatistics",
           "parse_request", "stats_document"]

log = logging.getLogger("connserver.admin")

MAX_REQUEST_BYTES = 8192
# idle_timeout is the first-byte deadline and read_timeout the whole request's: a
# probe sends its request with the connection, so waiting longer only helps clients
# that hold connections without asking. There is no per-address limit at accept
# time, which is what locked probes out: AdminAdmission's budget replaces it, and
# max_connections only bounds threads and fds (the budget plus what is being answered).
ADMIN_CONFIG = Config(
    idle_timeout=1.0, read_timeout=2.0, write_timeout=5.0, linger_timeout=1.0,
    graceful_timeout=1.0, max_connections=64, max_connections_per_ip=None,
    min_spare_threads=0, max_spare_threads=2, spare_thread_timeout=5.0, buffer_size=8192,
    pool_max_free=2, backlog=64)
MAX_WAITING = 16
MAX_WAITING_PER_ADDRESS = 8
PROTECTED_INTERVAL = 0.25
_ROOM_WARNING_INTERVAL = 60.0


@dataclasses.dataclass(frozen=True)
class AdminAdmissionStatistics:
    waiting: int          # may be closed to make room: no request yet, or answered
    serving: int          # their request is being answered
    closed_for_room: int  # closed to make room, since start


class AdminAdmission:
    """Which admin connections to close so that a new one always gets in.

    Until its request arrives a health probe looks like any other connection,
    so a fixed number of slots can always be filled by clients that connect and
    send nothing: 8 idle connections from one address (16 from several) used to
    fail every probe for the whole 5 s read deadline, and a client that
    reconnected at once kept it failing. So a newcomer is never refused for
    being one too many. Instead, while more than ``max_waiting`` connections
    wait (for their request, or for their close after the answer), the one that
    has waited longest is closed: the oldest of the newcomer's own address while
    that address has more than ``max_waiting_per_address``, otherwise the oldest
    of the address that holds the most. An address that hoards connections so
    only churns its own, and every other address keeps its share.

    A connection that has waited less than ``protected_interval`` is never
    closed: a probe sends its request as soon as it is connected, and without
    this a client reconnecting in a tight loop could replace all the others
    before the probe's handler thread got to read it (it did, on a busy
    machine). Nor is one whose request is being answered. While nothing may be
    closed, newcomers still get in; the server's ``max_connections`` bounds
    them all. A client reconnecting at once so churns each of its connections
    at most once per ``protected_interval``, not in a tight loop.

    Bookkeeping on ids and addresses only, safe from any thread: the caller
    closes the ids :meth:`admit` returns.
    """

    def __init__(self, max_waiting: int, max_waiting_per_address: int,
                 protected_interval: float, clock: Clock = monotonic) -> None:
        if max_waiting < 1 or max_waiting_per_address < 1:
            raise ValueError("max_waiting and max_waiting_per_address must be at least 1")
        self.max_waiting = max_waiting
        self.max_waiting_per_address = max_waiting_per_address
        self.protected_interval = protected_interval
        self._clock = clock
        self._lock = threading.Lock()
        # address -> {connection id: when it began to wait}, oldest first; an address
        # leaves the table with its last waiting connection, so the table is bounded
        # by the connections.
        self._waiting: dict[str, dict[int, float]] = {}
        self._waiting_count = 0
        self._address_of: dict[int, str] = {}   # every connection admitted and not ended
        self._closed_for_room = 0

    def admit(self, conn_id: int, address: str) -> list[int]:
        """Count a new connection as waiting; return the ids to close to make room."""
        victims = []
        with self._lock:
            now = self._clock()
            self._address_of[conn_id] = address
            self._wait(conn_id, address, now)
            closable_since = now - self.protected_interval
            while (len(self._waiting[address]) > self.max_waiting_per_address
                   and self._oldest(address)[1] <= closable_since):
                victims.append(self._close_oldest(address))
            while self._waiting_count > self.max_waiting:
                crowded = [a for a in self._waiting if self._oldest(a)[1] <= closable_since]
                if not crowded:
                    break
                victims.append(self._close_oldest(max(crowded, key=self._crowding)))
            self._closed_for_room += len(victims)
        return victims

    def serving(self, conn_id: int) -> None:
        """Its request is complete: it is being answered and must not be closed."""
        with self._lock:
            self._stop_waiting(conn_id)

    def served(self, conn_id: int) -> None:
        """Answered: it waits for its close now, and may be closed to make room."""
        with self._lock:
            address = self._address_of.get(conn_id)
            if address is not None and conn_id not in self._waiting.get(address, ()):
                self._wait(conn_id, address, self._clock())

    def forget(self, conn_id: int) -> None:
        """It has ended (or was closed to make room)."""
        with self._lock:
            self._stop_waiting(conn_id)
            self._address_of.pop(conn_id, None)

    def statistics(self) -> AdminAdmissionStatistics:
        with self._lock:
            return AdminAdmissionStatistics(
                waiting=self._waiting_count, serving=len(self._address_of) - self._waiting_count,
                closed_for_room=self._closed_for_room)

    def _wait(self, conn_id: int, address: str, now: float) -> None:
        self._waiting.setdefault(address, {})[conn_id] = now
        self._waiting_count += 1

    def _stop_waiting(self, conn_id: int) -> None:
        address = self._address_of.get(conn_id)
        waiting = self._waiting.get(address) if address is not None else None
        if waiting is not None and waiting.pop(conn_id, None) is not None:
            self._waiting_count -= 1
            if not waiting:
                del self._waiting[address]

    def _oldest(self, address: str) -> tuple[int, float]:
        return next(iter(self._waiting[address].items()))

    def _close_oldest(self, address: str) -> int:
        conn_id = self._oldest(address)[0]
        self._stop_waiting(conn_id)
        del self._address_of[conn_id]
        return conn_id

    def _crowding(self, address: str) -> tuple[int, float]:
        """Orders the address holding the most last; of equals, the longest waiting."""
        return len(self._waiting[address]), -self._oldest(address)[1]


def parse_request(head: bytes) -> tuple[str, str]:
    """(method, path) from a request head; RemoteProtocolError if it is not HTTP/1.x."""
    try:
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
        method, target, version = request_line.split(" ")
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError("malformed HTTP request line") from None
    if not version.startswith("HTTP/1."):
        raise RemoteProtocolError(f"unsupported protocol {version!r}")
    return method, target.split("?", 1)[0]


def stats_document(server: "Server") -> dict[str, Any]:
    """What GET /stats returns."""
    stats = server.stats()
    pool = server.buffer_pool.statistics()
    look = census(server)
    backplane: Any = server.attachment("backplane")
    return {
        "connections_active": stats.connections_active,
        "connections_total": stats.connections_total,
        "connections_rejected": stats.connections_rejected,
        "close_reasons": dict(stats.close_reasons),
        "close_codes": {str(code): count for code, count in stats.close_codes.items()},
        "deadline_hits": dict(stats.deadline_hits),
        "handler_threads": stats.handler_threads,
        "spare_threads": stats.spare_threads,
        "stuck_threads": stats.stuck_threads,
        "bytes_received": stats.bytes_received,
        "bytes_sent": stats.bytes_sent,
        "bytes_unacked": stats.bytes_unacked,
        "internal_errors": dict(stats.internal_errors),
        "threads": look.threads,
        "threads_by_role": dict(look.threads_by_role),
        "fds": look.fds,
        "rss_bytes": look.rss_bytes,
        "allocated_blocks": look.allocated_blocks,
        "pool": dataclasses.asdict(pool),
        "admission": (None if server.run_gate is None
                      else dataclasses.asdict(server.run_gate.statistics())),
        "accepting": server.accepting,
        "uptime_s": round(stats.uptime, 3),
        "backplane": None if backplane is None else dataclasses.asdict(backplane.statistics()),
    }


class AdminServer:
    """Serves the admin endpoint for ``target`` on ``address`` (``HOST:PORT`` or ``PORT``).

    Attributes: ``server`` (its own :class:`~connserver.Server`, limited by
    ``ADMIN_CONFIG``) and ``admission`` (the :class:`AdminAdmission` that makes
    room for new connections; replace it before :meth:`start` to change its clock).
    """

    def __init__(self, target: Server, address: str) -> None:
        host, port = parse_address(address, "admin_address", default_host="127.0.0.1")
        self.target = target
        self.draining = False   # set by the daemon's drain_delay: /healthz says 503 already
        self.memory = MemoryTracker()
        self.memory_lock = threading.Lock()   # one pympler walk at a time
        self.admission = AdminAdmission(MAX_WAITING, MAX_WAITING_PER_ADDRESS, PROTECTED_INTERVAL)
        self._next_room_warning = 0.0
        # A handler class bound to this endpoint: its handlers find it as ``self.admin``.
        handler = type("AdminHandler", (AdminHandler,), {"admin": self})
        self.server = Server((host, port), handler, ADMIN_CONFIG, name="admin")
        self._started = False

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        """Serve (idempotent: the target server calls it each time it starts serving)."""
        if self._started:
            return
        self._started = True
        self.server.start()
        log.info("admin endpoint on http://%s:%d/", *self.address)

    def close(self) -> None:
        self.server.shutdown(grace=1.0)
        self.server.server_close()

    def admit(self, conn_id: int, address: str) -> None:
        """Let a new connection in, closing the ones that :class:`AdminAdmission` picks."""
        victims = self.admission.admit(conn_id, address)
        for victim in victims:
            self.server.cancel(victim, CloseReason.LIMIT)
        if victims and time.monotonic() >= self._next_room_warning:
            self._next_room_warning = time.monotonic() + _ROOM_WARNING_INTERVAL
            log.warning("admin endpoint full (at most %d connections wait, %d per address): "
                        "closing the longest-waiting to make room, %d so far (logged at most "
                        "once a minute)", MAX_WAITING, MAX_WAITING_PER_ADDRESS,
                        self.admission.statistics().closed_for_room)


class AdminHandler(Handler):
    """One GET request per connection; tells the admission when it is answered and ends.

    ``admin`` is set on the subclass each :class:`AdminServer` makes for itself.
    """

    admin: AdminServer

    def setup(self) -> None:
        self.admin.admit(self.id, ip_of(self.peer))

    def finish(self) -> None:
        self.admin.admission.served(self.id)

    def connection_closed(self, reason: CloseReason) -> None:
        self.admin.admission.forget(self.id)

    def handle(self) -> None:
        admin = self.admin
        with self.conn.deadline(self.server.config.read_timeout):
            head = self._read_head()
        if head is None:
            return
        admin.admission.serving(self.id)
        method, path = parse_request(head)
        if method not in ("GET", "HEAD"):
            self._respond(405, "text/plain", "only GET\n", head_only=False)
            return
        route = ROUTES.get(path)
        if route is None:
            self._respond(404, "text/plain", f"no such endpoint; try {', '.join(ROUTES)}\n",
                          head_only=method == "HEAD")
            return
        status, content_type, body = route(admin)
        self._respond(status, content_type, body, head_only=method == "HEAD")

    def _read_head(self) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.conn.recv(MAX_REQUEST_BYTES)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_REQUEST_BYTES:
                raise RemoteProtocolError("request head too large")
        return data

    def _respond(self, status: int, content_type: str, body: str, head_only: bool) -> None:
        payload = body.encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}.get(status, "")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n"
                f"Connection: close\r\n\r\n").encode()
        self.conn.sendall(head if head_only else head + payload)


def _json(document: Any) -> tuple[int, str, str]:
    return 200, "application/json", json.dumps(document, indent=1, sort_keys=True) + "\n"


def _healthz(admin: AdminServer) -> tuple[int, str, str]:
    if admin.target.accepting and not admin.draining:
        return 200, "text/plain", "ok\n"
    return 503, "text/plain", "draining\n"


def _connections(admin: AdminServer) -> tuple[int, str, str]:
    return _json([dataclasses.asdict(info) for info in admin.target.connections()])


def _metrics(admin: AdminServer) -> tuple[int, str, str]:
    target = admin.target
    backplane = target.attachment("backplane")
    return 200, METRICS_CONTENT_TYPE, render_metrics(
        target.stats(), census(target), target.buffer_pool.statistics(),
        None if backplane is None else backplane.statistics())   # type: ignore[attr-defined]


def _threads(admin: AdminServer) -> tuple[int, str, str]:
    return 200, "text/plain", "".join(
        f"--- {name}\n{stack}\n" for name, stack in thread_stacks())


def _memory(admin: AdminServer) -> tuple[int, str, str]:
    # Never a server lock: pympler is slow on a big heap. And never a queue for this
    # one: requests waiting their turn would hold admin threads for as long.
    if not admin.memory_lock.acquire(blocking=False):
        return 503, "text/plain", "busy: another /debug/memory walk is running\n"
    try:
        top = admin.memory.top(25)
        grown = admin.memory.growth_since_last(25)
    finally:
        admin.memory_lock.release()
    return _json({"top_types": [dataclasses.asdict(row) for row in top],
                  "growth_since_previous_call": [dataclasses.asdict(row) for row in grown]})


ROUTES: dict[str, Callable[[AdminServer], tuple[int, str, str]]] = {
    "/healthz": _healthz,
    "/stats": lambda admin: _json(stats_document(admin.target)),
    "/connections": _connections,
    "/metrics": _metrics,
    "/debug/threads": _threads,
    "/debug/memory": _memory,
}


def attach_admin(server: Server) -> AdminServer | None:
    """The admin endpoint for ``server``, if its ``Config.admin_address`` asks for one."""
    if server.config.admin_address is None:
        return None
    return AdminServer(server, server.config.admin_address)


# Attached from here, so the core never imports the operations layer.
Server.attachments["admin"] = attach_admin
