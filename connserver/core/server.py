"""Server: a thread-per-connection TCP server on socketserver that leaks nothing.

Lifecycle: ``start()`` (or ``serve_forever()``) → accept loop → each admitted
connection runs on its own handler thread → ``shutdown(grace)``: stop accepting
and close the listener, cancel every connection (reason ``shutdown``), wait up
to ``grace``, force the remaining sockets shut, wait a little more, and report
any handler thread that is still alive with its stack. It never waits forever.
"""

from __future__ import annotations

import functools
import logging
import random
import selectors
import socket
import socketserver
import sys
import threading
from typing import Any, Callable, ClassVar, Protocol, TypeVar

from .addresses import describe, format_peer, ip_of
from .buffers import BufferPool
from .cancel import CancelToken, Watchdog
from ..config import Config
from .connection import Connection
from .connection_limits import ConnectionLimiter
from .deadline import Clock, monotonic, set_kernel_timeouts
from ..errors import CloseReason
from .accepting import ACCEPT_BACKOFF_INTERVAL, Acceptor
from .handler import Handler
from .outcome import classify_failure
from .preamble import Preamble, PreambleSteps
from .registry import ConnectionRegistry, EndedWith
from .parking import ParkingLot, why_not_parked
from .resources import Resources
from .report import ShutdownReport, StuckThread, describe_thread, stack_of
from .run_slots import RunGate, RunSlot
from .stats import ConnectionInfo, ServerStatistics, ServerStats
from .threads import HandlerThreadPool

__all__ = ["Server", "ShutdownReport", "StuckThread", "Attachment"]

T = TypeVar("T")

log = logging.getLogger("connserver.server")
conn_log = logging.getLogger("connserver.conn")
access_log = logging.getLogger("connserver.access")


class Attachment(Protocol):
    """Something a layer above the core attaches to a server (the admin endpoint)."""

    def start(self) -> None:
        """Called when the server starts serving (again: must be idempotent)."""

    def close(self) -> None:
        """Called last in a shutdown."""

_FORCE_WAIT_INTERVAL = 1.0  # extra wait after forcing sockets shut
# Ends after which nothing more can reach the peer: no lingering close, no hub flush.
_UNDELIVERABLE = frozenset({CloseReason.RESET, CloseReason.SLOW_CONSUMER,
                            CloseReason.WRITE_DEADLINE})


