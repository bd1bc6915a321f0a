"""TLS test helpers: a test CA and server certificate (trustme), and two kinds of client.

Import the fixtures into a test module to use them (``from tests.tls_support import
ca, certs``).
"""

from __future__ import annotations

import socket
import ssl

import pytest
import trustme

import connserver
from tests.conftest import connect


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


def tls_client(server: connserver.Server, ca: trustme.CA, client_cert=None,
               raw: socket.socket | None = None) -> ssl.SSLSocket:
    """A TLS client socket to ``server`` (``raw``: an unconnected socket to use, with its
    options already set), with the safety-net timeout of tests.conftest.connect."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    if raw is None:
        raw = connect(server)
    else:
        raw.settimeout(10.0)
        raw.connect(server.server_address)
    return context.wrap_socket(raw, server_hostname="localhost")


class RawTLSClient:
    """A TLS client over memory BIOs: the test decides when each ciphertext byte leaves."""

    def __init__(self, server: connserver.Server, ca: trustme.CA) -> None:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self.sock = connect(server)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.sock.sendall(self._outgoing.read())
                    self._receive()
            self.sock.sendall(self._outgoing.read())
        except BaseException:
            self.sock.close()
            raise

    def record(self, data: bytes) -> bytes:
        """``data`` encrypted: the ciphertext to send, one TLS record if it is small."""
        self.tls.write(data)
        return self._outgoing.read()

    def read(self) -> bytes:
        """Plaintext from the server (``b""`` at its end of stream)."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._receive():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def _receive(self) -> bool:
        data = self.sock.recv(65536)
        if data:
            self._incoming.write(data)
        return bool(data)

    def close(self) -> None:
        self.sock.close()
