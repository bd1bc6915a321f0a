"""``--workers N``: a supervisor that pre-forks N worker processes.

Each worker is a full threaded server with its own listening socket bound to
the same port with ``SO_REUSEPORT``, so the kernel spreads connections over
the workers and a host uses all its cores despite the GIL. The supervisor
itself runs no threads (it forks), restarts a crashed worker with exponential
back-off, restarts a recycled one (``--worker-max-connections``) at once,
forwards SIGTERM/SIGINT for a coordinated drain, and never leaves orphans:
workers get SIGTERM from the kernel if the supervisor dies (``PR_SET_PDEATHSIG``).

Workers run in a session of their own, so the signals a terminal sends to its
whole foreground process group (Ctrl-C, Ctrl-\\, hang-up), or a
``kill -TERM -PGID``, reach the supervisor alone: each worker then gets one
SIGTERM, which drains, and not two, which would force its connections shut.

Exit status: 0 if every worker slot ended cleanly, that is its last worker
exited 0; 1 if any worker exited non-zero or was killed by a signal during the
drain (a straggler the supervisor killed included), or a slot was waiting to
restart a crashed worker when the stop came.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import time

from ..config import parse_address
from .process import DaemonOptions, log_usage_hint, make_listeners, run_daemon
from .listeners import describe
from .logging_setup import reopen_log_files
from .systemd import Notifier

__all__ = ["run_supervisor"]

log = logging.getLogger("connserver.supervisor")

_PR_SET_PDEATHSIG = 1
_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 10.0   # a worker that lived this long resets the back-off
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# Passed on to every worker: SIGHUP reopens log files, SIGUSR1 logs a census
# (systemd's `systemctl kill -s HUP` reaches only the supervisor).
_FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)


@dataclasses.dataclass
class _Worker:
    slot: int
    pid: int
    started: float


def run_supervisor(options: DaemonOptions, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; return the exit code."""
    reservations, worker_binds, shared = _prepare_sockets(options)
    for sock in (*reservations, *shared):
        log.info("starting %d workers on %s", workers, describe(sock))
    notifier = Notifier()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    flags = {"stop": 0}
    to_forward: list[int] = []
    previous_wakeup = signal.set_wakeup_fd(wake_w)

    def on_stop(signum: int, frame: object) -> None:
        flags["stop"] += 1

    def on_forward(signum: int, frame: object) -> None:
        to_forward.append(signum)

    previous = {sig: signal.signal(sig, on_stop) for sig in _STOP_SIGNALS}
    previous.update({sig: signal.signal(sig, on_forward) for sig in _FORWARDED_SIGNALS})
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *args: None)
    running: dict[int, _Worker] = {}
    restarts: list[tuple[float, int]] = []       # (when, slot)
    failures = [0] * workers
    last_exit = [0] * workers                    # per slot: how its last worker ended
    ready = 0
    announced = False
    signals_forwarded = 0
    kill_at: float | None = None
    try:
        for slot in range(workers):
            worker = _spawn(slot, options, worker_binds, shared, ready_w, (wake_r, wake_w, ready_r))
            running[worker.pid] = worker
        while running or (not flags["stop"] and restarts):
            now = time.monotonic()
            if flags["stop"] > signals_forwarded:
                if signals_forwarded == 0:
                    log.info("draining %d workers", len(running))
                    notifier.notify("STOPPING=1", "STATUS=draining workers")
                    kill_at = now + options.config.graceful_timeout + 5.0
                    restarts.clear()
                signals_forwarded = flags["stop"]
                for pid in running:
                    _signal(pid, signal.SIGTERM)
            while to_forward:
                sig = to_forward.pop(0)
                if sig == signal.SIGHUP:
                    reopen_log_files()
                log.info("forwarding %s to %d workers", signal.Signals(sig).name, len(running))
                for pid in running:
                    _signal(pid, sig)
            if kill_at is not None and now >= kill_at:
                for pid in running:
                    log.error("worker %d did not stop in time; killing it", pid)
                    _signal(pid, signal.SIGKILL)
                kill_at = now + 5.0
            for when, slot in [item for item in restarts if item[0] <= now]:
                restarts.remove((when, slot))
                worker = _spawn(slot, options, worker_binds, shared, ready_w,
                                (wake_r, wake_w, ready_r))
                running[worker.pid] = worker
            timeouts = [when - now for when, _ in restarts]
            if kill_at is not None:
                timeouts.append(kill_at - now)
            try:
                select.select([wake_r, ready_r], [], [], max(0.0, min(timeouts)) if timeouts else None)
            except InterruptedError:
                pass
            _drain_pipe(wake_r)
            ready += len(_drain_pipe(ready_r))
            if ready >= workers and not announced:
                announced = True
                notifier.notify("READY=1", f"STATUS={workers} workers serving")
                if options.announce:
                    log_usage_hint(options.handler, [*reservations, *shared], options.config)
            for pid, status in _reap():
                worker = running.pop(pid, None)
                if worker is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                last_exit[worker.slot] = code
                lived = time.monotonic() - worker.started
                if flags["stop"]:
                    if code == 0:
                        log.info("worker %d (slot %d) exited 0", pid, worker.slot)
                    else:
                        log.error("worker %d (slot %d) %s during the drain",
                                  pid, worker.slot, _ended(code))
                    continue
                if code == 0:
                    log.info("worker %d recycled; starting a fresh one", pid)
                    failures[worker.slot] = 0
                    restarts.append((time.monotonic(), worker.slot))
                    continue
                failures[worker.slot] = 0 if lived > _HEALTHY_AFTER else failures[worker.slot] + 1
                delay = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** max(0, failures[worker.slot] - 1))
                log.error("worker %d %s after %.1f s; restarting in %.1f s",
                          pid, _ended(code), lived, delay)
                restarts.append((time.monotonic() + delay, worker.slot))
        failed = [slot for slot, code in enumerate(last_exit) if code != 0]
        if failed:
            log.error("stopped: %d of %d worker slots did not end cleanly (%s); exit status 1",
                      len(failed), workers,
                      ", ".join(f"slot {slot}: {_ended(last_exit[slot])}" for slot in failed))
            return 1
        log.info("stopped: all %d workers exited 0", workers)
        return 0
    finally:
        for pid in running:
            _signal(pid, signal.SIGKILL)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
        for fd in (wake_r, wake_w, ready_r, ready_w):
            os.close(fd)
        for sock in (*reservations, *shared):
            sock.close()
        notifier.close()


