"""What ``Server.shutdown()`` reports, including threads that would not stop, with stacks."""

from __future__ import annotations

import dataclasses
import sys
import threading
import traceback
from typing import Iterable

__all__ = ["ShutdownReport", "StuckThread", "describe_thread", "stack_of", "thread_stacks"]


@dataclasses.dataclass(frozen=True)
class StuckThread:
    """A handler thread still alive after shutdown: its name, connection and stack."""

    name: str
    conn_id: int | None
    stack: str


@dataclasses.dataclass(frozen=True)
class ShutdownReport:
    """What ``shutdown()`` did."""

    connections_at_start: int   # live when shutdown began
    drained: int                # ended within the grace period
    forced: int                 # had their sockets forced shut (grace over, or cut short)
    stuck: tuple[StuckThread, ...]  # threads still alive at the end (some of the forced)
    duration: float

    @property
    def clean(self) -> bool:
        return not self.stuck


def describe_thread(thread: threading.Thread) -> StuckThread:
    """A thread still alive at the end of a shutdown, with its stack."""
    stack = stack_of(thread.ident)
    conn_id = None
    if "-conn-" in thread.name:
        try:
            conn_id = int(thread.name.rsplit("-", 1)[1])
        except ValueError:
            pass
    return StuckThread(name=thread.name, conn_id=conn_id, stack=stack)


def stack_of(ident: int | None) -> str:
    """The formatted current stack of the thread ``ident`` (for reports and logs)."""
    frame = sys._current_frames().get(ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)\n"


def thread_stacks(threads: Iterable[threading.Thread] | None = None) -> list[tuple[str, str]]:
    """(name, formatted stack) of each thread (all threads by default)."""
    return [(thread.name, stack_of(thread.ident))
            for thread in (threads if threads is not None else threading.enumerate())]
