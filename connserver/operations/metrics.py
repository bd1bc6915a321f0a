"""Prometheus text exposition (format 0.0.4), written by hand: no dependency.

Names follow Prometheus conventions: prefixed ``connserver_``, the unit in the
name (``_bytes``, ``_seconds``), counters ending in ``_total``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from .diagnostics import Census
from ..errors import CloseReason

if TYPE_CHECKING:
    from ..broadcast.backplane import BackplaneStatistics
    from ..core.buffers import PoolStatistics
    from ..core.stats import ServerStatistics

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[tuple[Mapping[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return lines


def render_metrics(stats: "ServerStatistics", census: Census, pool: "PoolStatistics",
                   backplane: "BackplaneStatistics | None" = None) -> str:
    """The exposition text for one server and its process (and its backplane, if any)."""
    reasons = {reason.value: 0 for reason in CloseReason}
    reasons.update(stats.close_reasons)
    lines: list[str] = []
    add = lines.extend
    add(_family("connserver_connections_active", "gauge", "Connections open now.",
                [({}, stats.connections_active)]))
    add(_family("connserver_connections_accepted_total", "counter",
                "Connections admitted since start.", [({}, stats.connections_total)]))
    add(_family("connserver_connections_rejected_total", "counter",
                "Connections closed at accept time by a limit.", [({}, stats.connections_rejected)]))
    add(_family("connserver_connections_closed_total", "counter",
                "Connections ended, by close reason.",
                [({"reason": reason}, count) for reason, count in sorted(reasons.items())]))
    add(_family("connserver_close_codes_total", "counter",
                "Connections ended, by their protocol's close code (WebSocket).",
                [({"code": str(code)}, count) for code, count in sorted(stats.close_codes.items())]))
    add(_family("connserver_deadline_exceeded_total", "counter",
                "Deadlines that fired, by I/O phase.",
                [({"phase": phase}, count) for phase, count in sorted(stats.deadline_hits.items())]))
    add(_family("connserver_received_bytes_total", "counter",
                "Bytes received since start (live connections included).",
                [({}, stats.bytes_received)]))
    add(_family("connserver_sent_bytes_total", "counter",
                "Bytes handed to the kernel since start (live connections included).",
                [({}, stats.bytes_sent)]))
    add(_family("connserver_unacked_bytes_total", "counter",
                "Bytes sent that the peer had not acknowledged when its connection closed "
                "(a lingering close timed out or was forced): possibly never delivered.",
                [({}, stats.bytes_unacked)]))
    add(_family("connserver_internal_errors_total", "counter",
                "Unexpected exceptions the server's own threads survived, by thread role.",
                [({"role": role}, count) for role, count in sorted(stats.internal_errors.items())]))
    add(_family("connserver_threads", "gauge", "Threads in the process, by role.",
                [({"role": role}, count) for role, count in sorted(census.threads_by_role.items())]))
    add(_family("connserver_stuck_threads", "gauge",
                "Handler threads still running long after their connection was cancelled.",
                [({}, stats.stuck_threads)]))
    add(_family("connserver_open_fds", "gauge", "Open file descriptors.", [({}, census.fds)]))
    add(_family("connserver_resident_memory_bytes", "gauge", "Resident set size.",
                [({}, census.rss_bytes)]))
    add(_family("connserver_pool_buffers", "gauge", "Pooled receive buffers, by state.",
                [({"state": "leased"}, pool.leased), ({"state": "free"}, pool.free)]))
    add(_family("connserver_pool_acquisitions_total", "counter",
                "Buffer acquisitions, by whether the free list served them.",
                [({"result": "hit"}, pool.hits), ({"result": "miss"}, pool.misses)]))
    add(_family("connserver_uptime_seconds", "gauge", "Seconds since the server started.",
                [({}, stats.uptime)]))
    if backplane is not None:
        add(_backplane_families(backplane))
    return "\n".join(lines) + "\n"


def _backplane_families(bp: "BackplaneStatistics") -> list[str]:
    """The Redis backplane's delivery books: what went, what came, what was lost."""
    lines: list[str] = []
    add = lines.extend
    add(_family("connserver_backplane_up", "gauge",
                "1 while both backplane connections to Redis are up.", [({}, int(bp.connected))]))
    add(_family("connserver_backplane_messages_total", "counter",
                "Backplane messages, by what became of them: published (by this process's "
                "hubs), sent (accepted by Redis), received (from other processes).",
                [({"event": "published"}, bp.published), ({"event": "sent"}, bp.sent),
                 ({"event": "received"}, bp.received)]))
    add(_family("connserver_backplane_lost_total", "counter",
                "Backplane messages known not delivered, by where: outbound_dropped (queue full "
                "while Redis was slow or away), unconfirmed (in flight when a connection broke), "
                "gap (missing from another process's sequence when it reached this one).",
                [({"where": "outbound_dropped"}, bp.outbound_dropped),
                 ({"where": "unconfirmed"}, bp.unconfirmed), ({"where": "gap"}, bp.lost)]))
    add(_family("connserver_backplane_gaps_total", "counter",
                "Times another process's sequence jumped ahead here.", [({}, bp.gaps)]))
    add(_family("connserver_backplane_reconnects_total", "counter",
                "Backplane connections made again after a loss.", [({}, bp.reconnects)]))
    add(_family("connserver_backplane_outbound_bytes", "gauge",
                "Bytes waiting to be published to Redis.", [({}, bp.outbound_bytes)]))
    return lines