def _ended(code: int) -> str:
    """How a worker ended, from its ``os.waitstatus_to_exitcode()``: "exited 1", "was killed by ..."."""
    if code >= 0:
        return f"exited {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _prepare_sockets(options: DaemonOptions) -> tuple[list[socket.socket], list[str], list[socket.socket]]:
    """Reserve each TCP port (port 0 becomes a real one) and make the shared sockets.

    A bound but not listening SO_REUSEPORT socket holds the port without taking
    connections; each worker then binds its own listening socket to it. Unix and
    inherited sockets cannot be split that way and are shared by all workers.
    """
    reservations: list[socket.socket] = []
    worker_binds: list[str] = []
    tcp_binds = [bind for bind in options.binds if not bind.startswith("unix:")]
    unix_binds = [bind for bind in options.binds if bind.startswith("unix:")]
    try:
        for bind in tcp_binds:
            host, port = parse_address(bind, "--bind")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            reservations.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            real_port = sock.getsockname()[1]
            worker_binds.append(f"[{host}]:{real_port}" if family == socket.AF_INET6
                                else f"{host}:{real_port}")
        shared = make_listeners(unix_binds, options.fds, options.config.backlog)
    except BaseException:
        for sock in reservations:
            sock.close()
        raise
    return reservations, worker_binds, shared


def _spawn(slot: int, options: DaemonOptions, binds: list[str], shared: list[socket.socket],
           ready_w: int, close_in_child: tuple[int, ...]) -> _Worker:
    supervisor = os.getpid()
    # Stop signals wait, blocked, across the fork until the child has a handler
    # of its own: a SIGTERM for a worker still starting is then neither swallowed
    # by the supervisor's handler it inherits nor fatal (see _remember_stop).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("started worker %d (slot %d)", pid, slot)
        return _Worker(slot, pid, time.monotonic())
    code = 1
    try:
        _become_worker(supervisor, close_in_child, mask)
        listeners = make_listeners(binds, [], options.config.backlog, reuse_port=True) + shared
        config = options.config
        if config.admin_address is not None:
            # One admin endpoint per worker: port + slot (port 0 stays "any port").
            host, port = parse_address(config.admin_address, "admin_address",
                                       default_host="127.0.0.1")
            config = config.replace(admin_address=f"{host}:{port + slot if port else 0}")
        worker_options = dataclasses.replace(
            options, config=config, on_ready=lambda: _worker_ready(ready_w), announce=False)
        code = run_daemon(worker_options, listeners)
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)


_stop_while_starting = False   # in a worker: a stop signal came before run_daemon's handlers


def _remember_stop(signum: int, frame: object) -> None:
    """A worker's stop handler until run_daemon() installs its own: note, replay once serving.

    Raising here instead could unwind the forked child out of _spawn() and into
    the supervisor's loop.
    """
    global _stop_while_starting
    _stop_while_starting = True


def _worker_ready(ready_w: int) -> None:
    os.write(ready_w, b"R")
    if _stop_while_starting:
        signal.raise_signal(signal.SIGTERM)   # to run_daemon's handler: a drain of nothing


def _become_worker(supervisor: int, close_fds: tuple[int, ...], mask: set[signal.Signals]) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask for SIGTERM on the supervisor's death (no prctl)")
    if os.getppid() != supervisor:   # it died before prctl took effect
        os._exit(0)
    # Out of the supervisor's process group (see the module docstring); the
    # death signal above still stops this worker if the supervisor is killed.
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _remember_stop)
    for fd in close_fds:
        os.close(fd)
    Notifier.forget_environment()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # a signal that waited is delivered here


def _reap() -> list[tuple[int, int]]:
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def _drain_pipe(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
