"""What every hostile scenario ends with, and small client-side helpers."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from typing import IO, Callable

import connserver
from connserver.testing import LeakSnapshot, find_leaks, leak_snapshot, open_fds, wait_for

__all__ = ["PipeLines", "assert_no_leftovers", "assert_shutdown_clean", "conn_threads",
           "leak_snapshot", "read_exactly", "frame", "rss_bytes"]

# Handler threads wait under this name for their next connection; they are the
# pool's, not a connection's, and exit on their own after spare_thread_timeout.
SPARE_PREFIX = "connserver-spare-"
CONN_PREFIX = "connserver-conn-"


def conn_threads() -> list[threading.Thread]:
    """Threads serving a connection right now."""
    return [t for t in threading.enumerate() if t.name.startswith(CONN_PREFIX)]


def _extra_threads(baseline: LeakSnapshot, allowed: tuple[str, ...]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and (
        t.name.startswith(CONN_PREFIX)
        or (t.ident not in baseline.threads and not t.name.startswith(allowed)))]


def _extra_fds(baseline: LeakSnapshot) -> dict[int, str]:
    extra = {}
    for fd in open_fds() - baseline.fds:
        try:
            extra[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass   # the fd the listing itself used, closed by now
    return extra


def assert_no_leftovers(server: connserver.Server, baseline: LeakSnapshot, *,
                        allowed_threads: tuple[str, ...] = (SPARE_PREFIX,),
                        timeout: float = 10.0) -> None:
    """Once every client left, the running server holds nothing of them.

    Registry, per-address table and buffer leases are empty; no thread serves a
    connection; no thread other than ``allowed_threads`` (spare handler threads)
    and no fd exists that did not at ``baseline`` (taken with the server running
    and no client connected). Waits up to ``timeout`` (a safety net: a handler
    finishes its cleanup just after its client sees the socket close).
    """
    wait_for(lambda: not server.connections() and server.stats().connections_active == 0
             and server.stats().handler_threads == 0, timeout)
    assert server.connections() == []
    assert server.stats().connections_active == 0
    assert server.stats().handler_threads == 0
    assert server.limiter.addresses_tracked() == 0
    assert server.buffer_pool.statistics().leased == 0
    wait_for(lambda: not _extra_threads(baseline, allowed_threads) and not _extra_fds(baseline),
             timeout)
    threads = _extra_threads(baseline, allowed_threads)
    assert not threads, f"threads left behind: {[t.name for t in threads]}"
    fds = _extra_fds(baseline)
    assert not fds, f"fds left behind: {fds}"


def assert_shutdown_clean(server: connserver.Server, before: LeakSnapshot,
                          grace: float = 5.0) -> connserver.ShutdownReport:
    """Shut ``server`` down; nothing it started may outlive it (``before``: pre-server)."""
    report = server.shutdown(grace=grace)
    server.server_close()
    assert report.clean, [f"{t.name}\n{t.stack}" for t in report.stuck]
    problems = find_leaks(before)
    assert not problems, "\n".join(problems)
    return report


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes (the socket's own timeout is the safety net)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def frame(payload: bytes) -> bytes:
    """``payload`` as one ``!I`` length-prefixed frame."""
    return struct.pack("!I", len(payload)) + payload


def rss_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PipeLines:
    """Lines from a child's pipe, read with a deadline (never blocking past it)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""
        self.lines: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                self.lines.append(line.decode(errors="replace"))
                if predicate(self.lines[-1]):
                    return self.lines[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
