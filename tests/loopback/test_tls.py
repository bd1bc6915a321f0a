"""TLS: handshakes on the connection's own thread, bounded, counted, mutual TLS."""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time

import pytest

import connserver
from connserver.apps.chat import ChatHandler
from connserver.apps.echo import EchoHandler, FramedEchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_chat import (Client as ChatClient, join_and_talk, quit_and_leave,
                                       shutdown_and_hear_goodbyes)
from tests.tls_support import RawTLSClient, ca, certs, tls_client  # noqa: F401 (fixtures)


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


def test_the_handler_sees_the_tls_version_and_client_certificate(serve, ca, certs):
    """conn.tls gives the handler the protocol version and, with mutual TLS, the client's cert."""
    class WhoAmI(connserver.Handler):
        def handle(self):
            subject = dict(item[0] for item in self.conn.tls.getpeercert()["subject"])
            self.conn.sendall(f"{self.conn.tls.version()} {subject.get('commonName', '?')}"
                              .encode())

    server = serve(WhoAmI, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   tls_client_ca=certs["ca"])
    client_cert = ca.issue_cert("client@example", common_name="client-7")
    with tls_client(server, ca, client_cert=client_cert) as client:
        assert client.recv(100).decode() == f"{client.version()} client-7"
    wait_closed(server, 1)


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


@pytest.mark.both_modes
def test_a_trickled_record_is_cut_at_the_read_timeout(serve, ca, certs):
    """A TLS record sent a byte every 0.1 s ends with read_deadline at read_timeout, not later."""
    read_timeout = 0.5
    closed: list = []
    closed_event = threading.Event()

    class Echo(FramedEchoHandler):
        def connection_closed(self, reason):
            closed.append((time.monotonic(), reason))
            closed_event.set()

    server = serve(Echo, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   read_timeout=read_timeout, idle_timeout=5.0)
    client = RawTLSClient(server, ca)
    try:
        record = client.record(struct.pack("!I", 10) + b"0123456789")   # one record, ~36 bytes
        assert wait_for(lambda: [i for i in server.connections()
                                 if i.operation in ("idle", "parked")])
        started = time.monotonic()
        sent = 0
        # At most len(record) * 0.1 s (under idle_timeout: each byte would reset a
        # per-call timeout); the read deadline should end it after 0.5 s.
        for sent in range(1, len(record) + 1):
            try:
                client.sock.sendall(record[sent - 1:sent])
            except OSError:
                break
            if closed_event.wait(0.1):
                break
        assert closed_event.is_set(), "the trickled record was accepted"
    finally:
        client.close()
    (closed_at, reason), = closed
    assert reason is connserver.CloseReason.READ_DEADLINE
    assert read_timeout - 0.02 <= closed_at - started <= read_timeout + 0.5
    assert 3 <= sent <= 10
    stats = wait_closed(server, 1)
    assert stats.close_reasons == {"read_deadline": 1}
    assert stats.deadline_hits == {"read": 1}


@pytest.mark.both_modes
def test_an_idle_tls_connection_meets_the_idle_timeout(serve, ca, certs):
    """Between records the wait is idle_timeout, and its close reason is idle."""
    server = serve(FramedEchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   read_timeout=5.0, idle_timeout=0.3)
    with tls_client(server, ca) as client:
        client.sendall(struct.pack("!I", 2) + b"hi")
        assert client.recv(100) == struct.pack("!I", 2) + b"hi"
        assert client.recv(100) == b""
    assert wait_closed(server, 1).close_reasons == {"idle": 1}


class TLSChatClient(ChatClient):
    """The chat tests' line client, over TLS."""

    def __init__(self, server, ca):
        self.sock = tls_client(server, ca)
        self.buffer = b""


@pytest.mark.both_modes
def test_chat_over_tls(serve, ca, certs):
    """Chat over TLS: users join (hub subscriptions), talk, and leave with a goodbye."""
    server = serve(ChatHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    alice = TLSChatClient(server, ca)
    try:
        bob = TLSChatClient(server, ca)
    except BaseException:
        alice.close()
        raise
    try:
        join_and_talk(alice, bob)
        bob.say("hi alice")
        assert alice.line() == "<bob> hi alice"
        quit_and_leave(bob, alice, "bob")
    finally:
        alice.close()
        bob.close()
    assert wait_closed(server, 2).close_reasons == {"closed": 1, "eof": 1}


@pytest.mark.both_modes
def test_chat_over_tls_says_goodbye_at_shutdown(serve, ca, certs):
    """At shutdown, subscribed TLS users get the hub's last lines, then the goodbye, intact."""
    server = serve(ChatHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    users: list = []
    try:
        for index in range(3):
            users.append(TLSChatClient(server, ca))
            users[-1].join(f"user{index}")
        users[0].say("last words")
        for user in users[1:]:
            while user.line() != "<user0> last words":
                pass
        shutdown_and_hear_goodbyes(server, users)
    finally:
        for user in users:
            user.close()


def test_recv_exactly_over_tls_spans_records(serve, ca, certs):
    """recv_exactly gathers a message that spans several TLS records, no more, no less."""
    class Exact(connserver.Handler):
        def handle(self):
            message = self.conn.recv_exactly(40000)
            self.conn.sendall(struct.pack("!I", len(message)) + message[-4:])
            self.conn.sendall(self.conn.recv_exactly(3))

    server = serve(Exact, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"])
    with tls_client(server, ca) as client:
        client.sendall(b"x" * 39996 + b"tail" + b"end")   # records of 16 KiB at most
        received = b""
        while len(received) < 11:
            chunk = client.recv(100)
            assert chunk
            received += chunk
        assert received == struct.pack("!I", 40000) + b"tail" + b"end"
    wait_closed(server, 1)


@pytest.mark.both_modes
def test_a_closed_peer_does_not_hold_the_lingering_close(serve, ca, certs):
    """The client closes; our close_notify then gets a reset from its kernel. Reads
    keep saying end of stream and the 24 bytes stay unacknowledged, but the
    connection is gone: the close ends at once, not at linger_timeout (30 s)."""
    server = serve(FramedEchoHandler, tls_cert=certs["tls_cert"], tls_key=certs["tls_key"],
                   linger_timeout=30.0)
    with tls_client(server, ca) as client:
        client.sendall(struct.pack("!I", 2) + b"hi")
        assert client.recv(100) == struct.pack("!I", 2) + b"hi"
    stats = wait_closed(server, 1, timeout=3.0)
    assert stats.close_reasons == {"eof": 1}
