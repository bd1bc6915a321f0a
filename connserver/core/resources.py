"""Server-wide resources: objects shared by connections, made on first use, closed last.

A chat room, a hub, a connection pool to a database: one per server, made the
first time a handler asks (``server.resource(key, factory)``), and closed at
shutdown after every connection has ended, so no handler sees one closed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar

__all__ = ["Resources"]

T = TypeVar("T")

log = logging.getLogger("connserver.server")


class Resources:
    """The shared objects of one server, by key."""

    def __init__(self) -> None:
        self._objects: dict[Any, Any] = {}
        self._lock = threading.RLock()   # a factory may ask for another resource
        self._closed = False

    def get(self, key: Any, factory: Callable[[], T]) -> T:
        """The object for ``key``, made by ``factory`` on first use."""
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                if self._closed:
                    raise RuntimeError("server is shutting down") from None
                value = self._objects[key] = factory()
                return value

    def refuse_new(self) -> None:
        """From now on (a shutdown began), make nothing new."""
        with self._lock:
            self._closed = True

    def close_all(self) -> None:
        """Close every object that has a ``close()``; log what fails or times out."""
        with self._lock:
            self._closed = True
            objects, self._objects = list(self._objects.values()), {}
        for resource in objects:
            close = getattr(resource, "close", None)
            if close is None:
                continue
            try:
                if close() is False:
                    log.error("%r did not close in time", resource)
            except Exception:
                log.exception("closing %r failed", resource)
