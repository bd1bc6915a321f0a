"""Handler threads: one per connection, started ahead of need, reused after.

Each connection gets a thread of its own for its whole life (blocking I/O, one
thread per connection). What the pool changes is *when* threads start and
what happens after their connection ends:

- The accept loop never starts a thread. ``Thread.start()`` waits until the
  new thread has run, and under load that means winning the GIL against every
  busy handler: stdlib's ``ThreadingTCPServer`` leaves new clients waiting
  seconds for that. Here the accept loop only queues the connection (FIFO);
  a spawner thread keeps ``min_spare`` threads waiting ahead of demand and
  starts more whenever connections are queued with no thread to take them;
  each new thread starts one more while more are wanted, so a burst is met
  by a doubling number of starters rather than one at a time.
- A thread whose connection ended waits up to ``spare_timeout`` for the next
  one instead of exiting (at most ``max_spare`` wait; the rest exit), so churn
  does not pay a thread start per connection.

Threads are named ``connserver-conn-<id>`` while serving connection ``id`` and
``connserver-spare-<n>`` while waiting; the spawner is ``connserver-spawner``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import threading
import time
from typing import Callable, Generic, TypeVar

from .faults import Faults

__all__ = ["HandlerThreadPool", "block_async_signals"]

_SURPLUS_WAIT = 0.05   # seconds a thread beyond max_spare waits for a job before it exits

Job = TypeVar("Job")

_STACK_SIZE_LOCK = threading.Lock()
_UNSTARTED_STOCK = 64   # Thread objects the spawner keeps made during a burst
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
    """Runs ``run(job)`` for each submitted job, each on a thread of its own.

    ``surplus`` is the number of threads waiting for a job minus the jobs queued:
    negative means connections are waiting for a thread. The spawner keeps it at
    ``min_spare`` or above; ``discard(job)`` is called for jobs still queued when
    the pool shuts down, so their sockets can be closed.
    """

    def __init__(self, run: Callable[[Job], None], *, min_spare: int, max_spare: int,
                 spare_timeout: float, stack_size: int = 0,
                 discard: Callable[[Job], None] | None = None,
                 name_prefix: str = "connserver", max_threads: int | None = None,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self._run = run
        self.faults = Faults("handler", log, on_fault)
        self._discard = discard
        self._min_spare = min_spare
        self._max_spare = max(max_spare, min_spare)
        self._spare_timeout = spare_timeout
        self._stack_size = stack_size
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition(threading.Lock())
        self._surplus = 0       # threads waiting for a job - jobs queued
        self._starting = 0      # threads the spawner is starting
        self._busy = 0          # threads running a job
        self._threads: set[threading.Thread] = set()
        # Thread objects made by the spawner, not started yet, for handler threads to
        # start during a burst (see _work: why handler threads never make their own).
        self._unstarted: list[threading.Thread] = []
        self._stopping = False
        self._spawner: threading.Thread | None = None
        self._spawned = itertools.count(1)
        self._prefix = name_prefix
        self._max_threads = max_threads   # spares never push the total past this

    def start(self) -> None:
        """Start the spawner (and so the first ``min_spare`` threads)."""
        with self._cond:
            if self._spawner is not None:
                return
            self._spawner = threading.Thread(target=self._spawn_loop, name=f"{self._prefix}-spawner")
        self._spawner.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next waiting thread; never waits for a thread to start."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("handler thread pool is shut down")
            self._busy += 1
            self._surplus -= 1
            self._jobs.put(job)
            if self._surplus + self._starting < self._min_spare or self._surplus < 0:
                self._cond.notify_all()
        if self._spawner is None:
            self.start()

    def statistics(self) -> tuple[int, int]:
        """(jobs being run or queued, spare threads waiting)."""
        with self._cond:
            return self._busy, max(0, self._surplus)

    def shutdown(self, timeout: float) -> list[threading.Thread]:
        """Stop every thread; wait up to ``timeout`` in all; return those still alive.

        The calling thread is never waited for (a handler may shut its server down).
        """
        with self._cond:
            self._stopping = True
            self._unstarted.clear()
            self._cond.notify_all()
            me = threading.current_thread()
            threads = [t for t in self._threads if t is not me]
            for _ in range(len(self._threads)):
                self._jobs.put(None)
        deadline = time.monotonic() + timeout
        if self._spawner is not None and self._spawner is not me:
            self._spawner.join(max(0.0, deadline - time.monotonic()))
            if self._spawner.is_alive():
                threads.append(self._spawner)
        for thread in threads:
            if thread.ident is None:
                continue   # being started right now: it will see _stopping and exit
            thread.join(max(0.0, deadline - time.monotonic()))
        self._discard_queued()
        return [thread for thread in threads if thread.is_alive()]

    def _discard_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and self._discard is not None:
                with self._cond:
                    self._busy -= 1
                self._discard(job)

    # --- the spawner ----------------------------------------------------------------

    def _spawn_loop(self) -> None:
        block_async_signals()
        while True:
            with self._cond:
                while not self._stopping and self._wanted() <= 0:
                    self._cond.wait()
                if self._stopping:
                    return
                self._starting += 1
            try:
                thread = self._take_unstarted() or self._make_thread()
                # Make more for the handler threads to start first: our own start
                # waits for the new thread to win the GIL, tens of ms under load.
                self._stock_unstarted()
                self._start_thread(thread)
            except Exception as exc:
                with self._cond:
                    self._starting -= 1
                log.error("cannot start a handler thread: %s; retrying in 1 s", exc)
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, 1.0)

    def _make_thread(self) -> threading.Thread:
        return threading.Thread(target=self._work, name=f"{self._prefix}-spare-{next(self._spawned)}")

    def _take_unstarted(self) -> threading.Thread | None:
        with self._cond:
            return self._unstarted.pop() if self._unstarted else None

    def _stock_unstarted(self) -> None:
        """While a burst wants threads, keep a few made for handler threads to start."""
        while True:
            with self._cond:
                if self._stopping or len(self._unstarted) >= min(_UNSTARTED_STOCK, self._wanted()):
                    return
            thread = self._make_thread()
            with self._cond:
                self._unstarted.append(thread)

    def _wanted(self) -> int:
        if self._surplus >= 0:
            wanted = self._min_spare - self._surplus - self._starting
        else:
            wanted = -self._surplus - self._starting   # jobs waiting for a thread
        if self._max_threads is not None:
            # Threads = serving (busy minus jobs still queued) + waiting + starting,
            # which is busy + surplus + starting whatever the sign of surplus.
            running = self._busy + self._surplus + self._starting
            wanted = min(wanted, self._max_threads - running)
        return wanted

    def _start_thread(self, thread: threading.Thread) -> None:
        """Start ``thread`` (counted in ``starting``), unless the pool is shutting down."""
        with self._cond:
            if self._stopping:
                # shutdown() has listed the threads it joins and sent each its None:
                # one started now would be neither joined nor told to stop.
                self._starting -= 1
                return
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
            with self._cond:
                self._threads.discard(thread)
            raise

    # --- the handler threads ----------------------------------------------------------

    def _work(self) -> None:
        me = threading.current_thread()
        spare_name = me.name
        block_async_signals()
        with self._cond:
            self._starting -= 1
            self._surplus += 1
            help_spawn = not self._stopping and self._wanted() > 0
            if help_spawn:
                self._starting += 1
        if help_spawn:
            # Each start waits for the new thread to win the GIL once; under load that
            # is tens of milliseconds. Every new thread starting one more doubles the
            # rate at which a burst of connections gets its threads. It starts one the
            # spawner made: making a Thread raises and catches three AttributeErrors in
            # threading.Condition, and formatting their messages goes a page deeper
            # into this thread's C stack than serving ever does. That page would stay
            # resident for the thread's life: 4 KiB more per idle connection.
            thread = self._take_unstarted()
            try:
                if thread is None:
                    raise LookupError("none made yet")
                self._start_thread(thread)
            except Exception:
                with self._cond:
                    self._starting -= 1
                    self._cond.notify_all()   # the spawner makes up for it
        try:
            while (job := self._next_job()) is not None:
                try:
                    self._run(job)
                except BaseException as exc:   # a bug in the runner: record it, keep the books
                    self.faults.record(exc, me.name)
                finally:
                    job = None
                    me.name = spare_name
                    with self._cond:
                        self._busy -= 1
                        if self._stopping or self._surplus >= self._max_spare:
                            return
                        self._surplus += 1
        finally:
            with self._cond:
                self._threads.discard(me)

    def _next_job(self) -> Job | None:
        """Wait for a job; None to exit. The caller has counted itself in ``surplus``."""
        while True:
            # More threads waiting than max_spare allows (one started for a job another
            # thread took first): wait only a moment, then go, rather than spare_timeout.
            timeout = (self._spare_timeout if self._surplus <= self._max_spare
                       else min(self._spare_timeout, _SURPLUS_WAIT))
            try:
                return self._jobs.get(timeout=timeout)
            except queue.Empty:
                with self._cond:
                    # A job may have been queued for us as the wait timed out: run it
                    # (even when stopping; its connection is then cancelled at once).
                    try:
                        return self._jobs.get_nowait()
                    except queue.Empty:
                        pass
                    if self._stopping or self._surplus > self._min_spare:
                        self._surplus -= 1
                        return None
