"""TLS: handshakes on the connection's own thread, bounded, counted, mutual TLS."""

from __future__ import annotations

import logging
import ssl
import struct
import time

import pytest
import trustme

import connserver
from connserver.apps.echo import EchoHandler, FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def certs(ca, tmp_path):
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    for extra in server_cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    server_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return {"tls_cert": str(cert), "tls_key": str(key), "ca": str(ca_file)}


def tls_client(server, ca, client_cert=None):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    raw = connect(server)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_tls_echo(serve, ca, certs):
    """A TLS client is served; the connection reports TLS."""
    server = serve(EchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with tls_client(server, ca) as client:
        client.sendall(b"secret")
        assert client.recv(100) == b"secret"
        assert client.version() in ("TLSv1.2", "TLSv1.3")
    assert wait_closed(server, 1).close_reasons in ({"eof": 1}, {"reset": 1})


def test_a_stalled_client_does_not_delay_others(serve, ca, certs):
    """One raw client that never sends a ClientHello; a TLS client is served at once."""
    server = serve(EchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   handshake_timeout=0.5)
    stalled = connect(server)
    try:
        started = time.monotonic()
        with tls_client(server, ca) as client:
            client.sendall(b"hi")
            assert client.recv(10) == b"hi"
        assert time.monotonic() - started < 0.3
        assert stalled.recv(10) == b""   # closed at the handshake deadline
    finally:
        stalled.close()
    reasons = wait_closed(server, 2).close_reasons
    assert reasons.get("handshake_deadline") == 1


def test_failed_handshakes_are_protocol_errors_without_traceback(serve, certs, caplog):
    """Plain text to a TLS port: protocol_error, logged briefly."""
    caplog.set_level(logging.INFO)
    server = serve(EchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with connect(server) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert client.recv(100) in (b"",) or True
        except ConnectionResetError:
            pass
    assert wait_closed(server, 1).close_reasons == {"protocol_error": 1}
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_mutual_tls_requires_a_client_certificate(serve, ca, certs):
    """With tls_client_ca, a client without a certificate is refused; one with it is served."""
    server = serve(EchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   tls_client_ca=certs["ca"])
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with tls_client(server, ca) as client:
            client.sendall(b"x")
            if client.recv(10) == b"":
                raise ConnectionResetError("closed")
    with tls_client(server, ca, client_cert=ca.issue_cert("client@example")) as client:
        client.sendall(b"ok")
        assert client.recv(10) == b"ok"
    wait_closed(server, 2)


def test_framed_handler_over_tls_and_goodbye_at_shutdown(serve, ca, certs):
    """Frames work over TLS, and a shutdown goodbye arrives encrypted."""
    class Polite(FramedEchoHandler):
        def handle(self):
            try:
                super().handle()
            except connserver.Cancelled:
                self.conn.send_goodbye(struct.pack("!I", 3) + b"bye")
                raise

    server = serve(Polite, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with tls_client(server, ca) as client:
        client.sendall(struct.pack("!I", 5) + b"hello")
        assert client.recv(100) == struct.pack("!I", 5) + b"hello"
        assert wait_for(lambda: server.connections() and server.connections()[0].operation == "idle")
        report = server.shutdown(grace=5.0)
        assert report.drained == 1
        assert client.recv(100) == struct.pack("!I", 3) + b"bye"


def test_tls_configuration_errors(certs, tmp_path, monkeypatch):
    """Missing files, a key without a cert, or SSLKEYLOGFILE stop start-up."""
    with pytest.raises(connserver.ConfigError, match="tls_cert"):
        connserver.Config(tls_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(connserver.ConfigError, match="tls_cert"):
        connserver.Config(tls_key=certs["tls_key"])
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    config = connserver.Config(tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with pytest.raises(connserver.ConfigError, match="SSLKEYLOGFILE"):
        connserver.Server(("127.0.0.1", 0), EchoHandler, config)
