"""The connserver command: flags generated from Config, errors, signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from connserver import Config, cli
from connserver.config import config_fields


def test_every_config_field_is_a_flag():
    """Each Config field appears as --name-with-dashes in `serve --help`."""
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for field, _ in config_fields():
        assert "--" + field.name.replace("_", "-") in flags


def test_flags_override_the_toml_file(tmp_path):
    """--config loads the file; flags given on the command line win."""
    path = tmp_path / "server.toml"
    path.write_text("idle_timeout = 5.0\nmax_connections = 9\n")
    args = cli.build_parser().parse_args(
        ["serve", "echo", "--config", str(path), "--idle-timeout", "7", "--max-lifetime", "none",
         "--no-tcp-keepalive"])
    config = cli.build_config(args)
    assert config == Config(idle_timeout=7.0, max_connections=9, max_lifetime=None,
                            tcp_keepalive=False)


@pytest.mark.parametrize("argv, message", [
    (["serve", "echo", "--idle-timeout", "-1"], "idle_timeout"),
    (["serve", "nosuchmodule:Handler"], "cannot import"),
    (["serve", "echo", "--bind", "localhost"], "HOST:PORT"),
])
def test_bad_configuration_is_one_line_and_exit_code_2(argv, message, capsys):
    """Bad settings stop start-up with a message naming them and exit code 2."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_toml_key_is_exit_code_2(tmp_path, capsys):
    """An unknown key in the TOML file is named, exit code 2."""
    path = tmp_path / "server.toml"
    path.write_text("idle_timout = 5\n")
    assert cli.main(["serve", "echo", "--config", str(path)]) == 2
    assert "idle_timout" in capsys.readouterr().err


def test_port_in_use_is_one_line_and_exit_code_1(capsys):
    """A port already taken is a one-line error, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "echo", "--bind", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot listen" in err and len(err.splitlines()) == 1


def test_load_handler_imports_from_the_current_directory(tmp_path, monkeypatch):
    """APP may be module:Class from the current directory, or a built-in name."""
    (tmp_path / "myapp.py").write_text(textwrap.dedent("""
        import connserver
        class Mine(connserver.Handler):
            pass
        NotAHandler = object
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.load_handler("myapp:Mine").__name__ == "Mine"
    assert cli.load_handler("echo").__name__ == "EchoHandler"
    with pytest.raises(cli.UsageError, match="not a connserver.Handler"):
        cli.load_handler("myapp:NotAHandler")
    sys.modules.pop("myapp", None)


def _start_daemon(tmp_path, *args: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "connserver", "serve", *args, "--bind", "127.0.0.1:0"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    proc.wait(10)
    pytest.fail("the daemon did not report its address")


def _read_until(proc: subprocess.Popen, text: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:   # bounded by the test's timeout
        if text in line:
            return
    pytest.fail(f"the daemon exited before logging {text!r}")


def test_sigterm_drains_and_exits_zero(tmp_path):
    """SIGTERM: clients are cancelled with reason shutdown and the process exits 0."""
    proc, port = _start_daemon(tmp_path, "echo")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hi")
            assert client.recv(10) == b"hi"
            proc.send_signal(signal.SIGTERM)
            assert client.recv(10) == b""
        assert proc.wait(20) == 0
        assert "reason=shutdown" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def test_second_signal_forces_shutdown(tmp_path):
    """A second SIGTERM ends the grace period at once, forcing sockets shut."""
    (tmp_path / "lingering.py").write_text(textwrap.dedent("""
        import connserver
        class Lingering(connserver.Handler):
            def handle(self):
                try:
                    self.conn.sendall(self.conn.recv())
                    self.conn.recv()
                except connserver.Cancelled:
                    # Ignore the drain: block writing to a client that never reads,
                    # on the raw socket, until the shutdown is forced.
                    self.conn.socket.sendall(b"x" * (64 << 20))
    """))
    proc, port = _start_daemon(tmp_path, "lingering:Lingering", "--graceful-timeout", "60")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"hi")
            assert client.recv(2) == b"hi"   # the handler is now blocked in recv()
            proc.send_signal(signal.SIGTERM)
            _read_until(proc, "draining")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