class Server(socketserver.TCPServer):
    """A TCP server running each connection's handler on its own thread.

    Methods for the caller: ``start()``, ``serve_forever()``, ``shutdown(grace)``,
    ``force()``, ``server_close()``, ``stats()``, ``connections()``,
    ``cancel(conn_id, reason)``, ``resource(key, factory)``, ``hub(name)``,
    ``add_listener()``, ``recycle_after()``; also a context manager (leaving it
    shuts the server down).

    Methods that may be overridden: ``verify_request(request, client_address)``
    (return False to refuse a connection, as in socketserver).

    Class variables that may be overridden: ``allow_reuse_address`` (True).

    Extension points for the layers above the core, which register themselves
    when imported (``import connserver`` imports them all): ``attachments``
    (name → factory called with each new server, returning an
    :class:`Attachment` or None; the admin endpoint is one) and
    ``resource_factories`` (name → factory for :meth:`hub`-style shared objects).
    """

    allow_reuse_address = True
    attachments: ClassVar[dict[str, Callable[["Server"], "Attachment | None"]]] = {}
    resource_factories: ClassVar[dict[str, Callable[..., Any]]] = {}

    def __init__(self, server_address: Any, RequestHandlerClass: type[Handler],
                 config: Config | None = None, *, bind_and_activate: bool = True,
                 clock: Clock = monotonic, name: str | None = None) -> None:
        self.config = config if config is not None else Config()
        if not (isinstance(RequestHandlerClass, type) and issubclass(RequestHandlerClass, Handler)):
            raise TypeError("RequestHandlerClass must be a subclass of connserver.Handler")
        self.request_queue_size = self.config.backlog
        if isinstance(server_address, tuple) and ":" in str(server_address[0]):
            self.address_family = socket.AF_INET6
        self._clock = clock
        self._stats = ServerStats(clock)
        self.count_internal_error = self._stats.internal_error   # for threads of layers above
        self._pool = BufferPool(self.config.buffer_size, self.config.pool_max_free)
        self._limiter = ConnectionLimiter(self.config.max_connections,
                                          self.config.max_connections_per_ip)
        self.name = name
        self._prefix = "connserver" if name is None else f"connserver-{name}"
        self._watchdog = Watchdog(name=f"{self._prefix}-watchdog", clock=clock,
                                  stuck_timeout=self.config.stuck_thread_timeout,
                                  on_stuck=self._report_stuck,
                                  on_fault=self._stats.internal_error)
        self._stuck: set[int] = set()   # ids of live connections reported stuck
        config = self.config
        self._preamble = Preamble(config, self._limiter, clock)
        self._run_gate = RunGate(config.max_running) if config.max_running else None
        self._registry = ConnectionRegistry(self._stats, clock, self._run_gate)
        self._handler_threads = HandlerThreadPool(
            self._serve_connection, min_spare=self.config.min_spare_threads,
            max_spare=self.config.max_spare_threads,
            spare_timeout=self.config.spare_thread_timeout,
            stack_size=self.config.thread_stack_size, discard=self._discard_job,
            name_prefix=self._prefix, max_threads=self.config.max_connections,
            on_fault=self._stats.internal_error)
        self._next_id = iter(range(1, sys.maxsize)).__next__
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._stopping = threading.Event()
        self._force_now = threading.Event()
        self._accepting = threading.Event()
        self._serve_done = threading.Event()
        self._serve_done.set()
        self._accept_thread: threading.Thread | None = None
        self._serving_thread: threading.Thread | None = None
        self._watchdog_started = False
        self._shutdown_report: ShutdownReport | None = None
        self._drain_expires_at: float | None = None   # a shutdown's grace ends then
        self._shutdown_lock = threading.Lock()
        self._extra_listeners: list[socket.socket] = []
        self._lot = self._parking_lot(RequestHandlerClass)
        self._acceptor = Acceptor(self, config, self._limiter, self._stats,
                                  self._handler_threads.submit if self._lot is None
                                  else self._lot.admit, self._stopping,
                                  proxied=self._preamble.proxied,
                                  kernel_timeouts=self._lot is None)
        self._resources = Resources()
        self._attached: dict[str, Attachment] = {}
        try:
            super().__init__(server_address, RequestHandlerClass, bind_and_activate)
        except BaseException:
            self._wakeup_r.close()
            self._wakeup_w.close()
            raise
        try:
            for name, attach in self.attachments.items():
                attachment = attach(self)
                if attachment is not None:
                    self._attached[name] = attachment
        except BaseException:
            self._close_listener()
            raise

    # --- the caller's API -------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a background thread (``connserver-accept``); return once accepting."""
        if self._accept_thread is not None:
            raise RuntimeError("server already started")
        self._accept_thread = threading.Thread(target=self.serve_forever, name=f"{self._prefix}-accept")
        self._accept_thread.start()
        if not self._accepting.wait(timeout):
            raise RuntimeError("server did not start accepting within %.1f s" % timeout)

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Accept connections until ``shutdown()``; runs in the calling thread.

        The loop blocks in ``select()`` with no timeout: shutdown wakes it through a
        socketpair, not by polling (``poll_interval`` is accepted and ignored).
        """
        if self._stopping.is_set():
            return
        self._serve_done.clear()
        self._serving_thread = threading.current_thread()
        try:
            self._start_watchdog()
            self._handler_threads.start()
            if self._lot is not None:
                self._lot.start()
            for attachment in self._attached.values():
                attachment.start()
            with selectors.DefaultSelector() as selector:
                for listener in self.listeners:
                    listener.setblocking(False)
                    selector.register(listener, selectors.EVENT_READ)
                    log.info("accepting on %s", describe(listener))
                selector.register(self._wakeup_r, selectors.EVENT_READ)
                self._accepting.set()
                while not self._stopping.is_set():
                    try:
                        if self.config.on_limit == "wait" and not self._acceptor.wait_for_slot():
                            break
                        for key, _ in selector.select():
                            if key.fileobj is not self._wakeup_r and not self._stopping.is_set():
                                self._acceptor.accept_burst(key.fileobj)
                    except Exception as exc:
                        # The port stays open: the loop must not die with it (faults.py).
                        self._acceptor.faults.record(exc)
                        self._stopping.wait(ACCEPT_BACKOFF_INTERVAL)
        finally:
            self._accepting.clear()
            self._serving_thread = None
            if self._stopping.is_set():
                self._close_listener()
            self._serve_done.set()

    def shutdown(self, grace: float | None = None) -> ShutdownReport:  # type: ignore[override]
        """Stop accepting, drain for up to ``grace`` seconds, force, and report.

        Safe to call from any thread: a signal handler in the thread running
        ``serve_forever()``, or a handler thread (which is then not waited for).
        Returns the same report if called again.
        """
        with self._shutdown_lock:
            if self._shutdown_report is not None:
                return self._shutdown_report
            grace = self.config.graceful_timeout if grace is None else grace
            started = self._clock()
            self._drain_expires_at = started + grace
            alive: list[threading.Thread] = []
            try:
                self._stop_accepting()
                everyone = self._registry.live()
                live = self._others_live()   # the caller's own connection is not waited for
                for conn in everyone:
                    conn.cancel_token.cancel(CloseReason.SHUTDOWN)
                self._wait_drained(grace)
                remaining = self._others_live()
                for conn in remaining:
                    conn.abort(force=True)
                if remaining:
                    if self._force_now.is_set():
                        log.warning("forced %d connection(s) shut after %.1f s: the %.1f s grace "
                                    "was cut short", len(remaining), self._clock() - started, grace)
                    else:
                        log.warning("forced %d connection(s) shut after the %.1f s grace",
                                    len(remaining), grace)
                    self._force_now.clear()
                    self._wait_drained(_FORCE_WAIT_INTERVAL)
                self._resources.close_all()
                alive = self._handler_threads.shutdown(timeout=0.5 if remaining else 2.0)
                if self._lot is not None:
                    alive += self._lot.stop(timeout=0.5 if remaining else 2.0)
            finally:
                for attachment in self._attached.values():
                    attachment.close()   # last, so /healthz said 503 during the drain
                if not self._watchdog.stop(timeout=2.0) and self._watchdog.thread is not None:
                    alive.append(self._watchdog.thread)
            stuck = tuple(describe_thread(thread) for thread in alive)
            for thread in stuck:
                log.error("thread %s still alive after shutdown (connection %s):\n%s",
                          thread.name, thread.conn_id, thread.stack)
            for conn in self._others_live():
                self._registry.log_stuck(conn)
            if self._serving_thread is not threading.current_thread():
                self._close_listener()
            self._shutdown_report = ShutdownReport(
                connections_at_start=len(live),
                drained=len({id(c) for c in live} - {id(c) for c in remaining}),
                forced=len(remaining), stuck=stuck, duration=self._clock() - started)
            return self._shutdown_report

    def force(self) -> None:
        """End a shutdown's grace period now (e.g. on a second SIGTERM)."""
        self._force_now.set()
        self._registry.wake()

    def server_close(self) -> None:
        """Close the listener; if still serving, shut down first (with no grace)."""
        if self._shutdown_report is None and (not self._serve_done.is_set() or len(self._registry)
                                              or self._watchdog_started):
            self.shutdown(grace=0.0)
        self._close_listener()
        for attachment in self._attached.values():
            attachment.close()

    @property
    def listeners(self) -> list[socket.socket]:
        """Every listening socket: the one socketserver made, and any added."""
        return [self.socket, *self._extra_listeners]

    def recycle_after(self, connections: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the accept thread) once ``connections`` were admitted.

        For recycling a whole worker process as a last line of defence against slow
        leaks in handler code; the callback usually starts a graceful shutdown.
        """
        self._acceptor.recycle_after(connections, callback)

    def add_listener(self, listener: socket.socket) -> None:
        """Also accept on ``listener`` (bound and listening: TCP, Unix, or inherited).

        Call before serving. All listeners share the limits, pool and registry.
        """
        if self._accepting.is_set():
            raise RuntimeError("add listeners before serving")
        self._extra_listeners.append(listener)

    @classmethod
    def from_listeners(cls, listeners: "list[socket.socket]", RequestHandlerClass: type[Handler],
                       config: Config | None = None, **options: Any) -> "Server":
        """A server on sockets made elsewhere (``--bind``, ``--fd``, systemd activation)."""
        if not listeners:
            raise ValueError("at least one listener is needed")
        first = listeners[0]
        server = cls(first.getsockname() if first.family != socket.AF_UNIX else ("127.0.0.1", 0),
                     RequestHandlerClass, config, bind_and_activate=False, **options)
        server.socket.close()
        server.socket = first
        server.address_family = first.family
        server.server_address = first.getsockname()
        for listener in listeners[1:]:
            server.add_listener(listener)
        return server

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin endpoint listens, if ``Config.admin_address`` is set."""
        admin = self._attached.get("admin")
        return None if admin is None else admin.address   # type: ignore[attr-defined]

    def attachment(self, name: str) -> "Attachment | None":
        """What the layer registered as ``name`` attached to this server, if anything."""
        return self._attached.get(name)

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()

    def stats(self) -> ServerStatistics:
        """The counters; byte totals include what live connections moved so far."""
        busy, spare = self._handler_threads.statistics()
        return self._registry.statistics(handler_threads=busy, spare_threads=spare,
                                         stuck_threads=len(self._stuck))

    def _report_stuck(self, conn: Connection) -> None:
        """The watchdog found a cancelled connection's handler still running."""
        self._stuck.add(conn.id)
        stack = stack_of(conn.thread_ident)
        log.warning("#%d %s handler still running %.1f s after its connection was cancelled "
                    "(%s); it does not check for cancellation:\n%s", conn.id, conn.peer_label,
                    self.config.stuck_thread_timeout, conn.cancel_token.reason, stack)

    def connections(self) -> list[ConnectionInfo]:
        return self._registry.infos()

    def cancel(self, conn_id: int, reason: CloseReason | str = CloseReason.CANCELLED) -> bool:
        """Cancel one connection (its blocked I/O wakes at once); False if not live."""
        conn = self._registry.get(conn_id)
        return conn is not None and conn.cancel_token.cancel(reason)

    def resource(self, key: Any, factory: Callable[[], T]) -> T:
        """The server-wide object for ``key``, made by ``factory`` on first use.

        For state shared by connections (a hub, a chat room). Objects with a
        ``close()`` method are closed at shutdown, after the connections ended.
        """
        if self._stopping.is_set():
            self._resources.refuse_new()
        return self._resources.get(key, factory)

    def hub(self, name: str = "default", **options: Any) -> Any:
        """The server's :class:`~connserver.Hub` called ``name`` (made on first use with
        ``options``). The hub module registers its factory (see the class docstring)."""
        factory = self.resource_factories.get("hub")
        if factory is None:
            raise RuntimeError("no hub factory registered: import connserver.hub first")
        options.setdefault("write_timeout", self.config.write_timeout)
        options.setdefault("on_fault", self._stats.internal_error)
        if "backplane" in self._attached:
            options.setdefault("backplane", self._attached["backplane"])
        return self.resource(("hub", name), lambda: factory(name=name, clock=self._clock, **options))

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def parks(self) -> bool:
        """Whether message handlers are served parked (``Config.park``, and the handler
        and configuration allow it: see the start-up warning otherwise)."""
        return self._lot is not None

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set() and not self._stopping.is_set()

    @property
    def buffer_pool(self) -> BufferPool:
        return self._pool

    @property
    def run_gate(self) -> RunGate | None:
        """The FIFO run slots (``Config.max_running``), or None when unlimited."""
        return self._run_gate

    @property
    def limiter(self) -> ConnectionLimiter:
        return self._limiter

    # --- accepting --------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the accepted socket to a handler thread (never blocks on the handler)."""
        set_kernel_timeouts(request, self.config.idle_timeout, self.config.write_timeout)
        self._handler_threads.submit((request, client_address, ip_of(client_address)))

    # --- one connection, on its handler thread -------------------------------------

    def _serve_connection(self, job: Any) -> None:
        if callable(job):   # a parked connection's end that may wait (see parking.py)
            return job()
        sock, address, accounted_ip = job
        try:
            conn = self._open_connection(sock, address)
        except BaseException:
            log.exception("setting up the connection from %s failed", format_peer(address))
            sock.close()
            self._limiter.release_ip(accounted_ip)
            self._limiter.release_slot()
            return
        token = conn.cancel_token
        reason = CloseReason.ERROR
        try:
            self._set_socket_options(sock)
            proxied_ip = self._preamble.run(conn)
            if proxied_ip is not None:
                accounted_ip = proxied_ip   # behind a proxy: the real client's slot
            self.finish_request(conn, conn.peer)
        except BaseException as exc:
            reason = classify_failure(conn, exc)
        else:
            reason = token.reason or conn.outcome or CloseReason.CLOSED
        finally:
            self._end_connection(conn, reason, accounted_ip)

    def _discard_job(self, job: Any) -> None:
        """A connection accepted but never given a thread (the pool shut down first)."""
        if callable(job):
            return job()   # a parked connection's end: still owed, done here
        sock, address, accounted_ip = job
        sock.close()
        self._limiter.release_ip(accounted_ip)
        self._limiter.release_slot()
        self._stats.rejected_at_accept(CloseReason.SHUTDOWN)

    def _parking_lot(self, handler_class: type) -> ParkingLot | None:
        """The parking lot for ``Config.park``, if this server's connections can be parked."""
        if not self.config.park:
            return None
        why_not = why_not_parked(self.config, handler_class)
        if why_not is not None:
            log.warning("park: serving %s in thread mode: %s", handler_class.__name__, why_not)
            return None
        return ParkingLot(self.config, self._watchdog, self._stats,
                          open_connection=functools.partial(self._open_connection, parked=True),
                          begin=self._begin_parked,
                          start_handler=self._start_parked_handler,
                          end_connection=self._end_connection,
                          hand_off=self._handler_threads.submit,
                          linger_timeout=self._linger_timeout, name_prefix=self._prefix)

    def _begin_parked(self, conn: Connection) -> PreambleSteps:
        """Set a parked connection up (on the accept thread: nothing here may wait)."""
        self._set_socket_options(conn.socket)
        conn.park_writes(self.config.max_write_buffer)
        return self._preamble.steps(conn)

    def _start_parked_handler(self, conn: Connection) -> Handler:
        """Its handler, once the preamble is done (the PROXY header named the peer)."""
        return self.RequestHandlerClass.parked(conn, conn.peer, self)

    def _open_connection(self, sock: socket.socket, address: Any, *,
                         parked: bool = False) -> Connection:
        """Wrap, register and watch a newly accepted socket (on its handler thread, or,
        parked, on the accept thread: the parking lot watches its deadlines)."""
        conn_id = self._next_id()
        if not parked:
            threading.current_thread().name = f"{self._prefix}-conn-{conn_id}"
        token = CancelToken()
        conn = Connection(sock, address, id=conn_id, config=self.config, pool=self._pool,
                          cancel_token=token, stats=self._stats, clock=self._clock,
                          kernel_timeouts_set=not parked,
                          run_slot=None if self._run_gate is None else RunSlot(self._run_gate))
        token.on_cancel(functools.partial(self._watchdog.abort_soon, conn))
        self._registry.add(conn)
        if self._stopping.is_set():
            token.cancel(CloseReason.SHUTDOWN)
        lifetime = self.config.max_lifetime
        if lifetime is not None and not parked:
            jitter = 1.0 - random.uniform(0.0, self.config.lifetime_jitter)
            self._watchdog.watch(conn, conn.created_at + lifetime * jitter)
        return conn

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.RequestHandlerClass(request, client_address, self)

    def _set_socket_options(self, sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            if self.config.tcp_nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def _end_connection(self, conn: Connection, reason: CloseReason,
                        accounted_ip: str | None, *, lingered: bool = False) -> None:
        """After the handler: close (lingering, unless a parked end did that already),
        clean up, count. Every path ends here."""
        linger_timeout = 0.0 if lingered else self._linger_timeout()
        answer = None
        closing_answer = getattr(conn.handler, "closing_answer", None)
        if not lingered and reason not in _UNDELIVERABLE and closing_answer is not None:
            try:
                answer = closing_answer()
            except Exception:
                conn_log.exception("#%d %s closing_answer() raised", conn.id, conn.peer_label)
        try:
            self._watchdog.unwatch(conn)
            if conn.write_sink_attached:   # before close(): the hub's writer uses the fd
                # Take the write side back from the hub with what it still had queued
                # for this peer, and deliver that too, unless nothing more can reach it.
                conn.send_goodbye(b"", timeout=0.0 if reason in _UNDELIVERABLE else linger_timeout)
        finally:
            conn.close(0.0 if reason in _UNDELIVERABLE else linger_timeout, reason, answer)
            conn.cancel_token.detach()
        handler, conn.handler = conn.handler, None
        ended = EndedWith()
        try:
            self._pool.check_account(conn.leases, f"connection #{conn.id}")
            if handler is not None:
                try:
                    handler.connection_closed(reason)   # type: ignore[attr-defined]
                    ended = EndedWith.of(handler)
                except BaseException:
                    conn_log.exception("#%d %s connection_closed() or access_log_fields() raised",
                                       conn.id, conn.peer_label)
        finally:
            self._limiter.release_ip(accounted_ip)
            self._limiter.release_slot()
            self._preamble.release(conn)
            self._stuck.discard(conn.id)
            self._registry.remove(conn, reason, ended)

    def _linger_timeout(self) -> float:
        """How long a closing connection may wait for its peer to take what was sent."""
        timeout = self.config.linger_timeout
        drain_expires_at = self._drain_expires_at
        if drain_expires_at is not None:
            timeout = min(timeout, max(0.0, drain_expires_at - self._clock()))
        return timeout

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints to stderr here; we log (used only on unexpected paths)."""
        log.exception("unexpected error serving %s", format_peer(client_address))

    # --- shutting down ------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if not self._watchdog_started:
            self._watchdog_started = True
            self._watchdog.start()

    def _stop_accepting(self) -> None:
        self._stopping.set()
        self._limiter.wake()
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass
        if self._serving_thread is threading.current_thread():
            # Called from a signal handler that interrupted serve_forever(): it sees
            # the wake-up byte once we return, and closes the listener itself.
            return
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(5.0)
        elif not self._serve_done.wait(5.0):
            log.error("serve_forever() did not return within 5 s of shutdown")
        self._close_listener()

    def _close_listener(self) -> None:
        for listener in self.listeners:
            listener.close()
        self._wakeup_r.close()
        self._wakeup_w.close()

    def _others_live(self) -> list[Connection]:
        """Live connections, except the caller's own (when a handler shuts us down)."""
        return self._registry.live(except_thread=threading.get_ident())

    def _wait_drained(self, timeout: float) -> bool:
        return self._registry.wait_empty(timeout, except_thread=threading.get_ident(),
                                         stop_waiting=self._force_now.is_set)
