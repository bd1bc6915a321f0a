"""A server out of file descriptors: it must wait, not spin, and recover."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import PipeLines

pytestmark = [pytest.mark.hostile, pytest.mark.both_modes]   # threads, and parked

SERVER = Path(__file__).with_name("fd_limited_server.py")
FD_LIMIT = 64        # the child's RLIMIT_NOFILE
CLIENTS = 100        # more clients than the child has fds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def roundtrip(port: int, data: bytes = b"ping") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as client:
        client.sendall(data)
        assert client.recv(64) == data


def test_fd_exhaustion_backs_off_without_spinning_and_serves_again():
    """Out of fds (RLIMIT_NOFILE 64, 100 clients): CPU well under a core, serves once they leave."""
    proc = subprocess.Popen([sys.executable, str(SERVER), str(FD_LIMIT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        out, err = PipeLines(proc.stdout), PipeLines(proc.stderr)
        port_line = out.wait_for(str.isdigit, 30.0)
        assert port_line, f"the server did not start: {err.lines}"
        port = int(port_line)
        for _ in range(CLIENTS):
            # The kernel completes the handshake from the listen backlog either way.
            client = socket.create_connection(("127.0.0.1", port), timeout=10.0)
            clients.append(client)
            client.sendall(b"ping")
        assert err.wait_for(lambda line: "Too many open files" in line, 10.0), err.lines

        # Saturated: measure the child's CPU over one second (it must stay alive).
        cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        cpu_share = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - started)
        with open(f"/proc/{proc.pid}/status") as file:
            threads = next(line.split()[1] for line in file if line.startswith("Threads:"))
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        served = select.select(clients, [], [], 0)[0]
        for client in served:
            assert client.recv(64) == b"ping"
        print(f"fd exhaustion: {len(served)} of {CLIENTS} clients served with RLIMIT_NOFILE "
              f"{FD_LIMIT} ({fds} fds open, {threads} threads); CPU while saturated "
              f"{cpu_share * 100:.1f}% of one core")
        assert 0 < len(served) < CLIENTS
        assert cpu_share < 0.2

        for client in clients:
            client.close()
        clients.clear()
        # Serves again: the backlog drains (those peers are gone) and new clients are echoed.
        recovered_at = time.monotonic()
        roundtrip(port)
        recovery = time.monotonic() - recovered_at
        for _ in range(20):
            roundtrip(port)
        assert err.wait_for(lambda line: "accepting again" in line, 10.0), err.lines
        print(f"fd exhaustion: served again {recovery * 1000:.0f} ms after the clients left")
        assert sum("Too many open files" in line for line in err.lines) == 1   # logged once

        proc.stdin.close()
        assert proc.wait(timeout=15.0) == 0, err.lines
        assert out.wait_for(lambda line: line in ("clean", "stuck"), 5.0) == "clean"
    finally:
        for client in clients:
            client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10.0)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
