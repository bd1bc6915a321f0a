"""Handler threads: one per connection, reused across connections.

Each connection still gets a thread of its own for its whole life (blocking
I/O, one thread per connection). What is reused is the thread *after* its
connection ended: it waits up to ``spare_thread_timeout`` for the next
connection instead of exiting, so a server under churn does not pay for a
thread start (and the start handshake, which must win the GIL) per connection.
At most ``max_spare_threads`` wait; the rest exit at once. Connections are
handed to spare threads in FIFO order.

A thread serving connection 42 is named ``connserver-conn-42``; a spare one
``connserver-spare-<n>``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import threading
import time
from typing import Callable, Generic, TypeVar

__all__ = ["HandlerThreadPool"]

Job = TypeVar("Job")

SPARE_NAME = "connserver-spare"
_STACK_SIZE_LOCK = threading.Lock()
# Asynchronous signals are for the main thread. Delivered to a handler thread, one
# would interrupt a blocking call that CPython then restarts with the kernel timeout
# in full, overshooting the connection's deadline.
_ASYNC_SIGNALS = {getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGALRM",
    "SIGWINCH", "SIGIO") if hasattr(signal, name)}

log = logging.getLogger("connserver.server")


def block_async_signals() -> None:
    """Keep asynchronous signals away from the calling (non-main) thread."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


class HandlerThreadPool(Generic[Job]):
    """Runs ``run(job)`` for each submitted job on a thread of its own."""

    def __init__(self, run: Callable[[Job], None], *, max_spare: int, spare_timeout: float,
                 stack_size: int = 0) -> None:
        self._run = run
        self._max_spare = max_spare
        self._spare_timeout = spare_timeout
        self._stack_size = stack_size
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0          # threads waiting in _jobs.get()
        self._busy = 0
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._spawned = itertools.count(1)

    def submit(self, job: Job) -> None:
        """Run ``job`` on a spare thread, or on a new one if none is waiting."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("handler thread pool is shut down")
            self._busy += 1
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        self._start_thread(job)

    def counts(self) -> tuple[int, int]:
        """(threads serving a job, spare threads waiting)."""
        with self._lock:
            return self._busy, self._idle

    def shutdown(self, timeout: float) -> list[threading.Thread]:
        """Stop spare threads; wait up to ``timeout`` in all; return those still alive.

        The calling thread is never waited for (a handler may shut its server down).
        """
        with self._lock:
            self._stopping = True
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
            me = threading.current_thread()
            threads = [thread for thread in self._threads if thread is not me]
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread for thread in threads if thread.is_alive()]

    def _start_thread(self, job: Job) -> None:
        thread = threading.Thread(target=self._work, args=(job,),
                                  name=f"{SPARE_NAME}-{next(self._spawned)}")
        with self._lock:
            self._threads.add(thread)
        try:
            if self._stack_size:
                # threading.stack_size() is process-wide: set it only around our start.
                with _STACK_SIZE_LOCK:
                    previous = threading.stack_size(self._stack_size)
                    try:
                        thread.start()
                    finally:
                        threading.stack_size(previous)
            else:
                thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
                self._busy -= 1
            raise

    def _work(self, job: Job | None) -> None:
        me = threading.current_thread()
        spare_name = me.name
        block_async_signals()
        try:
            while job is not None:
                try:
                    self._run(job)
                except BaseException:   # a bug in the runner: log it, keep the books right
                    log.exception("handler thread %s: unexpected error", me.name)
                finally:
                    job = None
                    me.name = spare_name
                job = self._next_job()
        finally:
            with self._lock:
                self._threads.discard(me)

    def _next_job(self) -> Job | None:
        with self._lock:
            self._busy -= 1
            if self._stopping or self._idle >= self._max_spare:
                return None
            self._idle += 1
        try:
            return self._jobs.get(timeout=self._spare_timeout)
        except queue.Empty:
            with self._lock:
                # A job may have been queued for us as the wait timed out: run it
                # (even when stopping; its connection is then cancelled at once).
                try:
                    return self._jobs.get_nowait()
                except queue.Empty:
                    if not self._stopping:   # shutdown() already zeroed the count
                        self._idle -= 1
                    return None
