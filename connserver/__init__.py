"""connserver: long-lived TCP connections on blocking sockets, one thread each, leak-free.

The public API is the names below. The package is layered (see
docs/explanation/architecture.md): ``protocols`` (sans-I/O), ``core`` (server,
connections, handlers), ``broadcast`` (hub), ``operations`` (admin, metrics,
diagnostics), ``daemon`` (the command line), ``soak``. Importing this package
imports them all, which is what attaches the admin endpoint and the hub to
:class:`Server`. Module paths from before the layers existed keep working as
aliases (``connserver.framing``, ``connserver.hub``, ``connserver.ratelimit``…).
"""

import sys as _sys

from .core.buffers import BufferLease, BufferPool, PoolStatistics
from .core.cancel import CancelToken, Watchdog
from .config import Config
from .core.connection import Connection
from .core.stats import ConnectionInfo
from .core.deadline import Deadline
from .protocols import framing
from .errors import (
    Cancelled,
    CloseReason,
    ConfigError,
    ConnectionBroken,
    ConnServerError,
    DeadlineExceeded,
    FrameTooLarge,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RateLimited,
    RemoteProtocolError,
    SlowConsumer,
)
from .core.handler import FramedHandler, Handler, LineHandler
from .broadcast.hub import Hub, Subscription
from .broadcast.queues import ByteBoundedQueue, QueueClosed, QueueEmpty, QueueFull
from .core.rate_limits import TokenBucket
from .core.server import Server, ShutdownReport, StuckThread
from .core.stats import ServerStatistics
from .broadcast import backplane as _backplane   # attaches the Redis backplane to Server
from .operations import admin as _admin   # attaches the admin endpoint to Server

# Module paths from before the layers, kept working: ``import connserver.framing``
# and ``from connserver.ratelimit import BucketTable`` still find the same modules.
_ALIASES = {
    "framing": "protocols.framing", "proxy_protocol": "protocols.proxy_protocol",
    "tls": "protocols.tls", "hub": "broadcast.hub", "queues": "broadcast.queues",
    "buffers": "core.buffers", "cancel": "core.cancel", "connection": "core.connection",
    "deadline": "core.deadline", "handler": "core.handler", "server": "core.server",
    "stats": "core.stats", "threads": "core.threads", "ratelimit": "core.rate_limits",
    "admission": "core.run_slots", "limits": "core.connection_limits",
    "admin": "operations.admin", "metrics": "operations.metrics",
    "diagnostics": "operations.diagnostics",
}


def _alias_old_module_paths() -> None:
    import importlib

    for old, new in _ALIASES.items():
        _sys.modules.setdefault(f"{__name__}.{old}", importlib.import_module(f"{__name__}.{new}"))


_alias_old_module_paths()
del _admin


def __getattr__(name: str) -> object:
    # WebSocketHandler needs the optional wsproto (pip install 'connserver[websocket]'):
    # imported on first use, so `import connserver` works without it.
    if name == "WebSocketHandler":
        try:
            from .core.websocket_handler import WebSocketHandler
        except ModuleNotFoundError as exc:
            raise ImportError(f"connserver.WebSocketHandler needs {exc.name}: "
                              "pip install 'connserver[websocket]'") from exc
        return WebSocketHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "BufferLease",
    "ByteBoundedQueue",
    "BufferPool",
    "CancelToken",
    "Cancelled",
    "CloseReason",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionBroken",
    "ConnectionInfo",
    "ConnServerError",
    "Deadline",
    "DeadlineExceeded",
    "FrameTooLarge",
    "framing",
    "LimitExceeded",
    "FramedHandler",
    "Handler",
    "Hub",
    "LineHandler",
    "LocalProtocolError",
    "PoolStatistics",
    "ProtocolError",
    "QueueClosed",
    "QueueEmpty",
    "QueueFull",
    "RateLimited",
    "RemoteProtocolError",
    "Server",
    "ServerStatistics",
    "ShutdownReport",
    "SlowConsumer",
    "StuckThread",
    "Subscription",
    "TokenBucket",
    "Watchdog",
    "WebSocketHandler",
    "__version__",
]
