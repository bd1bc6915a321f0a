"""The connserver command: flags generated from Config, errors, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from connserver import Config
from connserver.daemon import cli
from connserver.config import config_fields
from tests.conftest import LINGERING_HANDLER


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
    (tmp_path / "lingering.py").write_text(LINGERING_HANDLER)
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


@pytest.fixture
def nothing_serves(monkeypatch):
    """Make reaching the server a test failure, never a hang: bad input must stop before it."""
    from connserver.daemon import process as daemon, supervisor

    def refuse(options, listeners):
        for listener in listeners:
            listener.close()
        raise AssertionError("the server was started")

    def refuse_workers(options, workers):
        raise AssertionError("the supervisor was started")

    monkeypatch.setattr(daemon, "run_daemon", refuse)
    monkeypatch.setattr(supervisor, "run_supervisor", refuse_workers)


@pytest.fixture
def nasty_app_dir(tmp_path, monkeypatch):
    """A current directory holding app modules that fail at import in assorted ways."""
    (tmp_path / "raises_at_import.py").write_text('raise RuntimeError("boom\\nsecond line")\n')
    (tmp_path / "bad_syntax.py").write_text("x = (\n")
    (tmp_path / "not_utf8.toml").write_bytes(b"\xff\xfe = 1\n")
    (tmp_path / "wrong_type.toml").write_text('idle_timeout = "10"\n')
    (tmp_path / "huge_int.toml").write_text("backlog = 99999999999999999999999\n")
    (tmp_path / "huge_timeout.toml").write_text("[server]\nwrite_timeout = 1e20\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("raises_at_import", "bad_syntax"):
        sys.modules.pop(name, None)


def _run_cli(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:   # argparse's own errors
        return exit_info.code


_ECHO = ["serve", "echo", "--bind", "127.0.0.1:0"]


@pytest.mark.parametrize("argv, message", [
    # Durations that used to pass and then kill a thread (issue 10, item 2).
    ([*_ECHO, "--idle-timeout", "1e20"], "'idle_timeout': must be at most 604,800 s (7 days)"),
    ([*_ECHO, "--write-timeout", "1e20"], "write_timeout"),
    ([*_ECHO, "--read-timeout", "1e308"], "read_timeout"),
    ([*_ECHO, "--handshake-timeout", "1e308"], "handshake_timeout"),
    ([*_ECHO, "--spare-thread-timeout", "1e10"], "spare_thread_timeout"),
    ([*_ECHO, "--max-lifetime", "1e10"], "max_lifetime"),
    ([*_ECHO, "--stuck-thread-timeout", "1e10"], "stuck_thread_timeout"),
    ([*_ECHO, "--graceful-timeout", "1e10"], "graceful_timeout"),
    ([*_ECHO, "--linger-timeout", "1e10"], "linger_timeout"),
    ([*_ECHO, "--rate", "1e-300"], "'rate': must be at least"),
    ([*_ECHO, "--rate", "1", "--burst", "1e9"], "'burst'"),
    # Item 9.
    ([*_ECHO, "--backlog", "99999999999999"], "'backlog': must be at most 65,535"),
    ([*_ECHO, "--thread-stack-size", "99999999999999999"], "'thread_stack_size': must be at most"),
    ([*_ECHO, "--log-file", "missing/dir/server.log"],
     "cannot open log file 'missing/dir/server.log': No such file or directory"),
    ([*_ECHO, "--log-file", "."], "cannot open log file '.': Is a directory"),
    ([*_ECHO, "--log-file", ""], "--log-file '': expected a file name"),
    (["serve", "raises_at_import:H", "--bind", "127.0.0.1:0"],
     "importing 'raises_at_import' raised RuntimeError: boom second line"),
    (["serve", "bad_syntax:H", "--bind", "127.0.0.1:0"],
     "importing 'bad_syntax' raised SyntaxError"),
    (["serve", ".relative:H", "--bind", "127.0.0.1:0"], "expected module:HandlerClass"),
    (["serve", "echo", "--bind", "unix:"], "--bind 'unix:': expected unix:/path"),
    # Others found by trying.
    (["serve", "echo", "--bind", ":"], "--bind ':'"),
    (["serve", "echo", "--bind", ""], "--bind ''"),
    (["serve", "echo", "--bind", "127.0.0.1:70000"], "--bind '127.0.0.1:70000'"),
    (["serve", "echo", "--bind", "127.0.0.1:-1"], "--bind '127.0.0.1:-1'"),
    (["serve", "echo", "--bind", "127.0.0.1:²"], "--bind '127.0.0.1:²'"),
    (["serve", "echo", "--bind", "[::1"], "--bind '[::1'"),
    ([*_ECHO, "--admin", "127.0.0.1:²"], "admin_address"),
    (["serve", "echo", "--fd", "-1"], "--fd: fd -1 is not an open file descriptor"),
    (["serve", "echo", "--fd", "99999999999999999999"], "is not an open file descriptor"),
    ([*_ECHO, "--idle-timeout", "nan"], "must be finite"),
    ([*_ECHO, "--idle-timeout", "inf"], "must be finite"),
    ([*_ECHO, "--idle-timeout", ""], "argument --idle-timeout: expected a number, got ''"),
    ([*_ECHO, "--max-connections", "1e3"], "expected a whole number, got '1e3'"),
    ([*_ECHO, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([*_ECHO, "--workers", "0"], "--workers must be from 1 to 1024"),
    ([*_ECHO, "--workers", "100000"], "--workers must be from 1 to 1024"),
    ([*_ECHO, "--config", ""], "cannot read ''"),
    ([*_ECHO, "--config", "not_utf8.toml"], "is not valid TOML"),
    ([*_ECHO, "--config", "wrong_type.toml"], "'idle_timeout': must be a number"),
    ([*_ECHO, "--config", "huge_int.toml"], "'backlog': must be at most"),
    ([*_ECHO, "--config", "huge_timeout.toml"], "'write_timeout': must be at most"),
])
def test_nasty_input_is_one_line_and_exit_code_2(argv, message, nasty_app_dir, nothing_serves,
                                                 capsys):
    """Each bad input stops before serving with exit 2 and one line naming it, no traceback."""
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_fds_that_are_not_listening_sockets_are_exit_code_2(nothing_serves, tmp_path, capsys):
    """--fd naming a closed fd, a file or an unconnected socket is a usage error, named."""
    with open(tmp_path / "file", "w") as file, socket.socket() as idle:
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)
        for fd, message in [(closed, f"fd {closed} is not an open file descriptor"),
                            (file.fileno(), f"fd {file.fileno()} is not a socket"),
                            (idle.fileno(), f"fd {idle.fileno()} is not a listening socket")]:
            assert _run_cli(["serve", "echo", "--fd", str(fd)]) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1
        assert idle.fileno() != -1 and os.fstat(file.fileno())   # both left open as they were


def test_huge_idle_timeout_in_a_real_process_is_exit_code_2():
    """`python -m connserver serve --idle-timeout 1e20`: exit 2, one line, before listening."""
    result = subprocess.run(
        [sys.executable, "-m", "connserver", "serve", "echo", "--bind", "127.0.0.1:0",
         "--idle-timeout", "1e20"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("connserver: error: invalid configuration 'idle_timeout': "
                                     "must be at most 604,800 s (7 days); got 1e+20")


def test_help_shows_each_maximum():
    """serve --help states the maximum next to the default, from the same declaration."""
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    helps = {opt: action.help for action in serve._actions for opt in action.option_strings}
    assert "(default: 300.0; at most 604,800 s (7 days))" in helps["--idle-timeout"]
    assert "at most 31,536,000 s (365 days)" in helps["--max-lifetime"]
    assert "at most 65,535" in helps["--backlog"]
    assert "at most 1024" in helps["--workers"]
    assert "(default: none; at least 1e-05)" in helps["--rate"]
    assert "at least 1,024 bytes; at most 16,777,216 bytes (16 MiB)" in helps["--buffer-size"]
