"""Lab 3, pinned-buffer: a memoryview slice of a pooled buffer kept by the caller, vs a copy.

The article reads into a pooled 4 KiB ``[]byte`` and warns that
``data := buf[:n]; go process(data)`` keeps the whole array alive for as long
as ``process`` keeps the slice. Python's slice of a ``memoryview`` does the
same to a ``bytearray``.

Both sides are the same echo-less reader on the standard library's
``socketserver`` (``recv_into`` a buffer leased from a
:class:`connserver.BufferPool` of 64 KiB buffers), and both keep the last
``keep`` messages for a debug page (a ``deque`` with a ``maxlen``: bounded in
count, which is why the bug hides). They differ in one line:

- Broken (a demonstration): keeps ``view[:n]``, a view into the pooled
  buffer. The pool sees the buffer come back still exported, so it drops it
  instead of reusing it (reuse would overwrite the kept message), and each
  kept message of ~200 bytes holds 64 KiB. At most ``keep`` × 64 KiB.
- Fixed: keeps ``bytes(view[:n])``, a copy of exactly ``n`` bytes, and the
  buffer goes back to the pool for the next read. (connserver's own
  ``Connection.recv()`` does this for you.)

Figures, all from pympler in the side's process: ``asizeof`` of the kept
messages (it counts a view as its 184-byte header, so both sides look the
same) and every ``bytearray`` alive in the heap (``muppy``), which is where
the kept views' memory really is.
"""

from __future__ import annotations

import collections
import socketserver
from typing import Mapping

from ..core.buffers import BufferPool
from .driver import Session
from .sides import StdlibSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "ViewKeepingReader", "CopyingReader", "bytearrays_alive"]


# --- the broken side: a demonstration --------------------------------------------------

class ViewKeepingReader(socketserver.BaseRequestHandler):
    """BROKEN ON PURPOSE, for ``connserver lab pinned-buffer``: keeps views of pooled buffers."""

    def handle(self) -> None:
        pool, recent = self.server.pool, self.server.recent   # type: ignore[attr-defined]
        while True:
            with pool.lease() as buf, memoryview(buf) as view:
                n = self.request.recv_into(view)
                if not n:
                    return
                data = view[:n]          # a view of the pooled 64 KiB buffer, not a copy
                recent.append(data)      # kept: the whole buffer stays alive with it
            self.request.sendall(b"k")


# --- the fixed side ---------------------------------------------------------------------

class CopyingReader(socketserver.BaseRequestHandler):
    """The same reader, keeping an exact-size copy: the buffer goes back to the pool."""

    def handle(self) -> None:
        pool, recent = self.server.pool, self.server.recent   # type: ignore[attr-defined]
        while True:
            with pool.lease() as buf, memoryview(buf) as view:
                n = self.request.recv_into(view)
                if not n:
                    return
                data = bytes(view[:n])   # a copy of exactly n bytes
                recent.append(data)
            self.request.sendall(b"k")


# --- the two sides and the load ---------------------------------------------------------

def bytearrays_alive() -> int:
    """Bytes of every ``bytearray`` in the heap, found by pympler's muppy (a heap walk)."""
    from pympler import asizeof, muppy

    return sum(asizeof.flatsize(obj) for obj in muppy.get_objects() if type(obj) is bytearray)


def _figures(side: StdlibSide) -> Mapping[str, float]:
    from pympler import asizeof

    kept = list(side.server.recent)   # type: ignore[attr-defined]
    # The items, not the deque: asizeof does not look inside a deque.
    return {"kept": len(kept), "kept_asizeof": asizeof.asizeof(*kept) if kept else 0,
            "retained": bytearrays_alive(),
            "pinned": side.server.pool.statistics().pinned}   # type: ignore[attr-defined]


def start_side(side: str, plan: Plan) -> Side:
    handler = ViewKeepingReader if side == "broken" else CopyingReader
    state = {"pool": BufferPool(plan["buffer_size"], max_free=8),
             "recent": collections.deque(maxlen=plan["keep"])}
    return StdlibSide(handler, max_connections=plan["connections"], attributes=state,
                      figures=_figures)


def drive(session: Session) -> None:
    """``connections`` clients, each sending ``rate`` messages a second of ``message_size`` bytes."""
    size = session.plan["message_size"]

    def client(index: int) -> None:
        sock = session.connect()
        try:
            for tick in session.ticks(session.plan["rate"]):
                sock.sendall(f"message {index}-{tick} ".encode().ljust(size, b"."))
                if sock.recv(1) != b"k":
                    raise ConnectionError("the server closed the connection")
                session.count("messages")
        finally:
            session.close(sock)

    session.in_parallel(session.plan["connections"], client)


LAB = Lab(
    number=3, name="pinned-buffer",
    title="a memoryview slice of a pooled buffer kept by the caller, vs a bytes copy",
    broken="keeps view[:n]", fixed="keeps bytes(view[:n])",
    explanation="buffers",
    figures=(
        Figure("kept", "messages kept"),
        Figure("kept_asizeof", "kept, by asizeof", "KiB"),
        Figure("retained", "bytearrays alive", "MiB"),
        Figure("pinned", "buffers pinned"),
        Figure("messages", "messages sent", source="driver"),
    ),
    check=Check("retained",
                leaked="Each kept message of a few hundred bytes holds a whole 64 KiB pooled "
                       "buffer alive, though asizeof counts only the view's header.",
                held="The kept copies are exactly their size; the pooled buffers went back "
                     "to the pool and were reused."),
    full=Plan(load_timeout=15.0, settle_timeout=2.0, threshold=8 * 1024 * 1024,
              params={"connections": 2, "rate": 50.0, "message_size": 200, "keep": 400,
                      "buffer_size": 65536}),
    short=Plan(load_timeout=2.0, settle_timeout=0.5, threshold=4 * 1024 * 1024,
               params={"connections": 2, "rate": 100.0, "message_size": 200, "keep": 200,
                       "buffer_size": 65536}),
    start_side=start_side, drive=drive,
)
