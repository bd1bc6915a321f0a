"""The admin endpoint over real HTTP on loopback."""

from __future__ import annotations

import itertools
import json
import select
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import connserver
from connserver.admin import (MAX_WAITING, MAX_WAITING_PER_ADDRESS, PROTECTED_INTERVAL,
                              AdminAdmission, AdminAdmissionStatistics, AdminServer, parse_request)
from connserver.apps.echo import EchoHandler
from connserver.testing import FakeClock, wait_for
from tests.conftest import connect, wait_closed
from tests.loopback.test_server import roundtrip


def get(server, path):
    return get_from(server.admin_address, path)


def get_from(address, path):
    host, port = address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_stats_connections_and_healthz(serve):
    """/stats has the documented keys; /connections lists live ones; /healthz is ok."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
        status, _, body = get(server, "/healthz")
        assert (status, body) == (200, "ok\n")
        status, content_type, body = get(server, "/stats")
        stats = json.loads(body)
        for key in ("connections_active", "connections_total", "connections_rejected",
                    "close_reasons", "threads", "fds", "rss_bytes", "pool", "uptime_s"):
            assert key in stats
        assert {"leased", "free", "allocated"} <= set(stats["pool"])
        assert stats["connections_active"] == 1 and content_type == "application/json"
        listed = json.loads(get(server, "/connections")[2])
        assert len(listed) == 1 and listed[0]["bytes_in"] == 4
        assert {"id", "peer", "age", "bytes_in", "bytes_out", "queue_bytes", "leases",
                "operation", "deadline_remaining"} <= set(listed[0])
    wait_closed(server, 1)


def test_metrics_are_valid_prometheus_exposition(serve):
    """/metrics parses with the reference parser and follows the naming rules."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with connect(server) as client:
        assert roundtrip(client) == b"ping"
    wait_closed(server, 1)
    status, content_type, body = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert all(name.startswith("connserver_") for name in families)
    closed = families["connserver_connections_closed"]
    assert closed.type == "counter"
    assert {s.labels["reason"]: s.value for s in closed.samples if s.name.endswith("_total")}["eof"] == 1
    assert families["connserver_resident_memory_bytes"].samples[0].value > 0


def test_debug_endpoints(serve):
    """/debug/threads shows stacks; /debug/memory shows top types and growth."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    status, _, body = get(server, "/debug/threads")
    assert status == 200 and "--- connserver-watchdog" in body and "File " in body
    first = json.loads(get(server, "/debug/memory")[2])
    assert first["top_types"] and first["growth_since_previous_call"] == []
    second = json.loads(get(server, "/debug/memory")[2])
    assert isinstance(second["growth_since_previous_call"], list)
    assert get(server, "/nope")[0] == 404


def test_healthz_says_draining_during_shutdown(serve):
    """While a shutdown drains, /healthz answers 503."""
    results = []

    class Reporter(connserver.Handler):
        def handle(self):
            try:
                self.conn.recv()
            except connserver.Cancelled:
                results.append(get(self.server, "/healthz"))
                raise

    server = serve(Reporter, admin_address="127.0.0.1:0")
    with connect(server):
        assert wait_for(lambda: server.stats().connections_active == 1)
        server.shutdown(grace=5.0)
    assert results == [(503, "text/plain", "draining\n")]


def test_bad_requests_are_closed_with_protocol_error(serve):
    """Garbage on the admin port is a counted protocol error, nothing more."""
    server = serve(EchoHandler, admin_address="127.0.0.1:0")
    with socket.create_connection(server.admin_address, timeout=10) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert sock.recv(100) == b""
    with pytest.raises(connserver.RemoteProtocolError):
        parse_request(b"GET / SPDY/3\r\n\r\n")
    assert parse_request(b"GET /stats?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/stats")


def test_admin_address_must_parse():
    """A bad admin address is a configuration error at start-up."""
    with pytest.raises(connserver.ConfigError, match="admin_address"):
        connserver.Config(admin_address="localhost:http")
    assert connserver.Config(admin_address="9100").admin_address == "9100"


# --- a health probe cannot be locked out -------------------------------------------------

# Idle clients by the shape of the attack: 8 from the probe's own address (the old
# per-address limit), or 16 from two other addresses (the old total).
IDLE_SHAPES = {"one_address": {"127.0.0.1": 8},
               "several_addresses": {"127.0.0.2": 8, "127.0.0.3": 8}}


@pytest.fixture
def admin_clock():
    """The admin fixture's admission clock: advance it past the protected interval
    to make the connections already open closable."""
    return FakeClock()


@pytest.fixture
def admin(serve, admin_clock):
    """An AdminServer for a running echo server, closed at teardown."""
    endpoint = AdminServer(serve(EchoHandler), "127.0.0.1:0")
    endpoint.admission = AdminAdmission(MAX_WAITING, MAX_WAITING_PER_ADDRESS,
                                        PROTECTED_INTERVAL, clock=admin_clock)
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.close()


def probe_healthz(address, timeout=10.0, peers=None):
    """GET /healthz on a fresh connection: (the whole answer, seconds it took).

    ``peers``: a set to add the probe's own address to, as the server names it."""
    started = time.monotonic()
    answer = b""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            if peers is not None:
                peers.add("%s:%d" % sock.getsockname()[:2])
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError as exc:   # refused at accept: a reset instead of an answer
        answer += f"[{type(exc).__name__}]".encode()
    return answer, time.monotonic() - started


