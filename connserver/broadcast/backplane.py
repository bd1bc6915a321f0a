"""RedisBackplane: one Hub room across processes and machines, through Redis pub/sub.

A hub alone reaches the connections of its own process. With a backplane, what
a hub publishes also goes to Redis on the hub's channel (``connserver:<hub
name>``), and every other process's hub of the same name hands it to its own
subscribers, as one ``bytes`` object shared by their queues (encoded once per
process). The publishing process delivers to its own subscribers at once and
skips its message when Redis echoes it back, so a local room keeps working
while Redis is away.

One process, two Redis connections, whatever the number of hubs and
subscribers: one that publishes (its own thread, so ``Hub.publish`` never waits
for Redis: messages wait in a bounded outbound queue, the oldest dropped when
it is full, and go out pipelined), one that is subscribed to every hub's channel
(its own thread, reading). Each thread reconnects on its own, with exponential
back-off and full jitter, and the subscriber re-subscribes every channel.

The delivery contract is Redis pub/sub's: **at most once**, in publish order
per publishing process. What could not be delivered is counted, never silent
(:mod:`connserver.broadcast.sequence`): outbound drops and publishes whose
fate a broken connection left unknown on the sending side; gaps in an origin's
sequence on the receiving side (``/stats``, ``/metrics``, and the hub's
``on_gap``). See docs/explanation/delivery.md.

``sharded=True`` uses ``SPUBLISH``/``SSUBSCRIBE`` (Redis 7), whose messages stay
on the shard that owns the channel instead of going to every node of a Redis
Cluster; given a cluster node's URL, redis-py's cluster client follows each
channel to its node (one subscribed connection per such node).

Both threads are needed for the room to be one: each catches whatever reaches
its loop (counted as an internal error, then it reconnects), and
``statistics().threads_alive`` says if one is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import urllib.parse
from typing import Any, Callable, Protocol

from ..core.deadline import Clock, monotonic
from ..core.faults import Faults
from ..core.server import Server
from ..core.threads import block_async_signals
from ..errors import ConfigError
from .queues import ByteBoundedQueue, QueueClosed, QueueEmpty
from .sequence import Gap, MalformedEnvelope, SequenceTracker, check_token, decode, encode, new_origin



class _Hub(Protocol):
    """What the backplane needs of a :class:`~connserver.Hub` (no import: the hub
    module imports this one)."""

    name: str

    def publish_local(self, message: bytes) -> int: ...

    def gap_seen(self, gap: Gap) -> None: ...

__all__ = ["RedisBackplane", "BackplaneStatistics", "Backoff", "redact", "require_redis_client"]

log = logging.getLogger("connserver.backplane")

_BATCH_ITEMS = 512            # most messages in one pipeline
_BATCH_BYTES = 1024 * 1024    # most bytes in one pipeline
_POLL = 0.1                   # the subscriber's longest wait before it looks for new channels
_IDLE_PING = 1.0              # an idle publishing connection is pinged this often
_CLUSTER_POLL = 0.01          # a Redis Cluster's node connections are read in turn, this long each


@dataclasses.dataclass(frozen=True)
class BackplaneStatistics:
    url: str                   # without its password
    origin: str                # this process's stream name
    connected: bool            # both connections are up
    threads_alive: bool        # both threads are running (False only after close, or a bug)
    channels: int              # hubs attached
    subscribed: int            # their channels Redis confirmed subscribing on this connection
    published: int             # messages handed to the backplane by hubs
    sent: int                  # messages Redis accepted (PUBLISH answered)
    outbound_dropped: int      # dropped from the full outbound queue (oldest first)
    unconfirmed: int           # in flight when the connection broke: maybe sent, maybe not
    outbound_bytes: int        # waiting to be sent now
    received: int              # messages from other processes, delivered to local hubs
    gaps: int                  # times a stream jumped ahead
    lost: int                  # messages from other processes that never arrived here
    duplicates: int            # messages received twice (dropped)
    malformed: int             # messages on our channels that were not ours (dropped)
    disconnects: int           # connections lost (either one)
    reconnects: int            # connections made again after a loss


class Backoff:
    """Exponential back-off with full jitter: wait a random time up to base × 2^n, capped.

    Jitter keeps a fleet of processes from reconnecting in step after Redis restarts."""

    def __init__(self, base: float = 0.05, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()
        self.attempts = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempts = 0


def redact(url: str) -> str:
    """``url`` without its password, for logs and /stats."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def require_redis_client() -> Any:
    """The redis module, or a ConfigError that says how to install it."""
    try:
        import redis
    except ImportError:
        raise ConfigError("backplane", "needs the redis client library: "
                          "pip install 'connserver[redis]'") from None
    return redis


