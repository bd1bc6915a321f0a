"""The Redis backplane: one hub room across servers, with a real redis-server.

Each server here is its own ``Server`` in this process with its own backplane
(its own origin and two Redis connections), exactly as separate processes would
have; tests/process/ runs the daemon as real separate processes.
"""

from __future__ import annotations

import threading

import pytest

import connserver
from connserver.broadcast.backplane import RedisBackplane
from connserver.errors import ConfigError
from connserver.testing import wait_for
from tests.conftest import connect

ROOM = "room"


class Relay(connserver.LineHandler):
    """Subscribes to the room; every line it reads is published to the room (not to itself)."""

    def setup(self) -> None:
        self.subscription = self.server.hub(ROOM).subscribe(self.conn)
        self.send_line("ready")

    def handle_line(self, line: str) -> None:
        self.server.hub(ROOM).publish(f"{line}\n".encode(), exclude=self.subscription)

    def finish(self) -> None:
        self.subscription.close()


class Reader:
    """A client of one server: reads lines with a timeout (every read bounded)."""

    def __init__(self, server: connserver.Server) -> None:
        self.sock = connect(server)
        self.file = self.sock.makefile("rb")
        assert self.line() == "ready"

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def say(self, text: str) -> None:
        self.sock.sendall(f"{text}\n".encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def room(connserver_server, redis_server):
    """room(n, **config) -> n servers of Relay joined by a backplane on the test's Redis."""
    readers: list[Reader] = []

    def make(count: int, **config) -> list[connserver.Server]:
        return [connserver_server(Relay, backplane=redis_server.url, **config) for _ in range(count)]

    def reader(server: connserver.Server) -> Reader:
        readers.append(Reader(server))
        return readers[-1]

    make.reader = reader
    yield make
    for each in readers:
        each.close()


def subscribed(server: connserver.Server) -> bool:
    """Both connections up and Redis confirmed the room's channel."""
    stats = server.attachment("backplane").statistics()
    return stats.connected and stats.subscribed == 1


def until_subscribed(servers) -> None:
    assert wait_for(lambda: all(subscribed(server) for server in servers), 10)


def test_two_servers_form_one_room(room):
    """A line said on one server reaches the other's clients once, and not its sender."""
    first, second = room(2)
    alice, bob, carol = room.reader(first), room.reader(second), room.reader(second)
    until_subscribed([first, second])
    alice.say("hello from alice")
    assert bob.line() == "hello from alice"
    assert carol.line() == "hello from alice"
    bob.say("hi alice")
    assert alice.line() == "hi alice"
    assert carol.line() == "hi alice"       # same server: delivered by the local hub
    stats = first.attachment("backplane").statistics()
    assert stats.published == 1 and stats.received == 1 and stats.lost == 0


def test_three_servers_keep_each_publishers_order(room):
    """300 lines from one server arrive at the two others complete and in order."""
    servers = room(3)
    talker = room.reader(servers[0])
    listeners = [room.reader(servers[1]), room.reader(servers[2])]
    until_subscribed(servers)
    for number in range(300):
        talker.say(f"m{number}")
    for listener in listeners:
        assert [listener.line() for _ in range(300)] == [f"m{n}" for n in range(300)]
    for server in servers[1:]:
        stats = server.attachment("backplane").statistics()
        assert (stats.received, stats.gaps, stats.lost, stats.duplicates) == (300, 0, 0, 0)


def test_sharded_pub_sub(room):
    """backplane_sharded uses SPUBLISH/SSUBSCRIBE, and the room works the same."""
    first, second = room(2, backplane_sharded=True)
    alice, bob = room.reader(first), room.reader(second)
    until_subscribed([first, second])
    alice.say("sharded hello")
    assert bob.line() == "sharded hello"


def test_redis_restart_loses_messages_countably_and_delivery_resumes(room, redis_server):
    """Redis down: the local room keeps working, what the others missed is counted as
    lost (as gaps) or dropped, both connections come back and resubscribe, and no
    thread is left behind or added."""
    first, second = room(2)
    alice, alice_friend, bob = room.reader(first), room.reader(first), room.reader(second)
    until_subscribed([first, second])
    alice.say("before")
    assert bob.line() == "before" and alice_friend.line() == "before"
    threads_before = threading.active_count()

    redis_server.kill()
    assert wait_for(lambda: not first.attachment("backplane").statistics().connected, 10)
    for number in range(5):
        alice.say(f"during {number}")
        assert alice_friend.line() == f"during {number}"   # the local room never stopped
    redis_server.start()
    assert wait_for(lambda: subscribed(first) and subscribed(second), 20)
    alice.say("after")
    assert alice_friend.line() == "after"
    late = []
    while (line := bob.line()) != "after":
        late.append(line)
    # What was published during the outage went out after the restart (the outbound
    # queue kept it) or is counted lost at the receiver: nothing vanishes untraced.
    during = [f"during {n}" for n in range(5)]
    assert late == during[len(during) - len(late):]
    first_stats = first.attachment("backplane").statistics()
    second_stats = second.attachment("backplane").statistics()
    assert len(late) + second_stats.lost == 5, (late, first_stats, second_stats)
    assert first_stats.reconnects >= 2 and second_stats.reconnects >= 1
    assert threading.active_count() <= threads_before


def test_gap_is_told_to_the_hub(connserver_server, redis_server):
    """A sequence that jumps ahead calls the hub's on_gap with the missing count."""
    gaps = []
    server = connserver_server(Relay, backplane=redis_server.url)
    hub = server.hub(ROOM, on_gap=gaps.append)
    assert wait_for(lambda: subscribed(server), 10)
    client = redis_server.client()
    channel = server.attachment("backplane").channel(ROOM)
    client.publish(channel, b"cs1 elsewhere.1.ab room 1\nfirst\n")
    client.publish(channel, b"cs1 elsewhere.1.ab room 5\nfifth\n")
    client.publish(channel, b"cs1 elsewhere.1.ab room 5\nfifth again\n")
    client.publish(channel, b"not an envelope")
    assert wait_for(lambda: server.attachment("backplane").statistics().malformed == 1, 10)
    stats = server.attachment("backplane").statistics()
    assert (stats.received, stats.gaps, stats.lost, stats.duplicates) == (2, 1, 3, 1)
    assert [(gap.origin, gap.channel, gap.missing) for gap in gaps] == [("elsewhere.1.ab", ROOM, 3)]
    assert hub.statistics().received == 2


def test_outbound_queue_is_bounded_while_redis_is_away(redis_server):
    """With Redis gone, publishing never blocks and the queue keeps its byte bound,
    dropping the oldest (counted)."""
    backplane = RedisBackplane(redis_server.url, max_outbound_bytes=10_000, backoff_cap=0.2)
    hub = connserver.Hub(name="bounded", backplane=backplane)
    redis_server.kill()
    try:
        backplane.start()
        for _ in range(100):
            hub.publish(b"x" * 900)
        stats = backplane.statistics()
        assert stats.outbound_bytes <= 10_000
        assert stats.published == 100 and stats.outbound_dropped >= 89
    finally:
        hub.close()
        assert backplane.close(timeout=2.0)


def test_drop_newest_keeps_the_first_messages_and_config_reaches_the_backplane(connserver_server,
                                                                              redis_server):
    """backplane_queue_bytes and backplane_overflow=drop_newest: with Redis away, what
    was queued first stays, what does not fit is refused (counted)."""
    server = connserver_server(Relay, backplane=redis_server.url, backplane_queue_bytes=10_000,
                               backplane_overflow="drop_newest")
    hub = server.hub("bounded")
    backplane = server.attachment("backplane")
    assert wait_for(lambda: backplane.statistics().connected, 10)
    redis_server.kill()
    # Both connections found Redis gone (the idle publisher by its ping, within ~1 s), so
    # none takes a message off the queue to try it.
    assert wait_for(lambda: backplane.statistics().disconnects == 2, 10)
    for number in range(100):
        hub.publish(b"%03d" % number + b"x" * 897)
    stats = backplane.statistics()
    assert stats.outbound_bytes <= 10_000 and stats.outbound_dropped >= 89
    assert backplane._outbound.get_nowait().endswith(b"\n000" + b"x" * 897)   # the first stayed


def test_admin_stats_and_metrics_show_the_backplane(connserver_server, redis_server):
    """/stats carries the backplane's books; /metrics its families."""
    import json
    import urllib.request

    server = connserver_server(Relay, backplane=redis_server.url, admin_address="127.0.0.1:0")
    server.hub(ROOM)
    assert wait_for(lambda: subscribed(server), 10)
    host, port = server.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/stats", timeout=10) as response:
        document = json.load(response)
    assert document["backplane"]["connected"] is True
    assert document["backplane"]["url"] == redis_server.url
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert "connserver_backplane_up 1" in metrics
    assert 'connserver_backplane_lost_total{where="gap"} 0' in metrics


def test_bad_backplane_configuration_fails_at_start():
    """A URL that is not redis://, rediss:// or unix:// is refused when the Config is made."""
    with pytest.raises(ConfigError, match="backplane"):
        connserver.Config(backplane="http://127.0.0.1:6379")


def test_missing_redis_library_is_a_clear_start_up_error(monkeypatch):
    """Without the redis package, a server with a backplane refuses to start, saying why."""
    import builtins

    real_import = builtins.__import__

    def no_redis(name, *args, **kwargs):
        if name == "redis" or name.startswith("redis."):
            raise ImportError("No module named 'redis'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redis)
    with pytest.raises(ConfigError, match=r"connserver\[redis\]"):
        connserver.Server(("127.0.0.1", 0), Relay, connserver.Config(backplane="redis://127.0.0.1:1/0"))


def test_threads_are_named_and_end_with_the_server(connserver_server, redis_server):
    """The backplane's two threads run while serving and are gone after shutdown."""
    server = connserver_server(Relay, backplane=redis_server.url)
    names = {thread.name for thread in threading.enumerate()}
    assert {"connserver-backplane-publish", "connserver-backplane-subscribe"} <= names
    assert server.attachment("backplane").statistics().threads_alive
    server.shutdown()
    names = {thread.name for thread in threading.enumerate()}
    assert not names & {"connserver-backplane-publish", "connserver-backplane-subscribe"}



class RoomRelay(Relay):
    """Relay in the room the client names first (several hubs on one server)."""

    room: str | None = None

    def setup(self) -> None:
        self.send_line("ready")

    def handle_line(self, line: str) -> None:
        if self.room is None:
            self.room = line
            self.subscription = self.server.hub(line).subscribe(self.conn)
            self.send_line("joined")
        else:
            self.server.hub(self.room).publish(f"{line}\n".encode(), exclude=self.subscription)

    def finish(self) -> None:
        if self.room is not None:
            self.subscription.close()


def test_sharded_on_a_redis_cluster_follows_each_channel_to_its_node(redis_cluster, connserver_server):
    """Sharded pub/sub on a three-node Redis Cluster, given one node's URL: two hubs whose
    channels live on different nodes both carry their room across servers."""
    rooms = ["room", "ws-chat"]
    owners = {redis_cluster.node_of(f"connserver:{room}").port for room in rooms}
    assert len(owners) == 2   # the test means something only if the nodes differ
    servers = [connserver_server(RoomRelay, backplane=redis_cluster.url, backplane_sharded=True)
               for _ in range(2)]
    readers = []
    try:
        for room in rooms:
            pair = [Reader(server) for server in servers]
            readers += pair
            for reader in pair:
                reader.say(room)
                assert reader.line() == "joined"
        assert wait_for(lambda: all(server.attachment("backplane").statistics().subscribed == 2
                                    for server in servers), 10)
        for index, room in enumerate(rooms):
            first, second = readers[2 * index], readers[2 * index + 1]
            first.say(f"hello {room}")
            assert second.line() == f"hello {room}"
            second.say(f"back in {room}")
            assert first.line() == f"back in {room}"
    finally:
        for reader in readers:
            reader.close()
