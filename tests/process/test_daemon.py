"""The daemon in a subprocess: listeners, logging, signals, systemd notify, workers."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import stat

import pytest

from connserver import Config
from connserver.apps.chat import ChatHandler
from connserver.apps.echo import EchoHandler
from connserver.daemon.process import log_usage_hint
from connserver.testing import wait_for

from tests.conftest import unavailable


def worker_port(process) -> int:
    """The port the supervisor of ``--workers`` reserved (logged before it starts them)."""
    return int(process.read_until(r"workers on 127\.0\.0\.1:(\d+)").group(1))


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
    process.read_until(r"accepting on unix:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert echo_once(("127.0.0.1", port)) == b"ping"
    assert echo_once(path, socket.AF_UNIX) == b"ping"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def healthz(admin_port: int) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as refused:
        return refused.code


def _admin_and_port(process) -> tuple[int, int]:
    admin = int(process.read_until(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
    return admin, int(process.read_until(r"accepting on 127\.0\.0\.1:(\d+)").group(1))


def test_drain_delay_says_503_while_still_accepting(daemon):
    """--drain-delay: after SIGTERM /healthz answers 503 at once while new connections are
    still served; when the delay is over the listener closes and the daemon exits 0."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--drain-delay", "1.5")
    admin, port = _admin_and_port(process)
    # "accepting on" is logged a moment before the server counts itself accepting.
    assert wait_for(lambda: healthz(admin) == 200, 10)
    process.signal(signal.SIGTERM)
    process.read_until(r"drain delay: /healthz answers 503")
    assert healthz(admin) == 503
    assert echo_once(("127.0.0.1", port)) == b"ping"   # a newcomer is still served
    assert process.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        echo_once(("127.0.0.1", port))


def test_a_second_signal_cuts_the_drain_delay_short(daemon):
    """A second SIGTERM during a long drain delay ends the delay: the daemon drains and
    exits well before the delay would have."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--drain-delay", "60")
    _admin_and_port(process)
    process.signal(signal.SIGTERM)
    process.read_until(r"drain delay: /healthz answers 503")
    process.signal(signal.SIGTERM)
    process.read_until(r"no more drain delay")
    assert process.wait(timeout=20) == 0


def test_inherited_fd_and_json_logs(daemon):
    """--fd N serves a socket made by the parent; --log-format json writes JSON lines."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        process = daemon("echo", "--fd", str(listener.fileno()), "--log-format", "json",
                         pass_fds=[listener.fileno()])
        line = process.read_until(r'"accepting on 127\.0\.0\.1:\d+"').string
        record = json.loads(line)
        assert record["level"] == "INFO" and record["logger"] == "connserver.server"
    finally:
        listener.close()
    assert echo_once(("127.0.0.1", port)) == b"ping"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def test_sigusr1_logs_a_census_and_sighup_reopens_the_log(daemon, tmp_path):
    """SIGUSR1 dumps census and stacks; SIGHUP reopens --log-file after a rotation."""
    log_file = tmp_path / "server.log"
    process = daemon("echo", "--bind", "127.0.0.1:0", "--log-file", str(log_file))
    assert wait_for(lambda: "accepting on" in log_file.read_text() if log_file.exists() else False)
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
    port = worker_port(process)
    pids, accepting = set(), 0
    while len(pids) < 2 or accepting < 2:   # the two kinds of line interleave
        match = process.read_until(r"started worker (\d+)|accepting on 127\.0\.0\.1:%d" % port)
        if match.group(1):
            pids.add(int(match.group(1)))
        else:
            accepting += 1
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
    port = worker_port(process)
    first = int(process.read_until(r"started worker (\d+)").group(1))
    os.kill(first, signal.SIGKILL)
    second = int(process.read_until(r"started worker (\d+)").group(1))
    assert second != first
    assert wait_for(lambda: _serves(port), 10)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


def test_workers_exit_when_the_supervisor_is_killed(daemon):
    """No orphans: SIGKILL the supervisor and its workers stop by themselves."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "2", "--graceful-timeout", "2")
    worker_port(process)
    pids = [int(process.read_until(r"started worker (\d+)").group(1)) for _ in range(2)]
    process.proc.kill()
    process.wait()
    for pid in pids:
        assert wait_for(lambda: not _alive(pid), 15), f"worker {pid} survived its supervisor"


def test_workers_are_recycled_after_max_connections(daemon):
    """--worker-max-connections: a worker exits after about N connections and is replaced."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "1",
                     "--worker-max-connections", "5")
    port = worker_port(process)
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


def test_a_signal_caught_on_another_thread_still_drains(daemon):
    """SIGTERM handled at C level on a non-main thread (the kernel's pick) still wakes the drain."""
    tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
    if tgkill is None:
        unavailable("tgkill() (glibc 2.30 or later) to signal one thread")
    process = daemon("echo", "--bind", "127.0.0.1:0")
    pid = process.proc.pid
    port = process.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        assert wait_for(lambda: _thread_state(pid, pid) == "S"), "the main thread never slept"
        # The lowest thread id after the main thread's is the accept thread, which
        # lives as long as the server (a spare thread might be exiting).
        other = min(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
        assert tgkill(pid, other, signal.SIGTERM) == 0
        client.settimeout(5)
        assert client.recv(1) == b""
    assert process.wait(5) == 0
    assert "stopped: 1 drained, 0 forced" in process.output()


def _thread_state(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as stat_file:
        return stat_file.read().rsplit(") ", 1)[1][0]


def test_start_up_names_each_listener_once_and_the_chat_says_how_to_connect(daemon):
    """One "accepting on" line per listener (no second "listening on"); the chat demo's nc hint."""
    process = daemon("chat", "--bind", "127.0.0.1:0")
    port = process.port()
    process.read_until(r"connserver\.daemon: chat demo: connect with `nc 127\.0\.0\.1 %d`" % port)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    output = process.output()
    assert "listening on" not in output
    assert output.count(f" on 127.0.0.1:{port}") == 1


def test_workers_say_how_to_connect_once(daemon):
    """With --workers the supervisor gives the hint once, when every worker serves."""
    process = daemon("chat", "--bind", "127.0.0.1:0", "--workers", "2")
    port = worker_port(process)
    process.read_until(r"chat demo: connect with `nc 127\.0\.0\.1 %d`" % port)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    output = process.output()
    assert output.count("chat demo:") == 1
    assert output.count(f"accepting on 127.0.0.1:{port}") == 2
    assert "listening on" not in output


@pytest.mark.parametrize("handler, config, expected", [
    (ChatHandler, Config(), "chat demo: connect with `nc 127.0.0.1 {port}`"),
    (ChatHandler, Config(), "chat demo: connect with `nc -U {path}`"),
    (EchoHandler, Config(), None),   # no usage_hint
    (ChatHandler, Config(proxy_protocol=True, trusted_proxy=("127.0.0.1/32",)), None),
])
def test_usage_hint(tmp_path, caplog, handler, config, expected):
    """The hint names the first listener's address; none without usage_hint or for PROXY/TLS."""
    unix = "{path}" in (expected or "")
    path = str(tmp_path / "chat.sock")
    listener = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
    try:
        listener.bind(path if unix else ("127.0.0.1", 0))
        port = None if unix else listener.getsockname()[1]
        with caplog.at_level(logging.INFO, logger="connserver.daemon"):
            log_usage_hint(handler, [listener], config)
    finally:
        listener.close()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ([] if expected is None else [expected.format(port=port, path=path)])
