"""A DELIBERATELY LEAKING echo handler, for demonstrations and tests only.

``connserver serve leaky-echo`` behaves exactly like ``echo`` from the outside,
but it commits the classic long-lived-server leak: a module-level list that
everything is appended to and nothing is ever removed from. Every connection's
handler (and so its Connection, cancel token and peer address) is kept, and
every message received adds a :data:`RETAINED_BYTES_PER_MESSAGE` chunk, so RSS
climbs steadily with traffic while threads, fds and connections still return
to normal: the kind of leak only a memory-over-time view shows. ``connserver
soak`` must fail it (see docs/howto/soak.md); never use it for anything else.
"""

from __future__ import annotations

from ..core.handler import Handler

__all__ = ["LeakyEchoHandler", "RETAINED_BYTES_PER_MESSAGE"]

# Big enough that a few seconds of soak traffic (about 100 messages a second)
# shows as megabytes, far above the allocator's noise.
RETAINED_BYTES_PER_MESSAGE = 64 * 1024

# The bug, on purpose: module-level, unbounded, never cleared.
_retained: list[object] = []


class LeakyEchoHandler(Handler):
    """Echo that keeps every handler and 64 KiB per message forever. A demonstration leak."""

    def setup(self) -> None:
        _retained.append(self)   # pins the handler, its connection, its cancel token...

    def handle(self) -> None:
        recv, sendall = self.conn.recv, self.conn.sendall
        while data := recv():
            # A fresh object every time (repeating one byte writes every page, so the
            # memory is really resident, unlike a calloc'd bytes(n)).
            _retained.append(data[:1] * RETAINED_BYTES_PER_MESSAGE)
            sendall(data)
