"""What runs on a connection's own thread before its handler: PROXY header, then TLS.

Both run under ``handshake_timeout`` as one absolute deadline, and on the
connection's thread, never on the accept loop, so one client that sends half
a header (or never a ClientHello) holds up no one else.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Iterable

from .errors import RemoteProtocolError
from .proxy_protocol import MAX_V2_PAYLOAD, ProxyHeader, header_length, parse

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["read_proxy_header", "TrustedNetworks"]

_PEEK_LIMIT = 16 + MAX_V2_PAYLOAD
_TIMER_SLACK = 0.005


class TrustedNetworks:
    """The networks allowed to send PROXY headers."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __contains__(self, host: object) -> bool:
        try:
            address = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            return False   # a Unix socket peer, for instance
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def read_proxy_header(conn: "Connection", expires_at: float) -> ProxyHeader:
    """Read exactly the PROXY header from ``conn``, nothing of what follows it.

    Peeks (``MSG_PEEK``) until the header is complete, then consumes only its
    bytes, so the application stream, or a TLS handshake, starts intact.
    """
    sock = conn.socket
    need: int | None = None
    seen = 0
    conn.operation = "handshake"
    try:
        while True:
            remaining = expires_at - conn._clock()
            if remaining <= 0:
                conn._deadline_exceeded("handshake")
            conn._set_timeout(socket.SO_RCVTIMEO, remaining)
            try:
                if seen:   # wait until more than what we have seen has arrived
                    more = sock.recv(need or seen + 1, socket.MSG_PEEK | socket.MSG_WAITALL)
                    if len(more) <= seen:
                        # A waiting-for-all read that times out returns what it has.
                        if expires_at - conn._clock() <= _TIMER_SLACK:
                            conn._deadline_exceeded("handshake")
                        raise RemoteProtocolError("connection closed inside the PROXY header")
                data = sock.recv(_PEEK_LIMIT, socket.MSG_PEEK)
            except OSError as exc:
                conn._io_failed(exc, "handshake")
            if not data:
                raise RemoteProtocolError("connection closed before its PROXY header")
            seen = len(data)
            need = header_length(data)
            if need is not None and seen >= need:
                break
        try:
            header = sock.recv(need, socket.MSG_WAITALL)
        except OSError as exc:
            conn._io_failed(exc, "handshake")
        if len(header) != need:
            raise RemoteProtocolError("connection closed inside the PROXY header")
        return parse(header)
    finally:
        conn.operation = None
