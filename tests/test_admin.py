"""The admin endpoint over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import connserver
from connserver.admin import parse_request
from connserver.apps.echo import EchoHandler
from connserver.testing import wait_for
from tests.conftest import connect, wait_closed
from tests.test_server import roundtrip


def get(server, path):
    host, port = server.admin_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_stats_connections_and_healthz(serve):
    """/stats has the documented keys; /connections lists live ones; /healthz is ok."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
        status, _, body = get(server, "/healthz")
        assert (status, body) == (200, "ok\n")
        status, content_type, body = get(server, "/stats")
        stats = json.loads(body)
        for key in ("connections_active", "connections_total", "connections_rejected",
                    "close_reasons", "threads", "fds", "rss_bytes", "pool", "uptime_s"):
            assert key in stats
        assert {"leased", "free", "allocated"} <= set(stats["pool"])
        assert stats["connections_active"] == 1 and content_type == "application/json"
        listed = json.loads(get(server, "/connections")[2])
        assert len(listed) == 1 and listed[0]["bytes_in"] == 4
        assert {"id", "peer", "age", "bytes_in", "bytes_out", "queue_bytes", "leases",
                "operation", "deadline_remaining"} <= set(listed[0])
    wait_closed(server, 1)


def test_metrics_are_valid_prometheus_exposition(serve):
    """/metrics parses with the reference parser and follows the naming rules."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
    wait_closed(server, 1)
    status, content_type, body = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert all(name.startswith("connserver_") for name in families)
    closed = families["connserver_connections_closed"]
    assert closed.type == "counter"
    assert {s.labels["reason"]: s.value for s in closed.samples if s.name.endswith("_total")}["eof"] == 1
    assert families["connserver_resident_memory_bytes"].samples[0].value > 0


def test_debug_endpoints(serve):
    """/debug/threads shows stacks; /debug/memory shows top types and growth."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    status, _, body = get(server, "/debug/threads")
    assert status == 200 and "--- connserver-watchdog" in body and "File " in body
    first = json.loads(get(server, "/debug/memory")[2])
    assert first["top_types"] and first["growth_since_previous_call"] == []
    second = json.loads(get(server, "/debug/memory")[2])
    assert isinstance(second["growth_since_previous_call"], list)
    assert get(server, "/nope")[0] == 404


def test_healthz_says_draining_during_shutdown(serve):
    """While a shutdown drains, /healthz answers 503."""
    results = []

    class Reporter(connserver.Handler):
        def handle(self):
            try:
                self.conn.recv()
            except connserver.Cancelled:
                results.append(get(self.server, "/healthz"))
                raise

    server = serve(Reporter, admin_address="127.0.0.1:0")
    with connect(server):
        assert wait_for(lambda: server.stats().connections_active == 1)
        server.shutdown(grace=5.0)
    assert results == [(503, "text/plain", "draining\n")]


def test_bad_requests_are_closed_with_protocol_error(serve):
    """Garbage on the admin port is a counted protocol error, nothing more."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with socket.create_connection(server.admin_address, timeout=10) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert sock.recv(100) == b""
    with pytest.raises(connserver.RemoteProtocolError):
        parse_request(b"GET / SPDY/3\r\n\r\n")
    assert parse_request(b"GET /stats?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/stats")


def test_admin_address_must_parse():
    """A bad admin address is a configuration error at start-up."""
    with pytest.raises(connserver.ConfigError, match="admin_address"):
        connserver.Config(admin_address="localhost:http")
    assert connserver.Config(admin_address="9100").admin_address == "9100"
