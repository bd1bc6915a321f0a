"""Listening sockets: TCP (IPv4/IPv6), Unix, and ones inherited from systemd.

A server may listen on several sockets at once (``--bind`` repeated); each is
made here, so binding errors surface at start-up, before any thread starts.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ..core.addresses import describe

__all__ = ["tcp_listener", "unix_listener", "inherited_listener", "check_inherited_fd",
           "systemd_listen_fds", "describe"]

SD_LISTEN_FDS_START = 3
_MAX_FD = 2**31 - 1   # fds are C ints


def tcp_listener(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 if ``host`` contains a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_listener(path: str, backlog: int, *, mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at ``path``, created with ``mode`` (0600: owner only).

    A stale socket file left by a crashed server is replaced; a live one (something
    still accepts on it) or a file that is not a socket is an error.
    """
    if not path:
        # bind("") would give the socket a random abstract name nobody can find.
        raise ValueError("a Unix socket needs a path")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)   # stale: nobody listens on it
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o777 & ~mode)   # created with the right mode: no window for others
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(previous)
    return sock


def inherited_listener(fd: int) -> socket.socket:
    """Adopt a listening socket passed by fd (``--fd N`` or systemd).

    Anything else (an fd that is not open, not a socket, not listening) is an
    ``OSError`` naming the fd.
    """
    not_open = OSError(errno.EBADF, f"fd {fd} is not an open file descriptor")
    if not 0 <= fd <= _MAX_FD:
        raise not_open
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise not_open from exc
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.ENOTSOCK, f"fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(errno.ENOTSOCK, f"fd {fd} is not a stream socket")
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 1
    if not listening:
        sock.detach()
        raise OSError(errno.EINVAL, f"fd {fd} is not a listening socket")
    return sock


def check_inherited_fd(fd: int) -> None:
    """Raise ``OSError`` unless ``fd`` is a listening stream socket; the fd is left as it was."""
    inherited_listener(fd).detach()


def systemd_listen_fds(environ: dict[str, str] | None = None) -> list[int]:
    """The fds systemd passed (socket activation), or [] if none were meant for us."""
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    if count <= 0 or pid != os.getpid():
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
