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
import queue
import threading
from typing import Callable, Generic, TypeVar

__all__ = ["HandlerThreadPool"]

Job = TypeVar("Job")

SPARE_NAME = "connserver-spare"
_STACK_SIZE_LOCK = threading.Lock()


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
        """Stop spare threads; wait up to ``timeout`` for all; return those still alive."""
        with self._lock:
            self._stopping = True
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)   # the caller bounds the total by draining first
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
        try:
            while job is not None:
                try:
                    self._run(job)
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
                if self._stopping:
                    return None   # shutdown() queued a sentinel for every idle thread
                # A job may have been queued for us as the wait timed out.
                try:
                    return self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return None
