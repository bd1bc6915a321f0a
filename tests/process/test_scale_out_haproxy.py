"""Three daemons behind a real HAProxy (examples/haproxy): spread, real addresses, draining,
and one chat room across them through a real redis-server (--backplane)."""

from __future__ import annotations

import json
import signal
import time

from connserver.testing import wait_for
from tests.process.scale_out_support import (  # noqa: F401  (fixtures)
    ChatClient, Instance, LineClient, balancer, haproxy_binary, listening, start_instance)


def test_connections_spread_over_the_instances_and_each_logs_the_client(daemon, balancer):
    """leastconn spreads 9 clients 3/3/3; each instance sees and logs the client's own address."""
    instances = [start_instance(daemon, f"app{n}") for n in (1, 2, 3)]
    proxy = balancer(instances)
    clients: list[ChatClient] = []
    try:
        for n in range(9):
            clients.append(ChatClient(proxy.port, f"user{n}"))
        seen = {instance.name: instance.peers() for instance in instances}
        assert sorted(len(peers) for peers in seen.values()) == [3, 3, 3], seen
        assert set().union(*seen.values()) == {client.address for client in clients}
        for client in clients:
            client.send("/quit")
            client.expect("* Bye!")
            client.expect_eof()
    finally:
        for client in clients:
            client.close()
    for instance in instances:
        # The access log names the client (127.0.0.2:port), not HAProxy (127.0.0.1).
        logged: set[str] = set()
        while not seen[instance.name] <= logged:
            logged.add(instance.process.read_until(
                r"connserver\.access: #\d+ (127\.0\.0\.2:\d+) duration=").group(1))
        assert logged == seen[instance.name]
    for instance in instances:
        instance.process.signal(signal.SIGTERM)
        assert instance.process.wait() == 0
    assert "protocol_error" not in "".join(i.process.output() for i in instances)


def test_a_drained_instance_leaves_rotation_while_the_others_keep_serving(daemon, balancer):
    """SIGTERM to one of three: no newcomer is turned away while HAProxy has yet to
    notice (it redispatches them), then it is marked down; its members get the
    goodbye, later clients all go to the others, whose members keep chatting."""
    instances = [start_instance(daemon, f"app{n}") for n in (1, 2, 3)]
    proxy = balancer(instances)
    clients: list[LineClient] = []
    try:
        for n in range(6):
            clients.append(ChatClient(proxy.port, f"member{n}"))
        home = where(instances, clients)
        drained, others = instances[0], instances[1:]
        leaving = [client for client in clients if home[client.address] is drained]
        staying = [client for client in clients if home[client.address] is not drained]
        assert len(leaving) == 2

        drained.process.signal(signal.SIGTERM)
        # Its listener closes at once. Until HAProxy's checks fail (fall 2: at least
        # one interval), leastconn still picks it for newcomers: each is refused
        # and redispatched, and the client never knows.
        assert wait_for(lambda: not listening(drained.port), 10)
        early: list[LineClient] = []
        while len(early) < 30 and proxy.servers()["app1"]["status"] != "DOWN":
            early.append(ChatClient(proxy.port, f"early{len(early)}"))
            clients.append(early[-1])
        assert wait_for(lambda: proxy.servers()["app1"]["status"] == "DOWN", 10), \
            proxy.servers()["app1"]
        app1 = proxy.servers()["app1"]
        assert int(app1["wredis"]) >= 1, "no newcomer was sent to app1 in the window"
        where(others, early)   # every newcomer is served by app2 or app3
        for client in leaving:
            client.expect("* Disconnected: shutdown. Bye!")
            client.expect_eof()
            client.close()

        later: list[LineClient] = []
        for n in range(4):
            later.append(ChatClient(proxy.port, f"late{n}"))
            clients.append(later[-1])
        where(others, later)
        assert drained.process.wait(20) == 0
        assert "stopped: 2 drained, 0 forced" in drained.process.output()

        # The other instances never noticed: their members still talk (in each
        # instance's own room: without a backplane, rooms are per process).
        for instance in others:
            speaker, listener = [client for client in staying if home[client.address] is instance]
            speaker.send("still here")
            listener.expect(f"<{speaker.nick}> still here")
        assert [proxy.servers()[name]["status"] for name in ("app2", "app3")] == ["UP", "UP"]
    finally:
        for client in clients:
            client.close()


def test_with_a_drain_delay_haproxy_takes_it_out_before_it_refuses_anyone(daemon, balancer):
    """--drain-delay longer than HAProxy's checks need (0.6 s here): after SIGTERM the
    instance answers /healthz with 503 while it still accepts, HAProxy marks it down on
    that 503 with its listener still open, and no newcomer ever needs a redispatch."""
    instances = [start_instance(daemon, "app1", "--drain-delay", "3")] + \
        [start_instance(daemon, f"app{n}") for n in (2, 3)]
    proxy = balancer(instances)
    clients: list[LineClient] = []
    try:
        drained = instances[0]
        drained.process.signal(signal.SIGTERM)
        drained.process.read_until(r"drain delay: /healthz answers 503")
        while proxy.servers()["app1"]["status"] != "DOWN":
            assert listening(drained.port)
            clients.append(ChatClient(proxy.port, f"early{len(clients)}"))   # served, anywhere
            assert len(clients) < 200, proxy.servers()["app1"]
        row = proxy.servers()["app1"]
        assert (row["check_status"], row["check_code"]) == ("L7STS", "503"), row
        assert listening(drained.port)   # down in HAProxy's eyes before it closed its door
        assert int(row["wredis"]) == 0, row   # nobody was refused and sent elsewhere
        later = [ChatClient(proxy.port, f"late{n}") for n in range(4)]
        clients += later
        where(instances[1:], later)
        assert drained.process.wait(20) == 0
    finally:
        for client in clients:
            client.close()


