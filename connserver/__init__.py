"""connserver: long-lived TCP connections on blocking sockets, one thread each, leak-free."""

from .buffers import BufferLease, BufferPool, PoolStatistics
from .cancel import CancelToken, Watchdog
from .config import Config
from .connection import Connection
from .stats import ConnectionInfo
from .deadline import Deadline
from . import framing
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
from .handler import FramedHandler, Handler, LineHandler
from .hub import Hub, Subscription
from .queues import ByteBoundedQueue, QueueClosed, QueueEmpty, QueueFull
from .rate_limits import TokenBucket
from .server import Server, ShutdownReport, StuckThread
from .stats import ServerStatistics
from . import admin as _admin   # noqa: F401  (attaches the admin endpoint to Server)

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
    "__version__",
]
