"""Listening sockets: Unix (mode, stale files), inherited fds, systemd's LISTEN_FDS."""

from __future__ import annotations

import os
import socket
import stat

import pytest

import connserver
from connserver.apps.echo import EchoHandler
from connserver.daemon.listeners import (check_inherited_fd, describe, inherited_listener,
                                  systemd_listen_fds, unix_listener)
from tests.conftest import wait_closed


def test_unix_listener_mode_and_stale_file(tmp_path):
    """The socket file is created 0600; a stale one is replaced, a live one refused."""
    path = str(tmp_path / "s.sock")
    first = unix_listener(path, 16)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError, match="in use"):
            unix_listener(path, 16)
    finally:
        first.close()
    second = unix_listener(path, 16)   # the file left behind is stale now
    second.close()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        unix_listener(str(tmp_path / "plain"), 16)


def test_server_on_tcp_and_unix_listeners(tmp_path):
    """Server.from_listeners accepts on every listener, with shared limits and stats."""
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = unix_listener(str(tmp_path / "u.sock"), 16)
    server = connserver.Server.from_listeners([tcp, unix], EchoHandler)
    server.start()
    try:
        assert [describe(s) for s in server.listeners][1].startswith("unix:")
        with socket.create_connection(tcp.getsockname(), timeout=10) as client:
            client.sendall(b"tcp")
            assert client.recv(10) == b"tcp"
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(tmp_path / "u.sock"))
            client.sendall(b"unix")
            assert client.recv(10) == b"unix"
        assert wait_closed(server, 2).connections_total == 2
    finally:
        server.shutdown(grace=2.0)
        server.server_close()
    assert tcp.fileno() == -1 and unix.fileno() == -1


def test_systemd_listen_fds_only_for_our_pid():
    """LISTEN_FDS counts from fd 3 and only when LISTEN_PID is this process."""
    me = str(os.getpid())
    assert systemd_listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": me}) == [3, 4]
    assert systemd_listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": "1"}) == []
    assert systemd_listen_fds({}) == []
    assert systemd_listen_fds({"LISTEN_FDS": "x", "LISTEN_PID": me}) == []


def test_inherited_fd_must_be_a_listening_stream_socket():
    """--fd refuses a socket that is not listening."""
    sock = socket.socket()
    try:
        with pytest.raises(OSError, match="not a listening"):
            inherited_listener(sock.fileno())
    finally:
        sock.close()


def test_version_flag(capsys):
    """connserver --version prints the version."""
    from connserver.daemon import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert connserver.__version__ in capsys.readouterr().out


def test_unix_listener_needs_a_path():
    """An empty path is refused: the kernel would bind a random abstract name instead."""
    with pytest.raises(ValueError, match="needs a path"):
        unix_listener("", 16)


def test_inherited_fd_that_is_not_open_or_not_a_socket_is_an_os_error(tmp_path):
    """Negative, huge, closed and non-socket fds are OSErrors naming the fd, not crashes."""
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    for fd in (-1, 2**63, closed):
        with pytest.raises(OSError, match=f"fd {fd} is not an open file descriptor"):
            inherited_listener(fd)
    with open(tmp_path / "file", "w") as file:
        with pytest.raises(OSError, match="is not a socket"):
            inherited_listener(file.fileno())


def test_check_inherited_fd_leaves_the_socket_open():
    """check_inherited_fd() only looks: the listener still accepts afterwards."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        check_inherited_fd(listener.fileno())
        with socket.create_connection(listener.getsockname(), timeout=10):
            accepted, _ = listener.accept()
            accepted.close()
