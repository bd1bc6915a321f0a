"""The exception tree, and the close reasons every connection ends with.

::

    ConnServerError
     ├── ConfigError                     bad configuration, raised at start-up
     ├── DeadlineExceeded (TimeoutError) an I/O phase ran past its deadline
     ├── ConnectionBroken                the peer reset or vanished (from an OSError)
     ├── SlowConsumer                    a consumer's queue overflowed (disconnect policy)
     ├── RateLimited                     a peer exceeded its rate (on_rate_limit="close")
     ├── LimitExceeded                   a connection limit refused the peer
     └── ProtocolError
          ├── RemoteProtocolError        the peer broke the protocol
          │    └── FrameTooLarge         ... by announcing an oversized frame
          └── LocalProtocolError         our code asked for something illegal

    BaseException
     └── Cancelled                       the connection was cancelled; like
                                         asyncio.CancelledError it is not an
                                         Exception, so `except Exception:` in a
                                         handler cannot swallow it

Exceptions carry small values (strings, ints, enums), never a socket, a
connection or a buffer: an exception kept in a log record or a traceback must
not keep a connection's memory alive.
"""

from __future__ import annotations

import enum

__all__ = [
    "CloseReason",
    "ConnServerError",
    "ConfigError",
    "DeadlineExceeded",
    "ConnectionBroken",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "FrameTooLarge",
    "Cancelled",
    "SlowConsumer",
    "RateLimited",
    "LimitExceeded",
]


class CloseReason(str, enum.Enum):
    """Why a connection ended; counted in stats and written to the access log."""

    EOF = "eof"                       # the peer closed cleanly
    RESET = "reset"                   # the peer reset the connection
    CLOSED = "closed"                 # the handler returned before the peer closed
    IDLE = "idle"                     # no new message within idle_timeout
    READ_DEADLINE = "read_deadline"   # a started message not complete within read_timeout
    WRITE_DEADLINE = "write_deadline" # a write not complete within write_timeout
    HANDSHAKE_DEADLINE = "handshake_deadline"
    LIFETIME = "lifetime"             # max_lifetime reached
    CANCELLED = "cancelled"           # cancelled by an operator or by code
    SHUTDOWN = "shutdown"             # the server is shutting down
    SLOW_CONSUMER = "slow_consumer"   # the peer did not drain its queue
    FRAME_TOO_LARGE = "frame_too_large"
    PROTOCOL_ERROR = "protocol_error"
    RATE_LIMITED = "rate_limited"
    LIMIT = "limit"                   # rejected by max_connections / max_connections_per_ip
    REJECTED = "rejected"             # the handler refused the peer's request (a WebSocket upgrade)
    KEEPALIVE = "keepalive_timeout"   # no answer to a keepalive ping within its timeout
    ERROR = "error"                   # the handler raised

    def __str__(self) -> str:
        return self.value


class ConnServerError(Exception):
    """Root of every error connserver raises (except :class:`Cancelled`)."""

    #: The close reason recorded when this error ends a connection.
    close_reason: CloseReason = CloseReason.ERROR


class ConfigError(ConnServerError, ValueError):
    """A configuration value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"invalid configuration {self.field!r}: {self.message}"


class DeadlineExceeded(ConnServerError, TimeoutError):
    """An I/O phase (``idle``, ``read``, ``write``, ``handshake``) ran out of time."""

    _REASONS = {
        "idle": CloseReason.IDLE,
        "read": CloseReason.READ_DEADLINE,
        "write": CloseReason.WRITE_DEADLINE,
        "handshake": CloseReason.HANDSHAKE_DEADLINE,
    }

    def __init__(self, phase: str, timeout: float | None = None) -> None:
        super().__init__(phase, timeout)
        self.phase = phase
        self.timeout = timeout

    @property
    def close_reason(self) -> CloseReason:  # type: ignore[override]
        return self._REASONS.get(self.phase, CloseReason.READ_DEADLINE)

    def __str__(self) -> str:
        if self.timeout is None:
            return f"{self.phase} deadline exceeded"
        return f"{self.phase} deadline exceeded ({self.timeout:g} s)"


class ConnectionBroken(ConnServerError, ConnectionError):
    """The peer reset the connection or it broke; chained from the ``OSError``."""

    close_reason = CloseReason.RESET

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SlowConsumer(ConnServerError):
    """A consumer did not drain its bounded queue; its connection should end."""

    close_reason = CloseReason.SLOW_CONSUMER


class RateLimited(ConnServerError):
    """A peer sent faster than its rate allows, and the policy is to close."""

    close_reason = CloseReason.RATE_LIMITED


class LimitExceeded(ConnServerError):
    """A connection limit (such as max_connections_per_ip) refused this peer."""

    close_reason = CloseReason.LIMIT


class ProtocolError(ConnServerError):
    """A protocol rule was broken; see the two subclasses for whose fault it was."""

    close_reason = CloseReason.PROTOCOL_ERROR


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol does not allow."""

    close_reason = CloseReason.ERROR


class FrameTooLarge(RemoteProtocolError):
    """The peer announced or sent a frame larger than the configured maximum."""

    close_reason = CloseReason.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"frame of {self.size} bytes exceeds the limit of {self.limit} bytes"


class Cancelled(BaseException):
    """The connection was cancelled; raised by every later call on it.

    Derives from ``BaseException`` so that ``except Exception:`` in a handler
    does not swallow it. A handler may catch it explicitly to say goodbye, then
    should return or re-raise.
    """

    def __init__(self, reason: CloseReason | str = CloseReason.CANCELLED) -> None:
        reason = CloseReason(reason)
        super().__init__(reason)
        self.reason = reason

    @property
    def close_reason(self) -> CloseReason:
        return self.reason

    def __str__(self) -> str:
        return f"connection cancelled ({self.reason.value})"
