"""Faults: unexpected exceptions in the server's long-lived threads, survived and counted.

A server must never look alive while a thread it needs is dead. The accept
loop, the watchdog and a hub's writer each serve many connections; an
exception raised by one connection's work (a bug, an odd socket state, a value
nothing checked) must end at most that connection, never the thread. So those
loops catch what reaches them, record it here and carry on: the first fault of
each kind is logged with its traceback, every fault is counted
(``internal_errors`` in stats and metrics), and a fault repeating in a tight
loop cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

__all__ = ["Faults"]

_MAX_KINDS = 64   # kinds remembered for "logged once"; more are all logged at DEBUG


class Faults:
    """The fault record of one long-lived thread (its ``role``: accept, watchdog, hub…)."""

    def __init__(self, role: str, logger: logging.Logger,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self.role = role
        self.count = 0
        self._log = logger
        self._on_fault = on_fault
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, exc: BaseException, context: str = "") -> None:
        """Log ``exc`` (with its traceback the first time its kind is seen) and count it."""
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        kind = (type(exc).__name__,
                "" if where is None else f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}")
        with self._lock:
            self.count += 1
            first = kind not in self._seen and len(self._seen) < _MAX_KINDS
            if first:
                self._seen.add(kind)
        suffix = f" ({context})" if context else ""
        if first:
            self._log.error("%s thread: unexpected %s%s; carrying on (logged once per kind, "
                            "counted in internal_errors)", self.role, type(exc).__name__, suffix,
                            exc_info=exc)
        else:
            self._log.debug("%s thread: unexpected %s%s again: %s", self.role,
                            type(exc).__name__, suffix, exc)
        if self._on_fault is not None:
            self._on_fault(self.role)
