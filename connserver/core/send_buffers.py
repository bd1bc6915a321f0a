"""Lists of buffers written with ``sendmsg``: partial writes, and how much to take at once.

One helper for everything that writes a list of buffers (the connection's
blocking writes, its non-blocking ones for a hub's writer, TLS encryption in
bounded steps): after a partial write, drop what went and cut the first
buffer not wholly sent, without copying.
"""

from __future__ import annotations

import socket

__all__ = ["IOV_MAX", "SEND_FLAGS", "skip_sent", "take_up_to"]

IOV_MAX = 1024   # buffers per sendmsg (Linux's IOV_MAX)
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)   # a broken pipe is an error, not a signal


def skip_sent(buffers: list, first: int, sent: int) -> int:
    """After a write of ``sent`` bytes from ``buffers[first:]``: the first one not fully
    sent (its sent part cut off), or ``len(buffers)``."""
    while first < len(buffers) and sent >= len(buffers[first]):
        sent -= len(buffers[first])
        first += 1
    if sent:
        buffers[first] = memoryview(buffers[first])[sent:]
    return first


def take_up_to(buffers: list, first: int, limit: int) -> tuple:
    """Up to ``limit`` bytes from ``buffers[first:]`` as one buffer (joined only if they
    are several), and the index of the first buffer not wholly taken (see skip_sent)."""
    end, size = first, 0
    while end < len(buffers) and size < limit:
        size += len(buffers[end])
        end += 1
    data = buffers[first] if end - first == 1 else b"".join(buffers[first:end])
    if size > limit:
        data = memoryview(data)[:limit]
    return data, skip_sent(buffers, first, min(size, limit))