class RedisBackplane:
    """The process's link to Redis for every hub (see the module docstring).

    ``max_outbound_bytes``/``max_outbound_items`` bound what waits for Redis
    (while it is slow or away), and ``overflow`` says what goes when it is full
    (``drop_oldest`` or ``drop_newest``); ``prefix`` namespaces the channels
    (several unrelated deployments may share one Redis).
    """

    def __init__(self, url: str, *, sharded: bool = False, prefix: str = "connserver",
                 max_outbound_bytes: int = 8 * 1024 * 1024, max_outbound_items: int = 65536,
                 overflow: str = "drop_oldest",
                 connect_timeout: float = 2.0, backoff_base: float = 0.05, backoff_cap: float = 5.0,
                 flush_timeout: float = 2.0, clock: Clock = monotonic,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self._redis = require_redis_client()
        check_token("prefix", prefix)
        self.url = url
        self.sharded = sharded
        self.prefix = prefix
        self.origin = new_origin()
        self.connect_timeout = connect_timeout
        self.flush_timeout = flush_timeout
        self._backoff = (backoff_base, backoff_cap)
        self._clock = clock
        self.faults = Faults("backplane", log, on_fault)
        self._lock = threading.Lock()
        self._hubs: dict[str, _Hub] = {}          # Redis channel -> hub
        self._unsubscribed: set[str] = set()       # channels the subscriber has yet to join
        self._confirmed: set[str] = set()          # channels Redis confirmed (this connection)
        self._joined = threading.Condition(self._lock)   # notified as channels are confirmed
        self._next_seq: dict[str, int] = {}        # hub name -> last sequence number used
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow must be drop_oldest or drop_newest, not {overflow!r}")
        self._outbound = ByteBoundedQueue(max_outbound_items, max_outbound_bytes, policy=overflow)
        self._tracker = SequenceTracker()          # owned by the subscriber thread
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connected = {"publish": False, "subscribe": False}
        self._ever_connected = {"publish": False, "subscribe": False}
        self._published = self._sent = self._unconfirmed = 0
        self._received = self._malformed = self._disconnects = self._reconnects = 0
        self._closed = False
        self._in_use: dict[str, Any] = {}   # the client each role uses now (cluster or not)
        # The clients are made (not connected) here so a malformed URL fails at start-up.
        try:
            self._clients = {role: self._client() for role in ("publish", "subscribe")}
        except ValueError as exc:
            raise ConfigError("backplane", f"{redact(url)!r}: {exc}") from None

    # --- hubs ------------------------------------------------------------------------

    def channel(self, hub_name: str) -> str:
        return f"{self.prefix}:{hub_name}"

    def attach(self, hub: _Hub, timeout: float = 1.0) -> None:
        """Carry ``hub``'s messages (its name is the channel: no whitespace).

        While Redis is up, waits (at most ``timeout``) until it confirms the
        subscription: the first member of a room is in it when this returns, so
        what the others say next reaches it."""
        check_token("hub name", hub.name)
        channel = self.channel(hub.name)
        with self._lock:
            if channel in self._hubs and self._hubs[channel] is not hub:
                raise ValueError(f"a hub named {hub.name!r} is already on this backplane")
            self._hubs[channel] = hub
            self._unsubscribed.add(channel)
            if self._connected["subscribe"]:
                self._joined.wait_for(lambda: channel in self._confirmed
                                      or not self._connected["subscribe"], timeout)

    def detach(self, hub: _Hub) -> None:
        with self._lock:
            channel = self.channel(hub.name)
            if self._hubs.get(channel) is hub:
                del self._hubs[channel]
                self._unsubscribed.discard(channel)

    def publish(self, hub_name: str, payload: bytes) -> None:
        """Queue ``payload`` for the other processes; never waits (full: the oldest goes)."""
        with self._lock:
            if self._closed:
                return
            seq = self._next_seq[hub_name] = self._next_seq.get(hub_name, 0) + 1
            self._published += 1
        try:
            self._outbound.put_nowait(encode(self.origin, hub_name, seq, payload))
        except QueueClosed:
            pass   # closing: counted as dropped by nobody; the stream's gap says it

    # --- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the two threads (idempotent: the server calls it at every serve)."""
        with self._lock:
            if self._threads or self._closed:
                return
            self._threads = [
                threading.Thread(target=self._run, args=("publish", self._publish_loop),
                                 name="connserver-backplane-publish", daemon=True),
                threading.Thread(target=self._run, args=("subscribe", self._subscribe_loop),
                                 name="connserver-backplane-subscribe", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("backplane: %s, this process is %s; hubs share channels %s:<hub name>",
                 redact(self.url), self.origin, self.prefix)

    def close(self, timeout: float | None = None) -> bool:
        """Send what is queued (within ``flush_timeout``, if Redis is there), then stop."""
        with self._lock:
            if self._closed:
                return not any(thread.is_alive() for thread in self._threads)
            self._closed = True
            threads = list(self._threads)
        self._outbound.close()   # the publisher sends what is queued, then stops
        deadline = self._clock() + (self.flush_timeout if timeout is None else timeout)
        if threads and self._connected["publish"]:
            threads[0].join(max(0.0, deadline - self._clock()))
        self._stopping.set()
        for thread in threads:
            thread.join(max(0.1, deadline - self._clock()))
        for client in [*self._clients.values(), *self._in_use.values()]:
            _close_client(client)
        left = self._outbound.bytes
        if left:
            log.warning("backplane closed with %d bytes not sent to Redis", left)
        return not any(thread.is_alive() for thread in threads)

    def statistics(self) -> BackplaneStatistics:
        tracker = self._tracker
        with self._lock:
            return BackplaneStatistics(
                url=redact(self.url), origin=self.origin,
                connected=all(self._connected.values()),
                threads_alive=bool(self._threads) and all(t.is_alive() for t in self._threads),
                channels=len(self._hubs), subscribed=len(self._confirmed),
                published=self._published, sent=self._sent,
                outbound_dropped=self._outbound.statistics().dropped,
                unconfirmed=self._unconfirmed, outbound_bytes=self._outbound.bytes,
                received=self._received, gaps=tracker.gaps, lost=tracker.lost,
                duplicates=tracker.duplicates, malformed=self._malformed,
                disconnects=self._disconnects, reconnects=self._reconnects)

    def __repr__(self) -> str:
        return f"<RedisBackplane {redact(self.url)} origin={self.origin}>"

    # --- the threads -------------------------------------------------------------------

    def _client(self) -> Any:
        redis = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # Our own loops reconnect (with jitter) and count; the client must not retry
        # behind our back (a retried PUBLISH is a duplicate, dropped by the receivers).
        return redis.Redis.from_url(
            self.url, socket_connect_timeout=self.connect_timeout, socket_timeout=self.connect_timeout,
            socket_keepalive=True, health_check_interval=5, retry=Retry(NoBackoff(), 0),
            client_name=f"connserver-{self.origin}")

    def _connect(self, role: str) -> Any:
        """The client for ``role``, once Redis answered. Sharded, against a Redis Cluster:
        a cluster client, made afresh (it follows the slots to each channel's node; its
        own retries after a broken connection may repeat a publish, which the receivers
        drop as a duplicate)."""
        plain = self._clients[role]
        plain.ping()
        client = plain
        if self.sharded and str(plain.info("cluster").get("cluster_enabled", 0)) == "1":
            from redis.cluster import RedisCluster
            client = RedisCluster.from_url(
                self.url, socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.connect_timeout, socket_keepalive=True,
                client_name=f"connserver-{self.origin}")
        self._in_use[role] = client
        return client

    def _run(self, role: str, loop: Callable[[Backoff], None]) -> None:
        """One thread: its loop, reconnecting after every failure until close()."""
        block_async_signals()
        backoff = Backoff(*self._backoff)
        redis = self._redis
        while not self._stopping.is_set():
            try:
                loop(backoff)
                return   # the loop ends only when closing
            except (redis.RedisError, OSError) as exc:
                self._lost(role, exc)
            except Exception as exc:   # a bug must not silently end the room
                self.faults.record(exc, role)
                self._lost(role, exc)
            self._stopping.wait(backoff.next())

    def _lost(self, role: str, exc: BaseException) -> None:
        with self._lock:
            was_connected = self._connected[role]
            self._connected[role] = False
            if was_connected:
                self._disconnects += 1
            if role == "subscribe":
                self._confirmed = set()
                self._joined.notify_all()
        for client in {id(c): c for c in (self._clients[role], self._in_use.pop(role, None)) if c}.values():
            _close_client(client)
        if was_connected:
            log.warning("backplane %s connection to %s lost (%s); reconnecting with back-off",
                        role, redact(self.url), exc)
        else:
            log.debug("backplane %s connection to %s: %s", role, redact(self.url), exc)

    def _up(self, role: str, backoff: Backoff) -> None:
        backoff.reset()
        with self._lock:
            again = self._ever_connected[role]
            self._ever_connected[role] = self._connected[role] = True
            if again:
                self._reconnects += 1
        if again:
            log.info("backplane %s connection to %s restored", role, redact(self.url))

    def _publish_loop(self, backoff: Backoff) -> None:
        client = self._connect("publish")
        self._up("publish", backoff)
        outbound = self._outbound
        last_heard = self._clock()
        while True:
            try:
                first = outbound.get(timeout=_IDLE_PING / 2)
            except QueueEmpty:
                if self._stopping.is_set():
                    return
                if self._clock() - last_heard >= _IDLE_PING:
                    client.ping()   # an idle connection's loss shows in stats within a second or two
                    last_heard = self._clock()
                continue
            except QueueClosed:
                return
            batch = [first, *outbound.drain_nowait(_BATCH_BYTES, _BATCH_ITEMS)]
            try:
                self._send(client, batch)
            except BaseException:
                with self._lock:
                    self._unconfirmed += len(batch)
                raise
            with self._lock:
                self._sent += len(batch)
            last_heard = self._clock()

    def _send(self, client: Any, batch: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        publish = pipe.spublish if self.sharded else pipe.publish
        for envelope in batch:
            hub_name = envelope.split(b" ", 3)[2].decode()
            publish(self.channel(hub_name), envelope)
        pipe.execute()

    def _subscribe_loop(self, backoff: Backoff) -> None:
        client = self._connect("subscribe")
        pubsub = client.pubsub()
        cluster = client is not self._clients["subscribe"]
        try:
            with self._lock:
                self._unsubscribed = set(self._hubs)   # a new connection joins them all again
                self._confirmed = set()
            self._join_new_channels(pubsub)
            self._up("subscribe", backoff)
            while not self._stopping.is_set():
                self._join_new_channels(pubsub)
                if not cluster:
                    message = pubsub.get_message(timeout=_POLL)   # sharded messages too
                elif self._hubs:
                    # One connection per node, looked at in turn: a short wait on each.
                    message = pubsub.get_sharded_message(timeout=_CLUSTER_POLL)
                else:
                    self._stopping.wait(_POLL)
                    continue
                if message is None:
                    continue
                if message.get("type") in ("subscribe", "ssubscribe"):
                    with self._lock:
                        self._confirmed.add(_text(message["channel"]))
                        self._joined.notify_all()
                else:
                    self._receive(message)
        finally:
            if cluster:
                pubsub.disconnect()   # its per-node connections (close() leaves one open)
            pubsub.close()

    def _join_new_channels(self, pubsub: Any) -> None:
        with self._lock:
            channels, self._unsubscribed = sorted(self._unsubscribed), set()
        if channels:
            try:
                (pubsub.ssubscribe if self.sharded else pubsub.subscribe)(*channels)
            except BaseException:
                with self._lock:
                    self._unsubscribed.update(channels)
                raise

    def _receive(self, message: dict) -> None:
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        try:
            envelope = decode(data)
        except MalformedEnvelope as exc:
            self._count_malformed(exc)
            return
        if envelope.origin == self.origin:
            return   # ours: delivered locally when it was published
        channel = self.channel(envelope.channel)
        if _text(message.get("channel", b"")) != channel:
            self._count_malformed(MalformedEnvelope(f"hub {envelope.channel!r} on another channel"))
            return
        deliver, gap = self._tracker.check(envelope)
        with self._lock:
            hub = self._hubs.get(channel)
            if deliver and hub is not None:
                self._received += 1
        if hub is None:
            return
        if gap is not None:
            log.warning("backplane: %d message(s) from %s on hub %r never arrived",
                        gap.missing, gap.origin, envelope.channel)
            hub.gap_seen(gap)
        if deliver:
            hub.publish_local(envelope.payload)

    def _count_malformed(self, exc: MalformedEnvelope) -> None:
        with self._lock:
            self._malformed += 1
            first = self._malformed == 1
        (log.warning if first else log.debug)("backplane: dropped a message: %s", exc)


def _close_client(client: Any) -> None:
    client.close()
    # A cluster client's close() leaves the connections its commands used open.
    disconnect = getattr(client, "disconnect_connection_pools", None)
    if disconnect is not None:
        disconnect()


def _text(channel: bytes | str) -> str:
    return channel.decode() if isinstance(channel, bytes) else channel


def attach_backplane(server: Server) -> RedisBackplane | None:
    """The server's backplane, if ``Config.backplane`` names one (an Attachment:
    started when the server serves, closed last at shutdown)."""
    config = server.config
    if config.backplane is None:
        return None
    return RedisBackplane(config.backplane, sharded=config.backplane_sharded,
                          max_outbound_bytes=config.backplane_queue_bytes,
                          overflow=config.backplane_overflow,
                          clock=server.clock, on_fault=server.count_internal_error)


# Attached from here, so the core never imports the broadcast layer.
Server.attachments["backplane"] = attach_backplane