def assert_healthy(answer, elapsed):
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n"), answer
    assert elapsed < 1.0


class IdleHog:
    """Holds idle connections to ``address`` (``sources``: address -> how many) and opens
    a new one at once whenever one of them is closed."""

    def __init__(self, address, sources):
        self.address = address
        self.sources = sources
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.reconnects = 0
        self.errors = []
        self.thread = threading.Thread(target=self._run, name="test-idle-hog")

    def __enter__(self):
        for source, count in self.sources.items():
            for _ in range(count):
                self._open(source)
        self.thread.start()
        return self

    def _open(self, source):
        sock = socket.create_connection(self.address, timeout=10, source_address=(source, 0))
        self.selector.register(sock, selectors.EVENT_READ, source)

    def _run(self):
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.fileobj is self.wake_r:
                        return
                    try:
                        data = key.fileobj.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self.selector.unregister(key.fileobj)
                        key.fileobj.close()
                        self._open(key.data)
                        self.reconnects += 1
        except Exception as exc:
            self.errors.append(exc)

    def __exit__(self, *exc_info):
        self.wake_w.send(b"x")
        self.thread.join(10)
        assert not self.thread.is_alive(), "the idle hog did not stop"
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()
        self.wake_w.close()


@pytest.mark.parametrize("shape", IDLE_SHAPES)
def test_idle_connections_cannot_lock_out_healthz(admin, admin_clock, shape):
    """With the admin port full of idle connections, /healthz still answers within 1 s."""
    sources = IDLE_SHAPES[shape]
    total = sum(sources.values())
    idle = [socket.create_connection(admin.address, timeout=10, source_address=(source, 0))
            for source, count in sources.items() for _ in range(count)]
    try:
        assert wait_for(lambda: admin.server.stats().connections_active >= total)
        admin_clock.advance(1.0)
        assert_healthy(*probe_healthz(admin.address))
        # Room was made by closing one idle connection (which one: the policy tests below).
        assert wait_for(lambda: admin.server.stats().close_reasons == {"limit": 1, "closed": 1})
        closed, _, _ = select.select(idle, [], [], 0)
        assert len(closed) == 1 and closed[0].recv(100) == b""
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("shape", IDLE_SHAPES)
def test_reconnecting_idle_client_cannot_lock_out_healthz(admin, admin_clock, shape):
    """A client that replaces each closed idle connection at once: 25 of 25 polls answered."""
    sources = IDLE_SHAPES[shape]
    total = sum(sources.values())
    answers = []
    probes = set()

    def full_house():
        # The hog holds all its connections, and no earlier probe's is left.
        peers = {info.peer for info in admin.server.connections()}
        return len(peers) >= total and not peers & probes

    with IdleHog(admin.address, sources) as hog:
        for _ in range(25):
            assert wait_for(full_house)
            admin_clock.advance(1.0)
            answers.append(probe_healthz(admin.address, peers=probes))
        assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer, _ in answers), \
            [answer for answer, _ in answers]
        for answer, elapsed in answers:
            assert_healthy(answer, elapsed)
        # Probes made room by closing the hog's connections (so may the 1 s idle deadline).
        assert admin.admission.statistics().closed_for_room > 0
        assert wait_for(lambda: hog.reconnects >= 25) and not hog.errors
        # Bounded all along: the hog's connections, nothing piling up.
        assert wait_for(full_house) and admin.server.stats().connections_active == total


