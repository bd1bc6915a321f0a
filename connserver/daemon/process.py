"""Running one server process as a daemon: listeners, signals, systemd, drain.

``connserver serve`` runs this directly, or once per worker under the
supervisor (``--workers N``). Signals: SIGTERM/SIGINT drain within
``graceful_timeout`` then exit 0 (a second one forces the rest shut; exit 1
if a handler thread still would not end); SIGUSR1 logs a census and every
thread's stack; SIGHUP reopens log files.

A handler class may offer a ``usage_hint(address)`` classmethod (the chat demo
does): once serving, the daemon logs the line it returns for the first
listener, where ``address`` is ``(host, port)`` (a wildcard host given as
loopback) or a Unix socket's path. Only for plain connections: no hint under
TLS or the PROXY protocol, which ``nc`` cannot speak.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import select
import signal
import socket
import threading
import time
from typing import Any, Callable

from ..config import Config, parse_address
from ..operations.diagnostics import census, thread_stacks
from ..core.handler import Handler
from .listeners import describe, inherited_listener, systemd_listen_fds, tcp_listener, unix_listener
from .logging_setup import reopen_log_files
from .systemd import Notifier

__all__ = ["DaemonOptions", "make_listeners", "run_daemon", "log_usage_hint"]

log = logging.getLogger("connserver.daemon")


@dataclasses.dataclass
class DaemonOptions:
    handler: type[Handler]
    config: Config
    binds: list[str]
    fds: list[int] = dataclasses.field(default_factory=list)
    reuse_port: bool = False                      # workers: one socket each, kernel-balanced
    worker_max_connections: int | None = None     # recycle this process after about this many
    on_ready: Callable[[], None] | None = None    # workers tell the supervisor
    announce: bool = True                         # log how to connect (a supervisor does, for workers)


def make_listeners(binds: list[str], fds: list[int], backlog: int,
                   reuse_port: bool = False) -> list[socket.socket]:
    """Sockets for ``--bind`` (HOST:PORT, [v6]:PORT, unix:/path), ``--fd`` and systemd."""
    listeners: list[socket.socket] = []
    try:
        for fd in [*fds, *systemd_listen_fds()]:
            listeners.append(inherited_listener(fd))
        for bind in binds:
            if bind.startswith("unix:"):
                listeners.append(unix_listener(bind[len("unix:"):], backlog))
            else:
                host, port = parse_address(bind, "--bind")
                listeners.append(tcp_listener(host, port, backlog, reuse_port=reuse_port))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def run_daemon(options: DaemonOptions, listeners: list[socket.socket]) -> int:
    """Serve on ``listeners`` until a signal (or recycling); return the exit code."""
    from ..core.server import Server

    config = options.config
    server = Server.from_listeners(listeners, options.handler, config)
    notifier = Notifier()
    stop_requested = threading.Event()
    delay_over = threading.Event()   # the drain delay (if any) is over
    reason: list[str] = []

    def request_stop(why: str) -> None:
        if stop_requested.is_set() and config.drain_delay > 0 and not delay_over.is_set():
            log.warning("%s again: no more drain delay, draining now", why)
            delay_over.set()
            wakeup.notify()
            return
        if stop_requested.is_set():
            log.warning("%s again: forcing shutdown now", why)
            server.force()
            return
        reason.append(why)
        stop_requested.set()   # before logging: a second signal may arrive mid-log
        wakeup.notify()        # recycling calls this from the accept thread
        log.info("%s: draining (up to %.1f s)", why, config.graceful_timeout)

    def on_usr1(signum: int, frame: Any) -> None:
        log.info("census: %s", census(server).as_dict())
        log.info("stats: %s", server.stats().as_dict())
        for name, stack in thread_stacks():
            log.info("thread %s:\n%s", name, stack)

    handlers = {
        signal.SIGTERM: lambda signum, frame: request_stop("SIGTERM"),
        signal.SIGINT: lambda signum, frame: request_stop("SIGINT"),
        signal.SIGUSR1: on_usr1,
        signal.SIGHUP: lambda signum, frame: reopen_log_files(),
    }
    wakeup = _MainThreadWakeup()
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    if options.worker_max_connections:
        # Recycle the whole process after about N connections (jittered so workers
        # started together do not all restart together), as gunicorn's max_requests.
        limit = int(options.worker_max_connections * random.uniform(0.9, 1.1)) or 1
        server.recycle_after(limit, lambda: request_stop(f"recycling after {limit} connections"))
    pinger = None
    try:
        with server:
            server.start()   # logs "accepting on" for each listener, and the admin endpoint
            if options.announce:
                log_usage_hint(options.handler, server.listeners, config)
            notifier.notify("READY=1", f"STATUS=serving on {', '.join(map(describe, server.listeners))}")
            if options.on_ready is not None:
                options.on_ready()
            if notifier.watchdog_interval:
                pinger = threading.Thread(target=_ping_systemd, name="connserver-sdnotify",
                                          args=(notifier, server, stop_requested))
                pinger.start()
            wakeup.wait_until(stop_requested)
            notifier.notify("STOPPING=1", f"STATUS=draining: {reason[0] if reason else 'stop'}")
            _drain_delay(server, config.drain_delay, delay_over, wakeup)
            report = _drain(server, config.graceful_timeout, wakeup)
    finally:
        stop_requested.set()
        if pinger is not None:
            pinger.join(5.0)
        notifier.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wakeup.close()
    log.info("stopped: %d drained, %d forced, %d stuck thread(s)",
             report.drained, report.forced, len(report.stuck))
    if not report.clean:
        # The stuck threads were logged with their stacks; they would keep the
        # process alive forever, and a daemon's stop must not hang.
        logging.shutdown()
        os._exit(1)
    return 0


def log_usage_hint(handler: type[Handler], listeners: list[socket.socket], config: Config) -> None:
    """Log the handler's ``usage_hint`` for the first listener, if it has one."""
    hint = getattr(handler, "usage_hint", None)
    if hint is None or not listeners or config.tls_cert or config.proxy_protocol:
        return
    sock = listeners[0]
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if not isinstance(address, str) or not address:
            return   # unnamed or abstract: nothing to type
        log.info("%s", hint(address))
        return
    host, port = address[:2]
    log.info("%s", hint((_LOOPBACK.get(host, host), port)))


