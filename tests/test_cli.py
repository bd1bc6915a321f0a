"""The connserver command: flags generated from Config, errors, signals."""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import time

import pytest

from connserver import Config, cli
from connserver.config import config_fields


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main() configures logging as a daemon should; put it back for other tests."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("connserver.access")
    access_disabled = access.disabled
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    access.disabled = access_disabled


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


def test_sigterm_drains_and_exits_zero(daemon):
    """SIGTERM: clients are cancelled with reason shutdown and the process exits 0."""
    process = daemon("echo", "--bind", "127.0.0.1:0")
    port = process.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hi")
        assert client.recv(10) == b"hi"
        process.signal(signal.SIGTERM)
        assert client.recv(10) == b""
    assert process.wait() == 0
    assert "reason=shutdown" in process.output()


def test_second_signal_forces_shutdown(daemon, tmp_path):
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
    process = daemon("lingering:Lingering", "--bind", "127.0.0.1:0", "--graceful-timeout", "60")
    port = process.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"   # the handler is now blocked in recv()
        process.signal(signal.SIGTERM)
        process.read_until("draining")
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
        assert time.monotonic() - started < 5
