"""Hub: broadcast fan-out that a slow subscriber cannot stall.

``publish()`` puts one ``bytes`` object on every subscriber's
:class:`~connserver.ByteBoundedQueue` (shared, never copied per subscriber)
and returns; it never blocks on a socket. A full queue is the subscriber's
problem, settled by its policy: ``disconnect`` (the default, like the
gorilla/websocket chat hub: a client that cannot keep up is dead or stuck; its
connection is cancelled with reason ``slow_consumer``), ``drop_oldest`` or
``drop_newest``. Memory is bounded by subscribers × ``max_queue_bytes``,
whatever the publish rate.

One writer thread per hub moves queued bytes to sockets with non-blocking
``sendmsg`` and waits on ``epoll`` for the sockets whose send buffer is full.
When a queue is full but its socket is not, the publisher sends what the socket
takes itself (still without waiting): a fast publisher must not make a healthy
subscriber look slow just because the writer thread was waiting for the GIL.
A subscriber therefore costs a queue, not a second thread: an idle subscriber
stays as cheap as an idle connection. A subscriber whose socket accepts
nothing for ``write_timeout`` is cancelled with reason ``write_deadline``.

While a connection is subscribed, its own writes (``conn.sendall``,
``conn.send_frame``) are queued on the same subscription, so they keep their
order with broadcasts and only the writer thread ever writes to the socket.

Over TLS the queue still holds the shared plaintext: the writer encrypts a
subscriber's messages when it flushes them (under the connection's TLS lock,
which keeps records in the order they were made) and keeps what the socket did
not take as that subscriber's pending ciphertext.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import socket
import threading
from typing import TYPE_CHECKING, Callable, Iterable

from ..core.deadline import Clock, monotonic
from ..core.faults import Faults
from ..errors import CloseReason, SlowConsumer
from .queues import ByteBoundedQueue, OverflowPolicy, QueueClosed
from ..core.server import Server
from ..core.threads import block_async_signals

if TYPE_CHECKING:
    from ..core.connection import Connection
    from .backplane import RedisBackplane
    from .sequence import Gap

__all__ = ["Hub", "Subscription", "HubStatistics"]

log = logging.getLogger("connserver.hub")

HUB_POLICIES = ("disconnect", "drop_oldest", "drop_newest")
_FLUSH_BYTES = 256 * 1024   # most bytes handed to one sendmsg


@dataclasses.dataclass(frozen=True)
class HubStatistics:
    subscribers: int
    published: int           # publish() calls
    queued: int              # messages put on subscriber queues
    dropped: int             # messages dropped by drop_oldest / drop_newest
    slow_consumers: int      # subscribers cancelled by the disconnect policy
    write_deadlines: int     # subscribers cancelled for a socket that took nothing
    queued_bytes: int        # bytes waiting in all queues now
    received: int = 0        # publish_local() calls: other processes' messages (backplane), local notices


class Subscription:
    """One connection's place in a hub; a context manager that always unsubscribes."""

    __slots__ = ("hub", "conn", "queue", "name", "lock", "active", "pending", "scheduled",
                 "blocked_since", "dead", "queued_bytes", "muted", "__weakref__")

    def __init__(self, hub: "Hub", conn: "Connection", queue: ByteBoundedQueue, name: str | None) -> None:
        self.hub = hub
        self.conn = conn
        self.queue = queue
        self.name = name
        self.lock = threading.Lock()   # held by the writer while it sends; by unsubscribe
        self.active = True
        self.dead = False              # cancelled: no more messages for it
        self.pending: list = []        # buffers taken from the queue, not yet fully sent
        self.scheduled = False         # in the writer's ready list, or blocked on the socket
        self.blocked_since: float | None = None
        self.queued_bytes = 0          # queued and not yet sent, as of the last change
        self.muted = False             # publish() passes it by; its own sends still go

    def mute(self) -> None:
        """Take no more broadcasts; what is queued and this connection's own writes
        still go out, in order. For a protocol that must send nothing after its last
        word (a WebSocket after its close frame) while the end is on its way."""
        self.muted = True

    def send(self, data: bytes) -> bool:
        """Queue a message for this subscriber only (in order with broadcasts)."""
        return self.hub._deliver((self,), data) == 1

    def close(self) -> list:
        """Unsubscribe (idempotent); returns the buffers queued but not yet sent.

        Over TLS these are plaintext not yet encrypted; ciphertext already made
        stays with the connection's TLS session, to go out before anything newer.
        """
        return self.hub._unsubscribe(self)

    def wake_writer(self) -> None:
        """TLS: the handler thread's reading made ciphertext (a key update, an alert);
        have the writer send it, behind what it holds."""
        self.hub._schedule(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.name or ''} conn=#{self.conn.id} queued={self.queue.bytes}>"


