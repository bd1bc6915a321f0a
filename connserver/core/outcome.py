"""Why a connection ended: mapping what stopped its handler to a close reason.

Peer faults (deadlines, resets, protocol errors, limits) are logged briefly at
INFO, without a traceback: they are the peer's business, counted in stats.
Anything else is a bug in handler code, logged once at ERROR with its traceback.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import Cancelled, CloseReason, ConnServerError, LocalProtocolError

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["classify_failure"]

log = logging.getLogger("connserver.conn")

_PEER_RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def classify_failure(conn: "Connection", exc: BaseException) -> CloseReason:
    """The close reason for ``exc`` ending ``conn``'s handler, logged as it deserves."""
    prefix = f"#{conn.id} {conn.peer_label}"
    if isinstance(exc, Cancelled):
        log.debug("%s cancelled (%s)", prefix, exc.reason.value)
        return exc.reason
    if isinstance(exc, ConnServerError) and not isinstance(exc, LocalProtocolError):
        reason = exc.close_reason
        if reason is CloseReason.ERROR:
            log.error("%s handler failed: %s", prefix, exc, exc_info=exc)
        else:
            log.info("%s closing: %s", prefix, exc)
        return reason
    if isinstance(exc, _PEER_RESETS):
        log.info("%s closing: peer reset (%s)", prefix, exc)
        return CloseReason.RESET
    if isinstance(exc, OSError) and conn.cancel_token.cancelled:
        # An OSError on a socket the watchdog shut down is the cancellation showing.
        return conn.cancel_token.reason or CloseReason.CANCELLED
    log.error("%s handler raised %s", prefix, type(exc).__name__, exc_info=exc)
    return CloseReason.ERROR
