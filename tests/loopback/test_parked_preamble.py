"""Parked PROXY headers and TLS handshakes: taken a step per readiness event, never waited for.

A parked connection's preamble holds no thread: the tests below check that a header
or a handshake arriving in pieces is taken as it comes (and the stream after it
starts intact), that each still meets ``handshake_timeout``, and that TLS replies
too large for the socket wait, encrypted, in the session until the peer reads.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading

import connserver
from connserver import CloseReason
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_parking import connserver_threads, frame, read_frame
from tests.tls_support import ca, certs, tls_client  # noqa: F401 (fixtures)
from tests.unit.test_proxy_protocol import v2_header


class WhoAmI(connserver.LineHandler):
    """Greets with the peer it sees, then echoes lines."""

    def setup(self):
        self.send_line(f"hello {self.conn.peer_label}")

    def handle_line(self, line):
        return line


class Frames(connserver.FramedHandler):
    """Echoes frames; ``big`` asks for a 4 MiB reply."""

    def handle_frame(self, frame):
        return b"x" * (4 << 20) if frame == b"big" else frame


def read_line(sock: socket.socket, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before a whole line"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def client_hello(ca) -> bytes:
    """The first flight of a TLS client: its ClientHello."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def in_handshake(server: connserver.Server) -> bool:
    """A connection is parked in its preamble (what has arrived of it was taken)."""
    return any(info.operation == "handshake" for info in server.connections())


def test_a_proxy_header_in_pieces_is_taken_as_it_comes(serve):
    """v1 and v2 headers arriving in pieces: each piece is consumed while parked (no
    thread), the handler sees the real client, and what follows the header is intact."""
    server = serve(WhoAmI, park=True, proxy_protocol=True, trusted_proxy=["127.0.0.0/8"],
                   min_spare_threads=0, max_spare_threads=0)
    assert server.parks
    threads = connserver_threads()
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 443\r\n"
    v2 = v2_header(source=("198.51.100.9", 7))
    for header, peer in [(v1, "203.0.113.7:4242"), (v2, "198.51.100.9:7")]:
        with connect(server) as client:
            for piece in (header[:3], header[3:14], header[14:-1]):
                client.sendall(piece)
                assert wait_for(lambda: in_handshake(server))
                # Consumed: the server holds no byte of it unread, so it does not spin.
                assert wait_for(lambda: _unread_by_server(server) == 0)
            assert connserver_threads() == threads
            client.sendall(header[-1:] + b"first line\n")
            buffer = bytearray()
            assert read_line(client, buffer) == f"hello {peer}"
            assert read_line(client, buffer) == "first line"
    assert wait_closed(server, 2).close_reasons == {"eof": 2}


