"""Running one server process as a daemon: listeners, signals, systemd, drain.

``connserver serve`` runs this directly, or once per worker under the
supervisor (``--workers N``). Signals: SIGTERM/SIGINT drain within
``graceful_timeout`` then exit 0 (a second one forces the rest shut); SIGUSR1
logs a census and every thread's stack; SIGHUP reopens log files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import threading
from typing import Any, Callable

from .config import Config, parse_address
from .diagnostics import census, thread_stacks
from .handler import Handler
from .listeners import describe, inherited_listener, systemd_listen_fds, tcp_listener, unix_listener
from .logsetup import reopen_log_files
from .sdnotify import Notifier

__all__ = ["DaemonOptions", "make_listeners", "run_daemon"]

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
    from .server import Server

    config = options.config
    server = Server.from_listeners(listeners, options.handler, config)
    notifier = Notifier()
    stop_requested = threading.Event()
    reason: list[str] = []

    def request_stop(why: str) -> None:
        if stop_requested.is_set():
            log.warning("%s again: forcing shutdown now", why)
            server.force()
            return
        reason.append(why)
        stop_requested.set()   # before logging: a second signal may arrive mid-log
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
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    if options.worker_max_connections:
        # Recycle the whole process after about N connections (jittered so workers
        # started together do not all restart together), as gunicorn's max_requests.
        limit = int(options.worker_max_connections * random.uniform(0.9, 1.1)) or 1
        server.recycle_after(limit, lambda: request_stop(f"recycling after {limit} connections"))
    pinger = None
    try:
        with server:
            server.start()
            for listener in server.listeners:
                log.info("listening on %s", describe(listener))
            if server.admin_address is not None:
                log.info("admin endpoint on http://%s:%d/", *server.admin_address)
            notifier.notify("READY=1", f"STATUS=serving on {', '.join(map(describe, server.listeners))}")
            if options.on_ready is not None:
                options.on_ready()
            if notifier.watchdog_interval:
                pinger = threading.Thread(target=_ping_systemd, name="connserver-sdnotify",
                                          args=(notifier, server, stop_requested))
                pinger.start()
            stop_requested.wait()
            notifier.notify("STOPPING=1", f"STATUS=draining: {reason[0] if reason else 'stop'}")
            report = _drain(server, config.graceful_timeout)
    finally:
        stop_requested.set()
        if pinger is not None:
            pinger.join(5.0)
        notifier.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped: %d drained, %d forced, %d stuck thread(s)",
             report.drained, report.forced, len(report.stuck))
    if not report.clean:
        # The stuck threads were logged with their stacks; they would keep the
        # process alive forever, and a daemon's stop must not hang.
        logging.shutdown()
        os._exit(1)
    return 0


def _drain(server: Any, grace: float) -> Any:
    """shutdown() on its own thread, so this (main) thread stays free for signals."""
    done = threading.Event()
    result: list = []

    def drain() -> None:
        try:
            result.append(server.shutdown(grace))
        finally:
            done.set()

    threading.Thread(target=drain, name="connserver-shutdown").start()
    done.wait()
    if not result:
        raise RuntimeError("shutdown failed; see the log")
    return result[0]


def _ping_systemd(notifier: Notifier, server: Any, stop: threading.Event) -> None:
    interval = notifier.watchdog_interval or 1.0
    while not stop.wait(interval):
        stats = server.stats()
        notifier.notify("WATCHDOG=1", f"STATUS={stats.connections_active} connections, "
                        f"{stats.connections_total} since start")