class Hub:
    """A set of subscribers and the one thread that writes to them."""

    def __init__(self, *, name: str = "hub", policy: OverflowPolicy = "disconnect",
                 max_queue_bytes: int = 1024 * 1024, max_queue_items: int = 4096,
                 write_timeout: float = 30.0, clock: Clock = monotonic,
                 on_fault: Callable[[str], None] | None = None,
                 backplane: "RedisBackplane | None" = None,
                 on_gap: "Callable[[Gap], None] | None" = None) -> None:
        if policy not in HUB_POLICIES:
            raise ValueError(f"hub policy must be one of {', '.join(HUB_POLICIES)} "
                             f"(publishing never blocks), not {policy!r}")
        if not hasattr(select, "epoll"):
            raise RuntimeError("Hub needs epoll (Linux)")
        self.name = name
        self.policy = policy
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_items = max_queue_items
        self.write_timeout = write_timeout
        self._clock = clock
        self.faults = Faults("hub", log, on_fault)
        self._lock = threading.Lock()
        self._subs: dict[int, Subscription] = {}      # id(sub) -> sub
        self._ready: list[Subscription] = []
        self._blocked: dict[int, Subscription] = {}   # fd -> sub waiting for EPOLLOUT
        self._sleeping = False
        self._closed = False
        self._epoll: select.epoll | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._published = self._queued = self._dropped = 0
        self._slow = self._write_deadlines = 0
        self._received = 0   # delivered by publish_local: other processes' messages, local notices
        self.on_gap = on_gap
        self.backplane = backplane
        if backplane is not None:
            backplane.attach(self)

    # --- subscribing -------------------------------------------------------------

    def subscribe(self, conn: "Connection", *, policy: OverflowPolicy | None = None,
                  max_queue_bytes: int | None = None, name: str | None = None) -> Subscription:
        """Subscribe ``conn``; unsubscribed when the block exits or the connection ends."""
        policy = policy or self.policy
        if policy not in HUB_POLICIES:
            raise ValueError(f"hub policy must be one of {', '.join(HUB_POLICIES)}, not {policy!r}")
        queue = ByteBoundedQueue(self.max_queue_items, max_queue_bytes or self.max_queue_bytes,
                                 policy="disconnect" if policy == "disconnect" else policy)
        sub = Subscription(self, conn, queue, name)
        with self._lock:
            if self._closed:
                raise QueueClosed("hub is closed")
            conn.attach_write_sink(sub)   # ValueError if it already has one
            self._start_writer()
            self._subs[id(sub)] = sub
        return sub

    def _unsubscribe(self, sub: Subscription) -> list:
        with sub.lock:   # waits for the writer to finish a send on this socket
            if not sub.active:
                return []
            sub.active = False
            unsent, sub.pending = sub.pending, []
            # TLS ciphertext goes back to the session, to stay first in the stream.
            unsent = sub.conn.take_back_unsent(unsent)
            with self._lock:
                self._subs.pop(id(sub), None)
                fd = sub.conn.fileno()
                if self._blocked.get(fd) is sub:
                    del self._blocked[fd]
                    self._unregister(fd)
                sub.conn.detach_write_sink(sub)
        sub.queue.close()
        unsent.extend(sub.queue.drain_nowait(sub.queue.max_bytes, sub.queue.max_items))
        sub.queued_bytes = 0
        with self._lock:
            self._dropped += sub.queue.statistics().dropped
        return unsent

    def subscribers(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    # --- publishing ----------------------------------------------------------------

    def publish(self, message: bytes, exclude: "Subscription | Connection | None" = None) -> int:
        """Queue ``message`` for every subscriber but ``exclude``; return how many took it.

        Never blocks on a subscriber and never copies the message. With a backplane,
        the message also goes to this hub's namesakes in every other process (queued
        for Redis; the count returned is this process's).
        """
        with self._lock:
            self._published += 1
            targets = [sub for sub in self._subs.values()
                       if sub is not exclude and sub.conn is not exclude]
        if self.backplane is not None:
            self.backplane.publish(self.name, message)
        return self._deliver(targets, message, broadcast=True)

    def publish_local(self, message: bytes) -> int:
        """Queue ``message`` for this process's subscribers only (the backplane's
        deliveries from other processes; a notice about this process's room)."""
        with self._lock:
            self._received += 1
            targets = list(self._subs.values())
        return self._deliver(targets, message, broadcast=True)

    def gap_seen(self, gap: "Gap") -> None:
        """The backplane found messages from another process missing: tell ``on_gap``
        (called on the backplane's thread: it must not block)."""
        if self.on_gap is not None:
            try:
                self.on_gap(gap)
            except Exception as exc:
                self.faults.record(exc, "on_gap")

    def _deliver(self, targets: Iterable[Subscription], message: bytes, broadcast: bool = False) -> int:
        taken: list[Subscription] = []
        size = len(message)
        for sub in targets:
            if sub.dead or not sub.active or (broadcast and sub.muted):
                continue
            if sub.blocked_since is None and not sub.queue.has_room(size):
                # Full, but its socket was not: the writer thread is behind (it waits
                # for the GIL a tight publishing loop holds), not the client. Send what
                # the socket takes now, without waiting, before judging the client.
                self._flush(sub)
            try:
                if sub.queue.put_nowait(message):   # False: dropped by the sub's policy
                    taken.append(sub)
            except SlowConsumer:
                self._slow_consumer(sub)
            except QueueClosed:
                continue
        if not taken:
            return 0
        with self._lock:
            self._queued += len(taken)
            wake = self._schedule_locked(taken)
        if wake:
            self._wake()
        return len(taken)

    def _schedule(self, sub: Subscription) -> None:
        """Have the writer flush ``sub`` (unless it is already due to)."""
        with self._lock:
            wake = sub.active and not sub.dead and self._schedule_locked((sub,))
        if wake:
            self._wake()

    def _schedule_locked(self, subs: Iterable[Subscription]) -> bool:
        """Put ``subs`` on the ready list (hub lock held); return whether to wake the writer."""
        for sub in subs:
            sub.queued_bytes = sub.queue.bytes
            if not sub.scheduled:
                sub.scheduled = True
                self._ready.append(sub)
        if self._sleeping:
            self._sleeping = False
            return True
        return False

    def _slow_consumer(self, sub: Subscription) -> None:
        with self._lock:
            if sub.dead:
                return
            sub.dead = True
            self._slow += 1
        log.info("#%d %s slow consumer: %d bytes queued; disconnecting", sub.conn.id,
                 sub.conn.peer_label, sub.queue.bytes)
        sub.conn.cancel_token.cancel(CloseReason.SLOW_CONSUMER)

    # --- the writer thread ---------------------------------------------------------

    def _start_writer(self) -> None:
        if self._thread is not None:
            return
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=f"connserver-hub-{self.name}")
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0", socket.MSG_DONTWAIT)   # type: ignore[union-attr]
        except (BlockingIOError, OSError):
            pass   # a wake-up byte is already waiting

    def _run(self) -> None:
        assert self._epoll is not None and self._wake_r is not None
        block_async_signals()
        wake_fd = self._wake_r.fileno()
        while True:
            with self._lock:
                if self._closed:
                    return
                ready, self._ready = self._ready, []
            for sub in ready:
                try:
                    self._flush(sub)
                except Exception as exc:   # one subscriber's failure ends it, not the writer
                    self.faults.record(exc, f"writing to #{sub.conn.id}")
                    sub.dead = True
                    with self._lock:
                        sub.scheduled = False
                    sub.conn.cancel_token.cancel(CloseReason.ERROR)
            with self._lock:
                if self._closed:
                    return
                if self._ready:
                    continue
                self._sleeping = True
                timeout = self._next_expiry_timeout()
            # (epoll refuses timeouts past ~24 days: never wait longer than an hour at once)
            events = self._epoll.poll(-1 if timeout is None else min(timeout, 3600.0))
            with self._lock:
                self._sleeping = False
                for fd, _ in events:
                    if fd == wake_fd:
                        continue
                    sub = self._blocked.pop(fd, None)
                    if sub is not None:
                        self._unregister(fd)
                        sub.blocked_since = None
                        self._ready.append(sub)
                expired = self._pop_expired()
            if any(fd == wake_fd for fd, _ in events):
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            for sub in expired:
                log.info("#%d %s took nothing for %.1f s; disconnecting", sub.conn.id,
                         sub.conn.peer_label, self.write_timeout)
                try:
                    sub.conn.cancel_token.cancel(CloseReason.WRITE_DEADLINE)
                except Exception as exc:
                    self.faults.record(exc, f"cancelling #{sub.conn.id}")

    def _flush(self, sub: Subscription) -> None:
        """Send what the subscriber has queued until done or its socket is full.

        Through the connection's non-blocking calls: over TLS, what goes on the wire
        is encrypted here, per subscriber, while the queue holds the shared plaintext.
        """
        with sub.lock:
            if not sub.active or sub.dead:
                with self._lock:
                    sub.scheduled = False
                return
            conn = sub.conn
            while True:
                if not sub.pending:
                    try:
                        sub.pending = conn.wire_bytes(sub.queue.drain_nowait(_FLUSH_BYTES))
                    except OSError as exc:   # ssl.SSLError: the session has failed
                        self._write_failed(sub, exc)
                        return
                    if not sub.pending:
                        with self._lock:
                            if len(sub.queue) or conn.wire_output_waiting():
                                continue
                            sub.scheduled = False
                            sub.queued_bytes = 0
                        return
                try:
                    if conn.send_nowait(sub.pending):
                        continue
                except OSError as exc:
                    self._write_failed(sub, exc)
                    return
                # The socket's send buffer is full: wait for EPOLLOUT.
                with self._lock:
                    fd = conn.fileno()
                    self._blocked[fd] = sub
                    if sub.blocked_since is None:
                        sub.blocked_since = self._clock()
                    sub.queued_bytes = sub.queue.bytes + sum(len(b) for b in sub.pending)
                    try:
                        self._epoll.register(fd, select.EPOLLOUT)   # type: ignore[union-attr]
                    except FileExistsError:
                        pass
                return

    def _write_failed(self, sub: Subscription, exc: OSError) -> None:
        """The peer is gone (its handler will see it too): stop writing to it."""
        log.debug("#%d %s hub write failed: %s", sub.conn.id, sub.conn.peer_label, exc)
        sub.dead = True
        sub.pending = []
        with self._lock:
            sub.scheduled = False
        sub.conn.cancel_token.cancel(CloseReason.RESET)

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)   # type: ignore[union-attr]
        except (OSError, ValueError):
            pass

    def _next_expiry_timeout(self) -> float | None:
        times = [sub.blocked_since for sub in self._blocked.values() if sub.blocked_since is not None]
        if not times:
            return None
        return max(0.0, min(times) + self.write_timeout - self._clock())

    def _pop_expired(self) -> list[Subscription]:
        now = self._clock()
        expired = [sub for sub in self._blocked.values()
                   if sub.blocked_since is not None and now - sub.blocked_since >= self.write_timeout
                   and not sub.dead]
        for sub in expired:
            sub.dead = True
            self._write_deadlines += 1
        return expired

    # --- closing ---------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the writer thread and drop every queue; False if it did not stop in time."""
        with self._lock:
            if self._closed:
                return self._thread is None or not self._thread.is_alive()
            self._closed = True
            subs = list(self._subs.values())
        if self.backplane is not None:
            self.backplane.detach(self)
        for sub in subs:
            sub.close()
        if self._thread is None:
            return True
        self._wake()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self._epoll.close()   # type: ignore[union-attr]
            self._wake_r.close()  # type: ignore[union-attr]
            self._wake_w.close()  # type: ignore[union-attr]
        return stopped

    def statistics(self) -> HubStatistics:
        with self._lock:
            subs = list(self._subs.values())
            stats = (self._published, self._queued, self._dropped, self._slow, self._write_deadlines,
                     self._received)
        return HubStatistics(subscribers=len(subs), published=stats[0], queued=stats[1],
                             dropped=stats[2] + sum(s.queue.statistics().dropped for s in subs),
                             slow_consumers=stats[3], write_deadlines=stats[4],
                             queued_bytes=sum(s.queue.bytes for s in subs), received=stats[5])


# Server.hub(name) makes hubs with this factory; registered here so the core never
# imports the broadcast layer.
Server.resource_factories["hub"] = Hub
