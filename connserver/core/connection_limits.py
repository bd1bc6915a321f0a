"""Connection limits: how many connections may be open, in all and per address.

(Not to be confused with ``run_slots`` — how many handler threads may run at
once — or ``rate_limits`` — how fast a connection may send.) A global
semaphore and a per-address table.

The global slot is taken *before* a handler thread is given the connection, so
the number of handler threads never exceeds ``max_connections``. The per-address
table drops an entry as soon as its count reaches zero, so its size is bounded
by the number of live connections, however many addresses have connected.
"""

from __future__ import annotations

import threading

__all__ = ["ConnectionLimiter"]


class ConnectionLimiter:
    """``max_connections`` slots, and at most ``max_per_ip`` of them per address."""

    def __init__(self, max_connections: int, max_per_ip: int | None) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self._slots = threading.Semaphore(max_connections)
        self._lock = threading.Lock()
        self._per_ip: dict[str, int] = {}
        self._woken = False

    def acquire_slot_nowait(self) -> bool:
        """Take a global slot if one is free (never blocks)."""
        return self._slots.acquire(blocking=False)

    def wait_for_slot(self, timeout: float | None = None) -> bool:
        """Block until a global slot is free (or :meth:`wake` is called)."""
        acquired = self._slots.acquire(timeout=timeout)
        if acquired and self._woken:
            # This was the extra release from wake(): give it back and report no slot.
            self._slots.release()
            return False
        return acquired

    def wake(self) -> None:
        """Release a waiter of :meth:`wait_for_slot` (used at shutdown)."""
        self._woken = True
        self._slots.release()

    def release_slot(self) -> None:
        self._slots.release()

    def acquire_ip_nowait(self, ip: str) -> bool:
        """Count one more connection from ``ip``, unless it is at its limit."""
        if self.max_per_ip is None:
            return True
        with self._lock:
            count = self._per_ip.get(ip, 0)
            if count >= self.max_per_ip:
                return False
            self._per_ip[ip] = count + 1
            return True

    def release_ip(self, ip: str | None) -> None:
        if self.max_per_ip is None or ip is None:
            return
        with self._lock:
            count = self._per_ip.get(ip, 0) - 1
            if count > 0:
                self._per_ip[ip] = count
            else:
                self._per_ip.pop(ip, None)

    def addresses_tracked(self) -> int:
        """Entries in the per-address table (zero once every connection ended)."""
        with self._lock:
            return len(self._per_ip)