# A handler with work in hand when the drain begins: it says "working", works
# until the test creates the file "release" (at most 20 s), then answers "done",
# which a shutdown lets it send. Its drain lasts as long as the test wants.
JOB_HANDLER = """
import pathlib
import time

import connserver


class JobHandler(connserver.LineHandler):
    def handle_line(self, line):
        if line != "job":
            return "?"
        self.send_line("working")
        deadline = time.monotonic() + 20
        while not pathlib.Path("release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)   # the stand-in for real work: not cancellable
        return "done"
"""


def test_an_instance_draining_slowly_is_taken_out_by_its_503(daemon, balancer, tmp_path):
    """While a drained instance finishes its work, /healthz answers 503 and HAProxy marks
    it down on that answer; new clients go to the others; its job still completes."""
    (tmp_path / "jobs.py").write_text(JOB_HANDLER)
    instances = [start_instance(daemon, f"app{n}", app="jobs:JobHandler") for n in (1, 2, 3)]
    proxy = balancer(instances)
    worker = LineClient(proxy.port, "worker")
    clients = [worker]
    try:
        drained = where(instances, [worker])[worker.address]
        others = [instance for instance in instances if instance is not drained]
        worker.send("job")
        worker.expect("working")

        drained.process.signal(signal.SIGTERM)
        assert wait_for(lambda: proxy.servers()[drained.name]["status"] == "DOWN", 10), \
            proxy.servers()[drained.name]
        row = proxy.servers()[drained.name]
        # Down on the 503 answer (layer 7), while the instance is still up and draining.
        assert (row["check_status"], row["check_code"]) == ("L7STS", "503"), row
        assert drained.admin_get("/healthz") == (503, "draining\n")
        assert drained.process.proc.poll() is None

        newcomers: list[LineClient] = []
        for n in range(4):
            newcomers.append(LineClient(proxy.port, f"new{n}"))
            clients.append(newcomers[-1])
        for client in newcomers:
            client.send("hello")
            client.expect("?")
        where(others, newcomers)

        (tmp_path / "release").touch()
        worker.expect("done")
        worker.expect_eof()
        assert drained.process.wait(20) == 0
        assert "stopped: 1 drained, 0 forced" in drained.process.output()
    finally:
        for client in clients:
            client.close()


def test_one_room_across_instances_through_redis_while_one_drains(daemon, balancer, redis_server):
    """With --backplane, members on three instances are one room; one instance drains,
    the others' members keep hearing each other, and its members rejoin elsewhere."""
    instances = [start_instance(daemon, f"app{n}", "--backplane", redis_server.url)
                 for n in (1, 2, 3)]
    proxy = balancer(instances)
    clients: list[ChatClient] = []
    try:
        for n in range(6):
            clients.append(ChatClient(proxy.port, f"member{n}"))
        home = where(instances, clients)
        assert sorted(len([c for c in clients if home[c.address] is i]) for i in instances) == [2, 2, 2]
        # Every process's hub subscribed: from here on nothing is published into the void.
        redis = redis_server.client()
        assert wait_for(lambda: dict(redis.pubsub_numsub("connserver:chat"))[b"connserver:chat"] == 3, 10)
        for speaker in clients:
            speaker.send(f"hello from {home[speaker.address].name}")
            for listener in clients:
                if listener is not speaker:
                    listener.expect(f"<{speaker.nick}> hello from {home[speaker.address].name}")

        drained, others = instances[0], instances[1:]
        leaving = [client for client in clients if home[client.address] is drained]
        staying = [client for client in clients if home[client.address] is not drained]
        drained.process.signal(signal.SIGTERM)
        # The room goes on while app1 drains and HAProxy takes it out: every line said on
        # app2 or app3 reaches the members on both.
        said, deadline = 0, time.monotonic() + 20
        while drained.process.proc.poll() is None or proxy.servers()["app1"]["status"] != "DOWN":
            assert time.monotonic() < deadline, f"app1 never left: {proxy.servers()['app1']}"
            speaker = staying[said % len(staying)]
            speaker.send(f"line {said}")
            for listener in staying:
                if listener is not speaker:
                    listener.expect(f"<{speaker.nick}> line {said}")
            said += 1
        assert drained.process.wait(20) == 0
        assert "stopped: 2 drained, 0 forced" in drained.process.output()
        for client in leaving:
            client.expect("* Disconnected: shutdown. Bye!")
            client.expect_eof()
            client.close()

        # Its members come back through HAProxy, land on the others, and are in the room.
        back: list[ChatClient] = []
        for client in leaving:
            back.append(ChatClient(proxy.port, client.nick))
            clients.append(back[-1])
        where(others, back)
        for speaker in back:
            speaker.send("back again")
            for listener in staying + back:
                if listener is not speaker:
                    listener.expect(f"<{speaker.nick}> back again")
        for instance in others:
            status, body = instance.admin_get("/stats")
            stats = json.loads(body)["backplane"]
            assert (stats["lost"], stats["outbound_dropped"]) == (0, 0), stats
    finally:
        for client in clients:
            client.close()


def where(instances: list[Instance], clients: list[LineClient]) -> dict[str, Instance]:
    """Which of ``instances`` serves each client (by its address in their /connections);
    fails if one of the clients is served by none of them within 10 s."""
    def look() -> dict[str, Instance] | None:
        home = {address: instance for instance in instances for address in instance.peers()}
        return home if all(client.address in home for client in clients) else None
    home = wait_for(look, 10)
    assert home, f"not all of {[c.address for c in clients]} are served by " \
                 f"{[i.name for i in instances]}: {[sorted(i.peers()) for i in instances]}"
    return {client.address: home[client.address] for client in clients}