def test_silent_admin_connection_is_closed_after_one_second(admin):
    """A connection that sends nothing is closed at the 1 s first-byte deadline."""
    with socket.create_connection(admin.address, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert 0.5 < time.monotonic() - started < 3.0
    stats = wait_closed(admin.server, 1)
    assert stats.close_reasons == {"idle": 1}


def test_trickled_request_is_closed_at_the_request_deadline(admin):
    """A request head trickled a byte every 0.5 s is closed 2 s after it began."""
    with socket.create_connection(admin.address, timeout=0.5) as sock:
        started = time.monotonic()
        answer = b""
        for byte in itertools.cycle(b"GET /healthz HTTP/1.1\r\nX-Slow: yes"):
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(100)   # meant to time out while the server waits
            except TimeoutError:
                continue
            except OSError:   # the server closed with our last byte unread: a reset
                pass
            break
        assert answer == b"" and 1.5 < time.monotonic() - started < 4.0
    stats = wait_closed(admin.server, 1)
    assert stats.close_reasons == {"read_deadline": 1}


def test_memory_walk_does_not_queue(admin):
    """/debug/memory while another walk runs answers 503 at once instead of waiting."""
    with admin.memory_lock:
        status, _, body = get_from(admin.address, "/debug/memory")
    assert (status, body) == (503, "busy: another /debug/memory walk is running\n")


# --- the admission policy, on a fake clock ----------------------------------------------------


Stats = AdminAdmissionStatistics


def make_admission(clock, max_waiting=4, per_address=2):
    return AdminAdmission(max_waiting, per_address, protected_interval=0.25, clock=clock)


def test_admission_closes_the_oldest_of_a_crowded_address():
    """Over its share, an address pays with its own longest-waiting connection."""
    clock = FakeClock()
    admission = make_admission(clock)
    assert admission.admit(1, "a") == [] and admission.admit(2, "a") == []
    assert admission.admit(3, "b") == []
    clock.advance(1.0)
    assert admission.admit(4, "a") == [1]
    assert admission.admit(5, "a") == [2]
    assert admission.statistics() == Stats(waiting=3, serving=0, closed_for_room=2)


def test_admission_over_the_total_closes_from_the_address_holding_most():
    """Over the total, the oldest connection of the fullest address is closed."""
    clock = FakeClock()
    admission = make_admission(clock)
    for conn_id, address in ((1, "a"), (2, "b"), (3, "b"), (4, "c")):
        assert admission.admit(conn_id, address) == []
    clock.advance(1.0)
    assert admission.admit(5, "d") == [2]     # b holds the most; a's is older but alone
    assert admission.admit(6, "e") == [1]     # all hold one now: the longest waiting goes
    assert admission.statistics().waiting == 4


def test_admission_protects_newcomers_and_connections_being_served():
    """Nothing younger than the protected interval, nor being answered, is ever closed."""
    clock = FakeClock()
    admission = make_admission(clock)
    assert admission.admit(1, "a") == [] and admission.admit(2, "a") == []
    # A tight reconnect loop: each newcomer finds only protected ones, so all get in.
    assert [admission.admit(conn_id, "a") for conn_id in (3, 4, 5)] == [[], [], []]
    admission.serving(1)
    clock.advance(0.25)
    assert admission.admit(6, "a") == [2, 3, 4]   # down to the share of 2; 1 is served
    assert admission.statistics() == Stats(waiting=2, serving=1, closed_for_room=3)
    admission.served(1)                            # answered: closing, closable again later
    clock.advance(0.25)
    assert admission.admit(7, "a") == [5, 6]       # 1 waits since it was answered: newest
    for conn_id in (1, 7):
        admission.forget(conn_id)
    admission.forget(99)                           # unknown or already closed: nothing
    assert admission.statistics() == Stats(waiting=0, serving=0, closed_for_room=5)
    assert admission._waiting == {} and admission._address_of == {}
