"""The redis_server fixture itself: a real redis-server, restartable on its port, gone after."""

from __future__ import annotations

import os
import select
import socket

from tests.redis_support import REDIS_SERVER, RedisServer


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_redis_server_answers_restarts_on_its_port_and_stops(redis_server):
    """PING answers; a stop refuses connections; a restart keeps the port and loses the data."""
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis_server.client()
    assert client.ping()
    client.set("key", b"value")
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    first_pid = redis_server.proc.pid

    redis_server.stop()
    assert not redis_server.running and _refused(redis_server.port)
    port = redis_server.port
    redis_server.start()
    assert redis_server.port == port and redis_server.proc.pid != first_pid
    assert client.get("key") is None   # redis-py reconnected; nothing persisted

    redis_server.kill()
    assert _refused(port)
    redis_server.start()
    assert client.ping()


def test_pause_freezes_redis_until_resumed(redis_server):
    """pause(): connections stay open but nothing is answered; resume() answers again."""
    client = redis_server.client()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=10) as raw:
        redis_server.pause()
        try:
            raw.sendall(b"PING\r\n")
            assert not select.select([raw], [], [], 0.2)[0], "a paused Redis answered"
        finally:
            redis_server.resume()
        assert raw.recv(64) == b"+PONG\r\n"
    redis_server.pause(0.05)
    assert client.ping()


def test_client_list_sees_the_test_clients(redis_server):
    """client() gives a redis-py client whose CLIENT LIST shows every connection."""
    first, second = redis_server.client(), redis_server.client()
    first.client_setname("first")
    second.client_setname("second")
    names = {entry["name"] for entry in first.client_list()}
    assert {"first", "second"} <= names


def test_close_leaves_no_process_or_file():
    """close(): the process is reaped, its port refuses, its directory is gone."""
    if REDIS_SERVER is None:
        from tests.conftest import unavailable
        unavailable("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(REDIS_SERVER) as server:
        server.start()
        proc, port, directory = server.proc, server.port, server.directory
        server.pause()   # even a frozen server is stopped
    assert proc.poll() is not None
    assert _refused(port)
    assert not os.path.exists(directory)
