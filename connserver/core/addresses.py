"""Peer addresses as people read them, and as per-address limits count them."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["describe", "format_peer", "ip_of"]


def format_peer(peer: object) -> str:
    """``host:port`` (``[v6]:port`` for IPv6), or the Unix socket path."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peer, (bytes, str)):
        return (peer.decode(errors="replace") if isinstance(peer, bytes) else peer) or "unix"
    return str(peer)


def ip_of(address: Any) -> str:
    """The host part of a peer address ("unix" for a Unix socket peer)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "unix"


def describe(sock: socket.socket) -> str:
    """A listening socket for log lines: ``host:port``, ``[v6]:port`` or ``unix:/path``."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address if isinstance(address, str) else address.decode()}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
