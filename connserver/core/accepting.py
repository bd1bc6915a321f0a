"""Accepting: what happens to each socket ``accept()`` returns, on the accept thread.

The accept loop (in :class:`~connserver.Server`) waits on its listeners; for
each ready one, :meth:`Acceptor.accept_burst` takes up to a burst of waiting
connections and admits or refuses each before any thread is spent on it:
``verify_request``, the global and per-address connection limits, the usual
kernel timeouts (set here, see ``set_kernel_timeouts``), then a handler thread
from the pool. A refused socket is counted before it is closed, and refusals
are logged once per burst. Running out of file descriptors backs off instead
of spinning, and anything unexpected loses that one connection, never the loop.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from .addresses import format_peer, ip_of
from ..config import Config
from .connection_limits import ConnectionLimiter
from .deadline import set_kernel_timeouts
from ..errors import CloseReason
from .faults import Faults
from .stats import ServerStats

if TYPE_CHECKING:
    import socketserver

__all__ = ["Acceptor", "ACCEPT_BACKOFF_INTERVAL"]

log = logging.getLogger("connserver.server")
access_log = logging.getLogger("connserver.access")

# accept() errors that mean "out of a resource": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_INTERVAL = 0.1
_ACCEPT_BURST = 64          # connections accepted per wake-up before checking for shutdown


class Acceptor:
    """Admits or refuses each accepted socket for one server (see the module docstring)."""

    def __init__(self, server: "socketserver.BaseServer", config: Config, limiter: ConnectionLimiter,
                 stats: ServerStats, submit: Callable[[tuple], None], stopping: threading.Event,
                 *, proxied: bool, kernel_timeouts: bool = True) -> None:
        self._server = server
        # Thread mode: a socket's usual kernel timeouts are set here, once (parked sockets
        # never block, and set them only if they ever must, at their end).
        self._kernel_timeouts = kernel_timeouts
        self.config = config
        self._limiter = limiter
        self._stats = stats
        self._submit = submit
        self._stopping = stopping
        self._proxied = proxied   # peers are proxies: per-address limits wait for the header
        self.faults = Faults("accept", log, stats.internal_error)
        self._backing_off = False
        self._rejecting = False
        self._recycle_limit: int | None = None
        self._recycle: Callable[[], None] | None = None
        self._admitted = 0

    def recycle_after(self, connections: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``connections`` were admitted (see Server.recycle_after)."""
        self._recycle_limit, self._recycle = connections, callback

    def accept_burst(self, listener: socket.socket) -> None:
        """Accept what is waiting on ``listener`` (a burst at most), admitting or refusing each."""
        hold_slot_first = self.config.on_limit == "wait"
        for _ in range(_ACCEPT_BURST):
            if self._stopping.is_set():
                return
            if hold_slot_first and not self._limiter.acquire_slot_nowait():
                return   # back to the loop, which waits for a slot before accepting
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if hold_slot_first:
                    self._limiter.release_slot()
                if not isinstance(exc, BlockingIOError):
                    self._accept_failed(exc)
                return
            if self._backing_off:
                self._backing_off = False
                log.warning("accepting again after running out of resources")
            try:
                self._admit(sock, address, slot_held=hold_slot_first)
            except Exception as exc:
                # A bug or an odd socket: this connection is lost, the accept loop is not.
                self.faults.record(exc, f"admitting {format_peer(address)}")
                sock.close()

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in _RESOURCE_ERRNOS:
            if not self._backing_off:
                self._backing_off = True
                log.error("accept() failed: %s; backing off %.0f ms at a time until it "
                          "succeeds (logged once per burst)", exc.strerror,
                          ACCEPT_BACKOFF_INTERVAL * 1000)
            # Wait without spinning; shutdown still wakes us at once.
            self._stopping.wait(ACCEPT_BACKOFF_INTERVAL)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
            log.warning("accept() failed: %s", exc)

    def wait_for_slot(self) -> bool:
        """on_limit='wait': hold off accept() until a slot frees (or we stop)."""
        if not self._limiter.wait_for_slot():
            return False
        self._limiter.release_slot()   # _admit takes it for real
        return not self._stopping.is_set()

    def _admit(self, sock: socket.socket, address: Any, slot_held: bool) -> None:
        ip = ip_of(address)
        try:
            allowed = self._server.verify_request(sock, address)
        except Exception:
            log.exception("verify_request failed for %s", format_peer(address))
            allowed = False
        if not allowed:
            if slot_held:
                self._limiter.release_slot()
            self.reject(sock, address, CloseReason.LIMIT, "refused by verify_request")
            return
        if not slot_held and not self._limiter.acquire_slot_nowait():
            self.reject(sock, address, CloseReason.LIMIT,
                         f"max_connections={self.config.max_connections} reached")
            return
        # Behind a PROXY-protocol balancer the peer is the balancer: the client's
        # address (and so its per-address limit) is known only after the header.
        accounted_ip = None if self._proxied else ip
        if accounted_ip is not None and not self._limiter.acquire_ip_nowait(accounted_ip):
            self._limiter.release_slot()
            self.reject(sock, address, CloseReason.LIMIT,
                         f"max_connections_per_ip={self.config.max_connections_per_ip} reached")
            return
        self._rejecting = False
        self._admitted += 1
        if self._recycle is not None and self._admitted == self._recycle_limit:
            try:
                self._recycle()
            except Exception as exc:
                self.faults.record(exc, "recycle callback")
        try:
            # Here, not on the handler thread: see set_kernel_timeouts.
            if self._kernel_timeouts:
                set_kernel_timeouts(sock, self.config.idle_timeout, self.config.write_timeout)
        except (OSError, OverflowError, ValueError) as exc:   # e.g. already reset
            self._limiter.release_ip(accounted_ip)
            self._limiter.release_slot()
            self.reject(sock, address, CloseReason.RESET, f"setting its timeouts failed: {exc}")
            return
        try:
            self._submit((sock, address, accounted_ip))
        except Exception as exc:
            # E.g. "can't start new thread": refuse this one, keep accepting.
            self._limiter.release_ip(accounted_ip)
            self._limiter.release_slot()
            self.reject(sock, address, CloseReason.LIMIT, f"cannot start a handler thread: {exc}")
            self._stopping.wait(ACCEPT_BACKOFF_INTERVAL)

    def reject(self, sock: socket.socket, address: Any, reason: CloseReason, why: str) -> None:
        self._stats.rejected_at_accept(reason)   # counted before the client can see the close
        sock.close()
        if not self._rejecting:
            self._rejecting = True
            log.warning("rejecting connections: %s (logged once per burst)", why)
        access_log.info("#- %s rejected reason=%s (%s)", format_peer(address), reason.value, why)