def _unread_by_server(server: connserver.Server) -> int:
    """Bytes waiting in the server side's receive queue (FIONREAD) of its one connection."""
    import fcntl
    import termios
    # The socket itself (no public view shows it); the newest, as the last one may
    # still be on its way out of the registry.
    conn = max(server._registry.live(), key=lambda live: live.id)
    return struct.unpack("i", fcntl.ioctl(conn.socket.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_bad_stalled_or_untrusted_proxy_headers_end_as_in_thread_mode(serve):
    """Parked: a bad header and an untrusted sender are protocol errors; a stalled header
    meets handshake_timeout; the per-address limit counts the real client."""
    server = serve(WhoAmI, park=True, proxy_protocol=True, trusted_proxy=["127.0.0.2/32"],
                   handshake_timeout=0.3, max_connections_per_ip=1)
    assert server.parks
    for source, data in [("127.0.0.2", b"GET / HTTP/1.1\r\n\r\n"),
                         ("127.0.0.3", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                         ("127.0.0.2", b"PROXY TCP4 1.2")]:
        with connect(server, source=source) as client:
            client.sendall(data)
            assert client.recv(100) == b""
    stats = wait_closed(server, 3)
    assert stats.close_reasons == {"protocol_error": 2, "handshake_deadline": 1}
    assert stats.deadline_hits == {"handshake": 1}
    first, second = connect(server, source="127.0.0.2"), connect(server, source="127.0.0.2")
    try:
        first.sendall(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n")
        assert read_line(first, bytearray()) == "hello 192.0.2.1:1"
        second.sendall(b"PROXY TCP4 192.0.2.1 10.0.0.1 3 2\r\n")
        assert second.recv(100) == b""
    finally:
        first.close()
        second.close()
    assert wait_closed(server, 5).close_reasons.get("limit") == 1


def test_tls_parked_from_the_handshake_on(serve, ca, certs):
    """Parked TLS: the handshake holds no thread, the handler sees TLS, and frames
    and lines go both ways; idle, the connection is parked."""
    server = serve(Frames, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   min_spare_threads=0, max_spare_threads=0)
    assert server.parks
    threads = connserver_threads()
    clients = [tls_client(server, ca) for _ in range(20)]
    try:
        for index, client in enumerate(clients):
            client.sendall(frame(b"%d" % index) + frame(b"again"))
        for index, client in enumerate(clients):
            assert read_frame(client) == b"%d" % index
            assert read_frame(client) == b"again"
        assert connserver_threads() == threads
        assert wait_for(lambda: {i.operation for i in server.connections()} == {"parked"})
    finally:
        for client in clients:
            client.close()
    wait_closed(server, 20)


def test_a_stalled_tls_handshake_meets_the_handshake_deadline(serve, ca, certs):
    """A client that sends half a ClientHello, then nothing: handshake_deadline, parked."""
    server = serve(Frames, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   handshake_timeout=0.3)
    assert server.parks
    with connect(server) as client:
        hello = client_hello(ca)
        client.sendall(hello[:len(hello) // 2])
        assert wait_for(lambda: in_handshake(server))
        assert client.recv(100) == b""
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"handshake_deadline": 1}
    assert stats.deadline_hits == {"handshake": 1}


def test_a_bad_client_hello_is_a_protocol_error(serve, certs):
    """Plaintext where a ClientHello belongs: protocol_error, and the next client is served."""
    server = serve(Frames, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with connect(server) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while client.recv(4096):
            pass
    assert wait_closed(server, 1).close_reasons == {"protocol_error": 1}


def test_a_large_tls_reply_waits_encrypted_until_the_peer_reads(serve, ca, certs):
    """A 4 MiB reply to a peer that is not reading yet: the rest waits as ciphertext in the
    session (no thread), then arrives whole and in order once the peer reads."""
    server = serve(Frames, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   max_write_buffer=8 << 20, min_spare_threads=0, max_spare_threads=0)
    assert server.parks
    threads = connserver_threads()
    with tls_client(server, ca) as client:
        client.sendall(frame(b"big"))
        assert wait_for(lambda: [i for i in server.connections() if i.operation == "parked"])
        assert connserver_threads() == threads
        assert read_frame(client) == b"x" * (4 << 20)
        client.sendall(frame(b"after"))
        assert read_frame(client) == b"after"
    assert wait_closed(server, 1).close_reasons in ({"eof": 1}, {"reset": 1})


def test_a_tls_peer_that_never_reads_is_a_slow_consumer(serve, ca, certs):
    """Ciphertext waiting in the session counts against max_write_buffer."""
    server = serve(Frames, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   max_write_buffer=1 << 20)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with tls_client(server, ca, raw=raw) as client:
        client.sendall(frame(b"big"))
        stats = wait_closed(server, 1)
    assert stats.close_reasons == {"slow_consumer": 1}


def test_proxy_then_tls_parked(serve, ca, certs):
    """A PROXY header, then a TLS handshake, both parked: the handler sees the client."""
    server = serve(WhoAmI, park=True, proxy_protocol=True, trusted_proxy=["127.0.0.1"],
                   tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    assert server.parks
    raw = socket.create_connection(server.server_address[:2], timeout=10)
    raw.sendall(b"PROXY TCP4 192.0.2.5 10.0.0.1 5555 443\r\n")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with context.wrap_socket(raw, server_hostname="localhost") as client:
        buffer = bytearray()
        assert read_line(client, buffer) == "hello 192.0.2.5:5555"
        client.sendall(b"over tls\n")
        assert read_line(client, buffer) == "over tls"
    assert wait_closed(server, 1).close_reasons in ({"eof": 1}, {"reset": 1})


def test_cancelling_a_connection_in_its_handshake(serve, ca, certs):
    """A connection parked in its handshake can be cancelled (admin, shutdown): it ends at
    once with the reason given, no handler was made, nothing leaks."""
    made = threading.Event()

    class Watched(Frames):
        def setup(self):
            made.set()

    server = serve(Watched, park=True, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   handshake_timeout=30)
    with connect(server) as client:
        client.sendall(client_hello(ca)[:10])
        assert wait_for(lambda: in_handshake(server))
        (info,) = server.connections()
        assert server.cancel(info.id, CloseReason.CANCELLED)
        assert client.recv(100) == b""
    assert wait_closed(server, 1).close_reasons == {"cancelled": 1}
    assert not made.is_set()
