"""A real ``redis-server`` for tests: fixture ``redis_server``, class :class:`RedisServer`.

The backplane's promises are about what Redis does when it is slow, gone or back
(messages lost while it reconnects, subscriptions restored, output-buffer limits),
so its tests run Debian's redis-server rather than a fake: one per test, on a free
loopback port, with no persistence and a temporary directory of its own, stopped
and removed at teardown. Restarts keep the port, so a client that reconnects
finds the "same" Redis, empty, as after a crash without persistence.

Registered for the whole suite by tests/conftest.py. Without redis-server the
fixture goes through ``unavailable()``: a skip locally, a failure under CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from typing import Any, Iterator

import pytest

from connserver.testing import wait_for

__all__ = ["REDIS_SERVER", "RedisServer", "redis_server"]

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)

START_TIMEOUT = 10.0   # safety net: an idle redis-server answers PING within milliseconds
STOP_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ping(port: int) -> bool:
    """One inline PING on a fresh connection; True if Redis answered PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T for stopped, Z, ...); "" once gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return ""


class RedisServer:
    """One redis-server process on 127.0.0.1, restartable on the same port.

    Methods for the test: :meth:`start` (again after a stop: same port, empty
    data), :meth:`stop` (SIGTERM, like an operator's restart), :meth:`kill`
    (SIGKILL, a crash), :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT: connections
    stay open, nothing is answered, as with a Redis stuck in a long command or a
    network stall), :meth:`client` (a redis-py client for assertions, such as
    ``CLIENT LIST``), :meth:`close` (stop and remove everything; also a context
    manager). ``options`` are extra redis-server arguments (``"--maxclients", "16"``).
    """

    def __init__(self, binary: str, *options: str, port: int | None = None) -> None:
        self.binary = binary
        self.options = options
        self.port = port or 0
        self.directory = tempfile.mkdtemp(prefix="connserver-redis-")
        self.log_path = os.path.join(self.directory, "redis.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []
        self._resume_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start redis-server (on the same port after a stop); return once it answers PING.

        On the first start a port taken between choosing and binding it is retried
        on another; a restart must get its own port back, or it fails.
        """
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        tries = 1 if self.port else 3
        for attempt in range(tries):
            if not self.port or attempt:
                self.port = _free_port()
            if self._spawn(timeout):
                return
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}; "
                           f"its log:\n{self.log()}")

    def _spawn(self, timeout: float) -> bool:
        # Its output goes to a file in its own directory: no pipe for us to drain or leak.
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--daemonize", "no", "--save", "", "--appendonly", "no",
                 "--dir", self.directory, "--logfile", "",
                 "--enable-debug-command", "local", *self.options],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=self.directory)
        proc = self.proc
        if wait_for(lambda: proc.poll() is not None or _ping(self.port), timeout) and \
                proc.poll() is None:
            return True
        self._end(signal.SIGKILL)
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (what ``systemctl restart redis`` sends), wait, SIGKILL if it lingers."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes at once, as in a crash or an OOM kill."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)   # a paused Redis must see its SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def pause(self, seconds: float | None = None) -> None:
        """Freeze redis-server (SIGSTOP): its sockets stay open and nothing is answered.

        Returns once the kernel reports it stopped. With ``seconds``, stays frozen
        that long (the calling thread waits; servers and daemons under test run
        on) and resumes; without, until :meth:`resume` (or stop/teardown).
        """
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        if not wait_for(lambda: _state(proc.pid) in ("T", "t"), START_TIMEOUT):
            raise RuntimeError(f"redis-server {proc.pid} did not stop on SIGSTOP")
        if seconds is not None:
            threading.Event().wait(seconds)   # the pause itself, not a wait for readiness
            self.resume()

    def resume(self) -> None:
        """End a :meth:`pause` (SIGCONT); return once redis-server answers PING again."""
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        if not wait_for(lambda: _ping(self.port), START_TIMEOUT):
            raise RuntimeError(f"redis-server {proc.pid} did not answer after SIGCONT")

    def client(self, **options: Any) -> Any:
        """A redis-py client (``redis.Redis``) on this server, closed at teardown.

        Reconnects by itself after a restart. ``options`` go to ``redis.Redis``.
        """
        from tests.conftest import unavailable

        try:
            import redis
        except ImportError:
            unavailable("the redis client library is not installed (pip install -e '.[test]')")
        options.setdefault("socket_timeout", 10.0)
        options.setdefault("socket_connect_timeout", 10.0)
        client = redis.Redis(host="127.0.0.1", port=self.port, db=0, **options)
        self._clients.append(client)
        return client

    def log(self) -> str:
        """What redis-server wrote (start-up banner, warnings, why it refused to start)."""
        try:
            with open(self.log_path, errors="replace") as log_file:
                return log_file.read()
        except OSError:
            return ""

    def close(self) -> None:
        """Close the clients, stop the server, remove its directory. Idempotent."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("redis-server is not running")
        return self.proc

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "stopped"
        return f"<RedisServer {self.url} {state}>"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server on a free 127.0.0.1 port (``.url``, ``.port``), gone at teardown."""
    if REDIS_SERVER is None:
        from tests.conftest import unavailable
        unavailable("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(REDIS_SERVER)
    try:
        server.start()
        yield server
    finally:
        server.close()



REDIS_CLI = shutil.which("redis-cli") or (
    "/usr/bin/redis-cli" if os.path.exists("/usr/bin/redis-cli") else None)


class RedisClusterNodes:
    """Three redis-server nodes made one Redis Cluster (no replicas) on loopback ports.

    ``url`` names the first node, as a client configured with one seed node would.
    """

    def __init__(self, count: int = 3) -> None:
        self.nodes = [RedisServer(REDIS_SERVER, "--cluster-enabled", "yes",  # type: ignore[arg-type]
                                  "--cluster-config-file", "nodes.conf",
                                  "--cluster-node-timeout", "2000") for _ in range(count)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run([REDIS_CLI, "--cluster", "create",  # type: ignore[list-item]
                        *(f"127.0.0.1:{node.port}" for node in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout, check=True)
        if not wait_for(lambda: all(
                node.client().execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                for node in self.nodes), timeout):
            raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def node_of(self, key: str) -> RedisServer:
        """The node that owns ``key``'s slot (a sharded channel lives there)."""
        slot = int(self.nodes[0].client().execute_command("CLUSTER KEYSLOT", key))
        for start, end, (host, port, *_), *_ in self.nodes[0].client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(key)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A three-node Redis Cluster on loopback, gone at teardown."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        from tests.conftest import unavailable
        unavailable("redis-server and redis-cli are not installed (apt-get install redis-server)")
    cluster = RedisClusterNodes()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
