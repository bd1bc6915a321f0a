"""PROXY protocol: the server behind the parser sees the real client, and refuses the rest."""

from __future__ import annotations

import connserver
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.unit.test_proxy_protocol import v2_header


class WhoAmI(connserver.Handler):
    def handle(self):
        self.conn.sendall(f"{self.conn.peer_label}\n".encode())
        while self.conn.recv():
            pass


def test_server_sees_the_real_client_and_nothing_is_swallowed(serve):
    """Behind PROXY, the handler's peer is the client, and the bytes after the header are intact."""
    class Echo(connserver.Handler):
        def handle(self):
            self.conn.sendall(f"{self.conn.peer_label}|".encode())
            while data := self.conn.recv():
                self.conn.sendall(data)

    server = serve(Echo, proxy_protocol=True, trusted_proxy=["127.0.0.0/8"])
    with connect(server) as client:
        client.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 443\r\nhello")
        received = b""
        while not received.endswith(b"hello"):
            received += client.recv(100)
        assert received == b"203.0.113.7:4242|hello"
    with connect(server) as client:
        client.sendall(v2_header(source=("198.51.100.9", 7)))
        assert client.recv(100) == b"198.51.100.9:7|"
    wait_closed(server, 2)


def test_missing_malformed_or_untrusted_headers_are_protocol_errors(serve):
    """No header, a bad header, or a header from an untrusted peer: protocol_error."""
    server = serve(WhoAmI, proxy_protocol=True, trusted_proxy=["127.0.0.2/32"],
                   handshake_timeout=2.0)
    for source, data in [("127.0.0.2", b"GET / HTTP/1.1\r\n\r\n"),
                         ("127.0.0.2", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
                         ("127.0.0.3", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")]:
        with connect(server, source=source) as client:
            client.sendall(data)
            assert client.recv(100) == b""
    assert wait_closed(server, 3).close_reasons == {"protocol_error": 3}


def test_a_stalled_header_meets_the_handshake_deadline(serve):
    """Half a header, then silence: closed at handshake_timeout."""
    server = serve(WhoAmI, proxy_protocol=True, trusted_proxy=["127.0.0.1"],
                   handshake_timeout=0.3)
    with connect(server) as client:
        client.sendall(b"PROXY TCP4 1.2")
        assert client.recv(100) == b""
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"handshake_deadline": 1}
    assert stats.deadline_hits == {"handshake": 1}   # counted once, not again as an OSError


def test_per_ip_limits_use_the_real_client(serve):
    """max_connections_per_ip counts the client from the header, not the proxy."""
    server = serve(WhoAmI, proxy_protocol=True, trusted_proxy=["127.0.0.1"],
                   max_connections_per_ip=1)
    first, second, other = connect(server), connect(server), connect(server)
    try:
        first.sendall(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n")
        assert first.recv(100) == b"192.0.2.1:1\n"
        second.sendall(b"PROXY TCP4 192.0.2.1 10.0.0.1 3 2\r\n")
        assert second.recv(100) == b""
        other.sendall(b"PROXY TCP4 192.0.2.2 10.0.0.1 1 2\r\n")
        assert other.recv(100) == b"192.0.2.2:1\n"
        assert server.limiter.addresses_tracked() == 2
    finally:
        for sock in (first, second, other):
            sock.close()
    assert wait_closed(server, 3).close_reasons.get("limit") == 1
    assert wait_for(lambda: server.limiter.addresses_tracked() == 0)
