"""`connserver serve chat --backplane redis://…` as real processes on a real redis-server.

One room across daemons and workers, a daemon that stops reading from Redis (Redis
cuts it at its output-buffer limit; the others never wait; it comes back and says
what it lost), and short soaks of two daemons chatting through Redis at once.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import urllib.request

from connserver.daemon import cli
from connserver.soak.report import format_verdict
from connserver.testing import wait_for


class ChatClient:
    """An `nc` of the chat: choose a nickname, then say and read lines (all bounded)."""

    def __init__(self, port: int, nick: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")
        self.nick = nick
        assert "nickname" in self.line()
        self.say(nick)
        assert self.line().startswith(f"* You are {nick};")

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def say(self, text: str) -> None:
        self.sock.sendall(f"{text}\n".encode())

    def until(self, wanted: str) -> list[str]:
        """Lines up to and including ``wanted`` (a read timeout fails the test)."""
        lines = []
        while not lines or lines[-1] != wanted:
            line = self.line()
            assert line, f"{self.nick}: connection closed before {wanted!r}; got {lines[-5:]}"
            lines.append(line)
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def start_chat(daemon, redis_url: str, *extra: str):
    """A chat daemon on the backplane; returns (process, port, admin port or None)."""
    process = daemon("chat", "--bind", "127.0.0.1:0", "--backplane", redis_url, "--no-access-log",
                     *extra)
    if "--workers" in extra:
        port = int(process.read_until(r"starting \d+ workers on 127\.0\.0\.1:(\d+)").group(1))
        process.read_until(r"chat demo")
        return process, port, None
    if "--admin" not in extra:
        return process, process.port(), None
    # The admin endpoint's own listener logs first, then the chat's.
    admin = int(process.read_until(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
    port = int(process.read_until(r"accepting on 127\.0\.0\.1:(\d+)").group(1))
    return process, port, admin


def backplane_stats(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10) as response:
        return json.load(response)["backplane"]


def subscribers(redis_server) -> int:
    client = redis_server.client()
    return dict(client.pubsub_numsub("connserver:chat"))[b"connserver:chat"]


def test_two_daemons_and_three_workers_are_one_room(daemon, redis_server):
    """Clients of a daemon and of a 3-worker daemon all hear each other through Redis."""
    _, single, _ = start_chat(daemon, redis_server.url)
    _, workers, _ = start_chat(daemon, redis_server.url, "--workers", "3")
    clients = [ChatClient(single, "alice")] + [ChatClient(workers, f"bob{n}") for n in range(6)]
    try:
        # Each process that has a member has joined the channel (workers by the kernel's
        # spread of six connections: at least the single daemon and one worker).
        assert wait_for(lambda: subscribers(redis_server) >= 2, 10)
        for speaker in clients:
            speaker.say(f"hello from {speaker.nick}")
            for listener in clients:
                if listener is not speaker:
                    listener.until(f"<{speaker.nick}> hello from {speaker.nick}")
    finally:
        for client in clients:
            client.close()


def test_a_daemon_that_stops_reading_from_redis_is_cut_and_says_what_it_lost(daemon, redis_server):
    """SIGSTOP one daemon while the room is busy: Redis cuts its subscription at the
    output-buffer limit, the other daemon's members get every line meanwhile; after
    SIGCONT it reconnects, counts the loss and tells its members."""
    redis_server.client().config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
    _, talker_port, talker_admin = start_chat(daemon, redis_server.url, "--admin", "127.0.0.1:0")
    stopped, stopped_port, stopped_admin = start_chat(daemon, redis_server.url, "--admin", "127.0.0.1:0")
    _, healthy_port, _ = start_chat(daemon, redis_server.url)
    alice, bob, carol = (ChatClient(talker_port, "alice"), ChatClient(stopped_port, "bob"),
                         ChatClient(healthy_port, "carol"))
    try:
        assert wait_for(lambda: subscribers(redis_server) == 3, 10)
        alice.say("before")
        assert bob.until("<alice> before") and carol.until("<alice> before")
        stopped.signal(signal.SIGSTOP)
        filler = "x" * 900
        # 11 MB: past what the stopped process's socket takes (several MB on loopback) and
        # Redis' 256 KB limit; carol reads on her own thread all along, so her own hub
        # queue (1 MiB) does not fill behind a test busy sending.
        count = 12_000
        received: list[list[str]] = []
        reader = threading.Thread(target=lambda: received.append(
            carol.until(f"<alice> {count - 1} {filler}")))
        reader.start()
        for n in range(count):
            alice.say(f"{n} {filler}")
        reader.join(60)
        assert received, "carol did not get every line"
        assert [line.split()[1] for line in received[0]] == [str(n) for n in range(count)]
        stopped.signal(signal.SIGCONT)
        assert wait_for(lambda: backplane_stats(stopped_admin)["reconnects"] >= 1, 20)
        assert wait_for(lambda: backplane_stats(stopped_admin)["subscribed"] == 1, 20)
        alice.say("after")
        lines = bob.until("<alice> after")
        notices = [line for line in lines if re.fullmatch(r"\* \d+ message\(s\) from elsewhere "
                                                          r"in the room were lost", line)]
        got = sum(1 for line in lines if line.startswith("<alice> ") and line != "<alice> after")
        stats = backplane_stats(stopped_admin)
        assert stats["lost"] > 0 and notices, (stats, lines[-3:])
        assert got + stats["lost"] == count, (got, stats)   # every line arrived or is counted
        assert backplane_stats(talker_admin)["lost"] == 0
    finally:
        stopped.signal(signal.SIGCONT)
        for client in (alice, bob, carol):
            client.close()


# Short soaks like tests/process/test_soak_runs.py's, of chat daemons: every echo and
# idle client joins the room (--hello), so each line said is broadcast to the room in
# both processes, through Redis.
SOAK = ["--duration", "4s", "--cycle", "0.5s", "--settle", "1s", "--interval", "0.125s",
        "--max-rss-slope", "32768", "--protocol", "line", "--no-verify",
        "--echo-clients", "5", "--echo-rate", "50", "--idle", "10", "--churn-rate", "20",
        "--slowloris", "2", "--drip-interval", "0.3s", "--zero-window", "2",
        "--oversized-rate", "4", "--oversized-wait", "0.5s", "--reset-rate", "4",
        "--seed", "7", "--progress", "none", "--html", "none"]


def test_soak_two_chat_daemons_through_redis(daemon, redis_server, tmp_path, capsys):
    """Two chat daemons soaked at once, chatting through Redis: both pass (no growth in
    memory, threads or fds) and the backplane carried the load without a loss."""
    servers = [start_chat(daemon, redis_server.url, "--admin", "127.0.0.1:0", "--read-timeout",
                          "1", "--write-timeout", "1") for _ in range(2)]
    for _, port, _ in servers:
        # The room's hub (its writer thread, epoll and wake-up pair) is made by the first
        # member and kept: join once before the soak's baseline is taken.
        ChatClient(port, "warmup").close()
    statuses: dict[int, int] = {}

    def soak(index: int, port: int, admin: int) -> None:
        statuses[index] = cli.main(["soak", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                                    "--hello", f"s{index}n%d\\n", *SOAK,
                                    "--report", str(tmp_path / f"soak{index}.json")])

    threads = [threading.Thread(target=soak, args=(index, port, admin))
               for index, (_, port, admin) in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    reports = [json.loads((tmp_path / f"soak{index}.json").read_text()) for index in range(2)]
    assert statuses == {0: 0, 1: 0}, "\n".join(format_verdict(report) for report in reports)
    for _, _, admin in servers:
        stats = backplane_stats(admin)
        assert stats["received"] > 100 and stats["lost"] == 0 and stats["outbound_dropped"] == 0, stats


def test_redis_restarts_cost_no_thread_and_no_memory(daemon, redis_server):
    """Redis restarted five times under a chatting room: after each, the daemon's
    backplane is back and the room works; threads stay the same and Python's
    allocated blocks do not grow from one restart to the next (±500 is noise here), nor
    do the descriptors (a connection left behind per restart would show at once)."""
    _, talker_port, admin = start_chat(daemon, redis_server.url, "--admin", "127.0.0.1:0")
    _, listener_port, _ = start_chat(daemon, redis_server.url)
    alice, bob = ChatClient(talker_port, "alice"), ChatClient(listener_port, "bob")

    def stats() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=10) as response:
            return json.load(response)

    def cycle(number: int) -> dict:
        redis_server.kill()
        for line in range(20):
            alice.say(f"outage {number} line {line}")   # published while Redis is away
        redis_server.start()
        assert wait_for(lambda: stats()["backplane"]["connected"]
                        and stats()["backplane"]["subscribed"] == 1, 20)
        assert wait_for(lambda: subscribers(redis_server) == 2, 20)
        alice.say(f"after {number}")
        bob.until(f"<alice> after {number}")
        return stats()

    try:
        assert wait_for(lambda: subscribers(redis_server) == 2, 10)
        first = cycle(0)
        samples = [cycle(number) for number in range(1, 5)]
        def lasting(sample: dict) -> dict:   # spare threads come and go; admin requests too
            return {role: count for role, count in sample["threads_by_role"].items()
                    if "spare" not in role and not role.startswith("admin")}

        assert all(lasting(sample) == lasting(first) for sample in samples), \
            [lasting(sample) for sample in [first, *samples]]
        # One connection left per restart would add four; an admin request closing as
        # the next comes may be counted once.
        assert max(sample["fds"] for sample in samples) - first["fds"] <= 1, samples
        growth = [b["allocated_blocks"] - a["allocated_blocks"]
                  for a, b in zip([first, *samples], samples)]
        assert max(growth) < 2_000, growth   # a leak per restart would show in every step
        assert samples[-1]["backplane"]["reconnects"] >= 10   # two connections, five times
    finally:
        alice.close()
        bob.close()