_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


class _MainThreadWakeup:
    """What the main thread sleeps on, so that every signal wakes it.

    Python runs signal handlers in the main thread only, between bytecodes.
    The kernel hands a signal sent to the process to any thread that does not
    block it (a busy handler thread often takes it first); its C-level handler
    then only sets a flag, and a main thread asleep in ``Event.wait()`` would
    not run the Python handler until something else woke it. A worker that
    sat out its whole drain that way was SIGKILLed by the supervisor.
    ``signal.set_wakeup_fd`` makes that C handler also write a byte to a pipe,
    on whichever thread it runs, and the main thread waits in ``select()`` on
    the pipe instead of on a lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except BaseException:
            os.close(self._read)
            os.close(self._write)
            raise

    def notify(self) -> None:
        """Wake the main thread (from any thread) to look at its events again."""
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass   # a full pipe wakes it anyway

    def wait_until(self, event: threading.Event, timeout: float | None = None) -> None:
        """Sleep until ``event`` is set (its setter calls ``notify()``) or ``timeout`` passed,
        running signal handlers."""
        expires_at = None if timeout is None else time.monotonic() + timeout
        while not event.is_set():
            remaining = None if expires_at is None else expires_at - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            select.select([self._read], [], [], remaining)   # handlers run as this returns
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


def _drain_delay(server: Any, delay: float, over: threading.Event,
                 wakeup: _MainThreadWakeup) -> None:
    """``drain_delay``: /healthz says 503 while the server still accepts, so a balancer
    stops sending it new connections before its listener closes."""
    if delay > 0:
        admin = server.attachment("admin")
        if admin is not None:
            admin.draining = True
        log.info("drain delay: /healthz answers 503, still accepting for %.1f s", delay)
        wakeup.wait_until(over, delay)
    over.set()


def _drain(server: Any, grace: float, wakeup: _MainThreadWakeup) -> Any:
    """shutdown() on its own thread, so this (main) thread stays free for signals."""
    done = threading.Event()
    result: list = []

    def drain() -> None:
        try:
            result.append(server.shutdown(grace))
        finally:
            done.set()
            wakeup.notify()

    thread = threading.Thread(target=drain, name="connserver-shutdown")
    thread.start()
    wakeup.wait_until(done)
    thread.join(5.0)   # past its notify(), so the pipe can be closed
    if not result:
        raise RuntimeError("shutdown failed; see the log")
    return result[0]


def _ping_systemd(notifier: Notifier, server: Any, stop: threading.Event) -> None:
    interval = notifier.watchdog_interval or 1.0
    while not stop.wait(interval):
        stats = server.stats()
        notifier.notify("WATCHDOG=1", f"STATUS={stats.connections_active} connections, "
                        f"{stats.connections_total} since start")
