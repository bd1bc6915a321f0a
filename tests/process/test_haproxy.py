"""Behind a real HAProxy (send-proxy and send-proxy-v2), the handler sees the client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

import connserver
from connserver.testing import wait_for
from tests.conftest import unavailable, wait_closed

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


@pytest.fixture
def haproxy_binary():
    if HAPROXY is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    return HAPROXY


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WhoAmI(connserver.Handler):
    def handle(self):
        self.conn.sendall(f"{self.conn.peer_label}\n".encode())
        while self.conn.recv():
            pass


def test_real_client_address_through_haproxy(serve, haproxy_binary, tmp_path):
    """HAProxy's v1 and v2 headers give the handler the client's own address and port."""
    server = serve(WhoAmI, proxy_protocol=True, trusted_proxy=["127.0.0.1/32"])
    server_port = server.server_address[1]
    v1_port, v2_port = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{v1_port}
    default_backend send_v1
backend send_v1
    server app 127.0.0.1:{server_port} send-proxy
frontend v2
    bind 127.0.0.1:{v2_port}
    default_backend send_v2
backend send_v2
    server app 127.0.0.1:{server_port} send-proxy-v2
""")
    proxy = subprocess.Popen([haproxy_binary, "-db", "-f", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for port in (v1_port, v2_port):
            assert wait_for(lambda: _accepts(port), 10), proxy.stderr.read1(4096) if proxy.poll() else ""
        for port in (v1_port, v2_port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                local_port = client.getsockname()[1]
                assert client.recv(100) == f"127.0.0.1:{local_port}\n".encode()
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait(10)
        proxy.stderr.close()
    stats = wait_closed(server, 2)
    assert stats.close_reasons.get("protocol_error", 0) == 0


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
