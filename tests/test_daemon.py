"""The daemon in a subprocess: listeners, logging, signals, systemd notify, workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat


from connserver.testing import wait_for


def echo_once(address, family=socket.AF_INET, payload=b"ping"):
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(payload)
        return client.recv(100)


def test_unix_socket_and_tcp_together(daemon, tmp_path):
    """Several --bind: TCP and a Unix socket created with mode 0600."""
    path = str(tmp_path / "echo.sock")
    process = daemon("echo", "--bind", "127.0.0.1:0", "--bind", f"unix:{path}")
    port = process.port()
    process.read_until(r"listening on unix:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert echo_once(("127.0.0.1", port)) == b"ping"
    assert echo_once(path, socket.AF_UNIX) == b"ping"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def test_inherited_fd_and_json_logs(daemon):
    """--fd N serves a socket made by the parent; --log-format json writes JSON lines."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        process = daemon("echo", "--fd", str(listener.fileno()), "--log-format", "json",
                         pass_fds=[listener.fileno()])
        line = process.read_until(r'"listening on 127\.0\.0\.1:\d+"').string
        record = json.loads(line)
        assert record["level"] == "INFO" and record["logger"] == "connserver.daemon"
    finally:
        listener.close()
    assert echo_once(("127.0.0.1", port)) == b"ping"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def test_sigusr1_logs_a_census_and_sighup_reopens_the_log(daemon, tmp_path):
    """SIGUSR1 dumps census and stacks; SIGHUP reopens --log-file after a rotation."""
    log_file = tmp_path / "server.log"
    process = daemon("echo", "--bind", "127.0.0.1:0", "--log-file", str(log_file))
    assert wait_for(lambda: "listening on" in log_file.read_text() if log_file.exists() else False)
    process.signal(signal.SIGUSR1)
    assert wait_for(lambda: "census:" in log_file.read_text() and "connserver-watchdog" in
                    log_file.read_text())
    log_file.rename(tmp_path / "server.log.1")
    process.signal(signal.SIGHUP)
    assert wait_for(lambda: log_file.exists())
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert "stopped:" in log_file.read_text()


def test_systemd_notify_protocol(daemon, tmp_path):
    """READY=1 once listening, WATCHDOG=1 pings, STOPPING=1 on drain (a real datagram socket)."""
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(10)
    try:
        process = daemon("echo", "--bind", "127.0.0.1:0",
                         env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
        assert any("STATUS=serving on 127.0.0.1:" in m for m in messages)
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
        process.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(receiver.recv(4096).decode())
        assert process.wait() == 0
    finally:
        receiver.close()


def test_workers_share_the_port_and_drain_together(daemon):
    """--workers 2: both serve one port; SIGTERM drains both and the supervisor exits 0."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "2")
    port = process.port()
    pids = {int(process.read_until(r"started worker (\d+)").group(1)) for _ in range(2)}
    assert len(pids) == 2
    for _ in range(2):
        process.read_until(r"connserver.daemon: listening on 127\.0\.0\.1:%d" % port)
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    for pid in pids:
        assert wait_for(lambda: not _alive(pid))


def test_a_crashed_worker_is_restarted(daemon):
    """A worker killed by a signal is replaced; the port keeps serving."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "1")
    port = process.port()
    first = int(process.read_until(r"started worker (\d+)").group(1))
    os.kill(first, signal.SIGKILL)
    second = int(process.read_until(r"started worker (\d+)").group(1))
    assert second != first
    process.read_until(r"listening on 127\.0\.0\.1:")
    assert wait_for(lambda: _serves(port), 10)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def test_workers_exit_when_the_supervisor_is_killed(daemon):
    """No orphans: SIGKILL the supervisor and its workers stop by themselves."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "2", "--graceful-timeout", "2")
    process.port()
    pids = [int(process.read_until(r"started worker (\d+)").group(1)) for _ in range(2)]
    process.proc.kill()
    process.wait()
    for pid in pids:
        assert wait_for(lambda: not _alive(pid), 15), f"worker {pid} survived its supervisor"


def test_workers_are_recycled_after_max_connections(daemon):
    """--worker-max-connections: a worker exits after about N connections and is replaced."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "1",
                     "--worker-max-connections", "5")
    port = process.port()
    first = int(process.read_until(r"started worker (\d+)").group(1))
    for _ in range(6):
        wait_for(lambda: _serves(port), 10)
    process.read_until(r"recycled; starting a fresh one")
    second = int(process.read_until(r"started worker (\d+)").group(1))
    assert second != first
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _serves(port: int) -> bool:
    try:
        return echo_once(("127.0.0.1", port)) == b"ping"
    except OSError:
        return False


def test_tls_daemon(daemon, tmp_path):
    """`serve --tls-cert/--tls-key` serves TLS from the command line."""
    import ssl

    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    process = daemon("echo", "--bind", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    port = process.port()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"over tls")
            assert client.recv(100) == b"over tls"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
