"""Absolute monotonic deadlines, with an injectable clock.

A per-call timeout is not a deadline: a peer that trickles one byte every
15 s never trips a 20 s timeout on each ``recv``. A :class:`Deadline` is fixed
once, when a unit of work starts, and every blocking call under it gets only
what is left.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["Clock", "Deadline", "monotonic"]

#: A clock is any zero-argument callable returning seconds (monotonic).
Clock = Callable[[], float]

monotonic: Clock = time.monotonic


class Deadline:
    """A point in time after which a unit of work has failed.

    ``Deadline(None)`` never expires; it exists so callers need not special-case
    "no limit" (which must be chosen explicitly).
    """

    __slots__ = ("expires_at", "_clock")

    def __init__(self, timeout: float | None, clock: Clock = monotonic) -> None:
        self._clock = clock
        self.expires_at: float | None = None if timeout is None else clock() + timeout

    @classmethod
    def at(cls, expires_at: float | None, clock: Clock = monotonic) -> "Deadline":
        """A deadline at an absolute time of ``clock``."""
        deadline = cls(None, clock)
        deadline.expires_at = expires_at
        return deadline

    def remaining(self) -> float | None:
        """Seconds left (may be zero or negative), or ``None`` for no limit."""
        if self.expires_at is None:
            return None
        return self.expires_at - self._clock()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def narrowed(self, timeout: float | None) -> "Deadline":
        """The earlier of this deadline and ``timeout`` seconds from now."""
        if timeout is None:
            return self
        candidate = self._clock() + timeout
        if self.expires_at is not None and self.expires_at <= candidate:
            return self
        return Deadline.at(candidate, self._clock)

    def __repr__(self) -> str:
        remaining = self.remaining()
        if remaining is None:
            return "Deadline(None)"
        return f"Deadline(remaining={remaining:.3f})"
