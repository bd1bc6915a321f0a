"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET, standard library only.

``READY=1`` once listening, ``STOPPING=1`` when a drain starts, ``STATUS=...``
lines for ``systemctl status``, and ``WATCHDOG=1`` pings at half of
``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``. Without
``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger("connserver.systemd")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]   # an abstract socket
        self._address = address or None
        self._watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self._watchdog_interval = int(usec) / 2_000_000
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, if systemd asked for them."""
        return self._watchdog_interval if self.enabled else None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (e.g. "READY=1", "STATUS=...") as one datagram."""
        if self._address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError as exc:
            log.warning("systemd notification failed: %s", exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def forget_environment() -> None:
        """Stop children (workers) from talking to systemd as if they were the service."""
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                     "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
