"""What runs on a connection's own thread before its handler: PROXY header, then TLS.

Both run under ``handshake_timeout`` as one absolute deadline, and on the
connection's thread, never on the accept loop, so one client that sends half
a header (or never a ClientHello) holds up no one else.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Iterable

from .addresses import ip_of
from ..config import Config
from .connection_limits import ConnectionLimiter
from .deadline import Clock, Deadline
from ..errors import LimitExceeded, RemoteProtocolError
from ..protocols.proxy_protocol import MAX_V2_PAYLOAD, ProxyHeader, header_length, parse
from .rate_limits import BucketTable, RateMeter, TokenBucket
from ..protocols.tls import server_context

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Preamble", "read_proxy_header", "TrustedNetworks"]

_PEEK_LIMIT = 16 + MAX_V2_PAYLOAD


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


def read_proxy_header(conn: "Connection", deadline: Deadline) -> ProxyHeader:
    """Read exactly the PROXY header from ``conn``, nothing of what follows it.

    Peeks until the header is complete, then consumes only its bytes, so the
    application stream, or a TLS handshake, starts intact. All of it within
    ``deadline`` (phase ``handshake``).
    """
    need: int | None = None
    seen = 0
    while True:
        wanted = need or seen + 1
        data = conn.peek(_PEEK_LIMIT, deadline, at_least=wanted)
        if len(data) < wanted:
            raise RemoteProtocolError("connection closed inside the PROXY header" if data
                                      else "connection closed before its PROXY header")
        seen = len(data)
        need = header_length(data)
        if need is not None and seen >= need:
            break
    conn.skip(need)
    return parse(data[:need])


class Preamble:
    """Everything a connection goes through before its handler, on its own thread.

    In order, under one ``handshake_timeout`` deadline: the PROXY header (only
    from a trusted proxy; the per-address connection limit then counts the real
    client), the TLS handshake, then the rate meter (whose per-address bucket
    needs the real client too).
    """

    def __init__(self, config: Config, limiter: ConnectionLimiter, clock: Clock) -> None:
        self.config = config
        self._limiter = limiter
        self._clock = clock
        self._trusted_proxies = (TrustedNetworks(config.trusted_proxy)
                                 if config.proxy_protocol else None)
        self._tls_context = server_context(config) if config.tls_cert else None
        self._ip_buckets = (BucketTable(config.ip_rate, max(1.0, config.ip_rate), clock=clock)
                            if config.ip_rate else None)
        self._server_bucket = (TokenBucket(config.server_rate, max(1.0, config.server_rate),
                                           clock=clock) if config.server_rate else None)

    @property
    def proxied(self) -> bool:
        """Peers are proxies: the client's address is known only after the header."""
        return self._trusted_proxies is not None

    def run(self, conn: "Connection") -> str | None:
        """Run the preamble on ``conn``; return the address whose per-address slot it
        took (behind a proxy, the real client's), for :meth:`ConnectionLimiter.release_ip`."""
        deadline = Deadline(self.config.handshake_timeout, self._clock)
        accounted_ip = None
        if self._trusted_proxies is not None:
            proxy = ip_of(conn.peer)
            if proxy not in self._trusted_proxies:
                raise RemoteProtocolError(f"PROXY header expected from a trusted proxy, "
                                          f"not from {proxy}")
            header = read_proxy_header(conn, deadline)
            if header.command == "PROXY" and header.source is not None:
                conn.set_peer(header.source)
            ip = ip_of(conn.peer)
            if not self._limiter.acquire_ip_nowait(ip):
                raise LimitExceeded(f"max_connections_per_ip={self.config.max_connections_per_ip}"
                                    f" reached for {ip}")
            accounted_ip = ip
        if self._tls_context is not None:
            conn.start_tls(self._tls_context, deadline)   # fails at once if it has expired
        conn.limit_rate(self._rate_meter_for(conn))
        return accounted_ip

    def _rate_meter_for(self, conn: "Connection") -> RateMeter | None:
        config = self.config
        buckets = []
        if config.rate:
            buckets.append(TokenBucket(config.rate, config.burst or max(1.0, config.rate),
                                       clock=self._clock))
        ip = None
        if self._ip_buckets is not None:
            ip = ip_of(conn.peer)
            buckets.append(self._ip_buckets.acquire(ip))
        if self._server_bucket is not None:
            buckets.append(self._server_bucket)
        if not buckets:
            return None
        return RateMeter(tuple(buckets), wait=config.on_rate_limit == "wait", ip=ip)

    def release(self, conn: "Connection") -> None:
        """The connection ended: give back its share of the per-address rate bucket."""
        if conn.rate is not None and conn.rate.ip is not None and self._ip_buckets is not None:
            self._ip_buckets.release(conn.rate.ip)
