"""The admin endpoint: a tiny HTTP/1.1 server for health, stats and debugging.

It is itself a connserver :class:`~connserver.Server` (named ``admin``, so its
threads are ``connserver-admin-*``) with small limits and short deadlines, so
it is bounded like everything else. One request per connection, GET only.

    GET /healthz          200 "ok" while accepting, 503 "draining" while shutting down
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
from typing import TYPE_CHECKING, Any, Callable

from .config import Config, parse_address
from .diagnostics import MemoryTracker, census, thread_stacks
from .errors import RemoteProtocolError
from .handler import Handler
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, render_metrics

if TYPE_CHECKING:
    from .server import Server

__all__ = ["AdminServer", "AdminHandler", "parse_request", "stats_document"]

log = logging.getLogger("connserver.admin")

MAX_REQUEST_BYTES = 8192
ADMIN_CONFIG = Config(
    idle_timeout=10.0, read_timeout=5.0, write_timeout=10.0, graceful_timeout=1.0,
    max_connections=16, max_connections_per_ip=8, min_spare_threads=0, max_spare_threads=2,
    spare_thread_timeout=5.0, buffer_size=8192, pool_max_free=2, backlog=16)


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
    return {
        "connections_active": stats.connections_active,
        "connections_total": stats.connections_total,
        "connections_rejected": stats.connections_rejected,
        "close_reasons": dict(stats.close_reasons),
        "deadline_hits": dict(stats.deadline_hits),
        "handler_threads": stats.handler_threads,
        "spare_threads": stats.spare_threads,
        "stuck_threads": stats.stuck_threads,
        "bytes_received": stats.bytes_received,
        "bytes_sent": stats.bytes_sent,
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
    }


class AdminServer:
    """Serves the admin endpoint for ``target`` on ``address`` (``HOST:PORT`` or ``PORT``)."""

    def __init__(self, target: "Server", address: str) -> None:
        from .server import Server

        host, port = parse_address(address, "admin_address", default_host="127.0.0.1")
        self.target = target
        self.memory = MemoryTracker()
        self.memory_lock = threading.Lock()   # one pympler walk at a time
        self.server = Server((host, port), AdminHandler, ADMIN_CONFIG, name="admin")
        self.server.admin = self   # type: ignore[attr-defined]

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        self.server.start()
        log.info("admin endpoint on http://%s:%d/", *self.address)

    def close(self) -> None:
        self.server.shutdown(grace=1.0)
        self.server.server_close()


class AdminHandler(Handler):
    """One GET request per connection."""

    def handle(self) -> None:
        admin: AdminServer = self.server.admin   # type: ignore[attr-defined]
        with self.conn.deadline(self.server.config.read_timeout):
            head = self._read_head()
        if head is None:
            return
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
    if admin.target.accepting:
        return 200, "text/plain", "ok\n"
    return 503, "text/plain", "draining\n"


def _connections(admin: AdminServer) -> tuple[int, str, str]:
    return _json([dataclasses.asdict(info) for info in admin.target.connections()])


def _metrics(admin: AdminServer) -> tuple[int, str, str]:
    target = admin.target
    return 200, METRICS_CONTENT_TYPE, render_metrics(
        target.stats(), census(target), target.buffer_pool.statistics())


def _threads(admin: AdminServer) -> tuple[int, str, str]:
    return 200, "text/plain", "".join(
        f"--- {name}\n{stack}\n" for name, stack in thread_stacks())


def _memory(admin: AdminServer) -> tuple[int, str, str]:
    with admin.memory_lock:   # never a server lock: pympler is slow on a big heap
        top = admin.memory.top(25)
        grown = admin.memory.growth_since_last(25)
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
