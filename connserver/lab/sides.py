"""The two kinds of server a lab's side runs on, each bounded and on 127.0.0.1 port 0.

- :class:`StdlibSide`: the standard library's ``socketserver.ThreadingTCPServer``,
  what a learner writes first, and where the article's bugs are most at home.
  It admits at most ``max_connections`` at once (refusing the rest), so a
  broken handler can pin only so many threads on a learner's machine.
- :class:`ConnserverSide`: a :class:`connserver.Server` with the lab's handler
  and configuration.

Both report ``connections`` (open now) as a side figure, plus whatever the
lab's ``figures`` callable adds.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Any, Callable, Mapping

from ..config import Config
from ..core.handler import Handler
from ..core.server import Server

__all__ = ["StdlibSide", "ConnserverSide"]

_STOP_TIMEOUT = 0.5


class _BoundedThreadingServer(socketserver.ThreadingTCPServer):
    """ThreadingTCPServer that counts its live handlers and refuses past a bound."""

    allow_reuse_address = True
    # socketserver listens with a backlog of 5: a burst of connects (a lab's load)
    # would have SYNs dropped and retried a second later, which is not the lesson.
    request_queue_size = 128
    # Daemon threads so the demonstration process can exit at all: with the
    # default (False), server_close() joins every handler thread, and a handler
    # blocked forever makes it wait forever (lab vanished-peer shows why).
    daemon_threads = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler], max_connections: int) -> None:
        self.max_connections = max_connections
        self.live = 0
        self.refused = 0
        self._count_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._count_lock:
            if self.live >= self.max_connections:
                self.refused += 1
                return False
            self.live += 1
            return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)   # type: ignore[misc]
        finally:
            with self._count_lock:
                self.live -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer's reset is part of the lesson, not a traceback on stderr."""


class StdlibSide:
    """A lab side on ``socketserver.ThreadingTCPServer``, served from a thread.

    ``attributes`` are set on the server object, where handlers find their
    shared state (``self.server.pool``, ``self.server.recent``…).
    """

    def __init__(self, handler: type[socketserver.BaseRequestHandler], *, max_connections: int,
                 attributes: Mapping[str, Any] | None = None,
                 figures: Callable[["StdlibSide"], Mapping[str, float]] | None = None) -> None:
        self.server = _BoundedThreadingServer(handler, max_connections)
        for name, value in (attributes or {}).items():
            setattr(self.server, name, value)
        self.address: tuple[str, int] = self.server.server_address[:2]   # type: ignore[assignment]
        self._figures = figures
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        name="connserver-lab-serve", daemon=True)
        self._thread.start()

    def figures(self) -> Mapping[str, float]:
        found = {"connections": self.server.live, "refused": self.server.refused}
        if self._figures is not None:
            found.update(self._figures(self))
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(_STOP_TIMEOUT)
        self.server.server_close()


class ConnserverSide:
    """A lab side on :class:`connserver.Server`."""

    def __init__(self, handler: type[Handler], config: Config, *,
                 figures: Callable[["ConnserverSide"], Mapping[str, float]] | None = None) -> None:
        self.server = Server(("127.0.0.1", 0), handler, config, name="lab")
        self.server.start()
        self.address: tuple[str, int] = self.server.server_address[:2]
        self._figures = figures

    def figures(self) -> Mapping[str, float]:
        stats = self.server.stats()
        found = {"connections": stats.connections_active, "refused": stats.connections_rejected}
        if self._figures is not None:
            found.update(self._figures(self))
        return found

    def stop(self) -> None:
        self.server.shutdown(grace=_STOP_TIMEOUT)
        self.server.server_close()
