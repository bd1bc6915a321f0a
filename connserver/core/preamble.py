"""What a connection goes through before its handler: PROXY header, then TLS.

Both run under ``handshake_timeout`` as one absolute deadline, never on the
accept loop, so one client that sends half a header (or never a ClientHello)
holds up no one else: in thread mode on the connection's own thread
(:meth:`Preamble.run`, blocking), parked as steps that take what has arrived
and never wait (:class:`PreambleSteps`, advanced whenever the socket is ready).
"""

from __future__ import annotations

import ipaddress
import ssl
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

__all__ = ["Preamble", "PreambleSteps", "read_proxy_header", "TrustedNetworks"]

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
            self.check_proxy(conn)
            accounted_ip = self.accept_proxy_header(conn, read_proxy_header(conn, deadline))
        if self._tls_context is not None:
            conn.start_tls(self._tls_context, deadline)   # fails at once if it has expired
        conn.limit_rate(self.rate_meter_for(conn))
        return accounted_ip

    def steps(self, conn: "Connection") -> "PreambleSteps":
        """The same preamble for a parked connection, advanced without ever waiting."""
        return PreambleSteps(self, conn, self._clock() + self.config.handshake_timeout)

    @property
    def tls_context(self) -> "ssl.SSLContext | None":
        return self._tls_context

    def check_proxy(self, conn: "Connection") -> None:
        """Only a trusted proxy may send a PROXY header (and so name the client)."""
        assert self._trusted_proxies is not None
        proxy = ip_of(conn.peer)
        if proxy not in self._trusted_proxies:
            raise RemoteProtocolError(f"PROXY header expected from a trusted proxy, "
                                      f"not from {proxy}")

    def accept_proxy_header(self, conn: "Connection", header: ProxyHeader) -> str:
        """The client named by ``header`` becomes the peer, and takes a per-address slot;
        returns its address (the slot to give back at the end)."""
        if header.command == "PROXY" and header.source is not None:
            conn.set_peer(header.source)
        ip = ip_of(conn.peer)
        if not self._limiter.acquire_ip_nowait(ip):
            raise LimitExceeded(f"max_connections_per_ip={self.config.max_connections_per_ip}"
                                f" reached for {ip}")
        return ip

    def rate_meter_for(self, conn: "Connection") -> RateMeter | None:
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


class PreambleSteps:
    """A parked connection's preamble, advanced whenever its socket is ready; never waits.

    The PROXY header is consumed as it arrives, but only bytes certain to belong
    to it (a v1 header up to its CRLF, a v2 header up to its declared length), so
    the stream after it starts intact, and a socket left holding bytes never
    reports "readable" in vain. The TLS handshake is a memory-BIO handshake fed
    with what the socket has. The whole preamble is due by ``expires_at``; the
    parking lot's watchdog entry enforces that.
    """

    __slots__ = ("_preamble", "_conn", "expires_at", "accounted_ip", "_header", "_tls")

    def __init__(self, preamble: Preamble, conn: "Connection", expires_at: float) -> None:
        self._preamble = preamble
        self._conn = conn
        self.expires_at = expires_at
        self.accounted_ip: str | None = None   # behind a proxy: the real client's slot
        self._header: bytes | None = None      # the PROXY header's bytes consumed so far
        if preamble.proxied:
            preamble.check_proxy(conn)
            self._header = b""
        self._tls = preamble.tls_context

    @property
    def waits_for_peer(self) -> bool:
        """Whether the peer must speak first (a PROXY header, a ClientHello)."""
        return self._header is not None or self._tls is not None

    def advance(self) -> bool:
        """Take the next steps with what has arrived; True once the preamble is done."""
        conn = self._conn
        if self._header is not None and not self._read_proxy_header():
            return False
        if self._tls is not None:
            if not conn.handshake_nowait(self._tls, self.expires_at):
                return False
            self._tls = None
        conn.limit_rate(self._preamble.rate_meter_for(conn))
        return True

    def _read_proxy_header(self) -> bool:
        conn = self._conn
        header = self._header
        assert header is not None
        waiting = conn.peek_nowait(_PEEK_LIMIT)
        if waiting is None:
            return False
        if not waiting:
            raise RemoteProtocolError("connection closed inside the PROXY header" if header
                                      else "connection closed before its PROXY header")
        need = header_length(header + waiting)
        take = len(waiting) if need is None else min(len(waiting), need - len(header))
        conn.skip(take)
        header = self._header = header + waiting[:take]
        if need is None or len(header) < need:
            return False
        self._header = None
        self.accounted_ip = self._preamble.accept_proxy_header(conn, parse(header))
        return True
