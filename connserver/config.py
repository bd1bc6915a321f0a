"""Server configuration: one frozen dataclass, validated when it is built.

Every field is declared once, below, with its type, default, bounds and help
text in the field metadata. The CLI flags (``--idle-timeout``), the TOML keys
(``idle_timeout``) and the reference docs are all generated from these
declarations, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from typing import Any, Iterator, Mapping

from .errors import ConfigError

__all__ = ["Config", "config_fields", "FieldSpec", "parse_address", "MAX_TIMEOUT",
           "MAX_LIFETIME", "MAX_BACKLOG", "MAX_THREAD_STACK_SIZE", "MIN_RATE"]

_DAY = 86400.0

#: The longest any ``*_timeout`` may be: one week. Each timeout ends up in a system
#: call or a lock wait, and each of those has a ceiling: poll(2) takes an int of
#: milliseconds (24.8 days; TLS reads wait in it), ``threading`` waits stop at
#: ``threading.TIMEOUT_MAX`` (292 years), a kernel timeval at 2**63 s. A value past
#: one of them does not mean "wait longer": it raises OverflowError in whatever
#: thread first uses it. A week is far inside every ceiling, and a wait longer
#: than that is not a timeout any more.
MAX_TIMEOUT = 7 * _DAY
#: The longest ``max_lifetime``: a year. It only goes to the watchdog's wait
#: (``threading.TIMEOUT_MAX``), and "none" is there for no limit at all.
MAX_LIFETIME = 365 * _DAY
#: The largest listen backlog: 65,535, far above any kernel's default
#: net.core.somaxconn (4,096 since Linux 5.4), which caps the backlog anyway.
#: listen() takes a C int, so a much larger value would overflow there.
MAX_BACKLOG = 65535
#: The largest handler thread stack: 256 MiB, 32 times the usual default. Larger
#: ones are accepted by ``threading.stack_size()`` but then fail at every thread
#: start once they no longer fit in memory, so the server would refuse every
#: connection.
MAX_THREAD_STACK_SIZE = 256 * 1024 * 1024
#: The slowest rate: one token per 100,000 s (27.8 hours). With the burst, it
#: bounds how long a connection can wait for tokens (``burst / rate``, kept within
#: ``MAX_TIMEOUT``); a tinier rate would make that wait overflow a lock's timeout.
MIN_RATE = 1e-5
_BACKPLANE_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """How one config field is validated and presented."""

    help: str
    kind: type                      # float, int, bool or str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # e.g. timeouts must be > 0
    choices: tuple[str, ...] | None = None
    nullable: bool = False           # None is allowed and means "no limit"
    aliases: tuple[str, ...] = ()    # extra command-line flags, e.g. ("--admin",)
    metavar: str | None = None       # how the CLI help names the value
    unit: str = ""                   # "s" or "bytes": how bounds are shown

    def quantity(self, value: float) -> str:
        """``value`` in this field's unit, readably: ``604,800 s (7 days)``, ``65,535``."""
        text = _number(value)
        if self.unit:
            text += " " + self.unit
        if self.unit == "s" and value >= _DAY and value % _DAY == 0:
            text += f" ({value / _DAY:g} days)"
        elif self.unit == "bytes" and value >= 1 << 20 and value % (1 << 20) == 0:
            text += f" ({value / (1 << 20):g} MiB)"
        return text


def _field(default: Any, help: str, kind: type, **spec: Any) -> Any:
    return dataclasses.field(default=default, metadata={"spec": FieldSpec(help, kind, **spec)})


def _timeout(default: float | None, help: str, nullable: bool = False,
             maximum: float = MAX_TIMEOUT) -> Any:
    return _field(default, help, float, minimum=0.0, exclusive_minimum=True, maximum=maximum,
                  nullable=nullable, unit="s")


def _rate(help: str) -> Any:
    return _field(None, help, float, minimum=MIN_RATE, nullable=True)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a :class:`~connserver.Server` can be told. Times are float seconds."""

    # --- deadlines -------------------------------------------------------
    idle_timeout: float = _timeout(
        300.0, "Seconds to wait for the first byte of the next message before closing (idle).")
    read_timeout: float = _timeout(
        30.0, "Seconds to receive a whole message once its first byte arrived; an absolute "
        "deadline, so a peer trickling bytes cannot stretch it (read_deadline).")
    write_timeout: float = _timeout(
        30.0, "Seconds for one write (a sendall or a frame) to be taken by the peer (write_deadline).")
    handshake_timeout: float = _timeout(
        10.0, "Seconds for connection set-up (PROXY header, TLS handshake) to complete.")
    max_lifetime: float | None = _timeout(
        None, "Close a connection after this many seconds, whatever it is doing (lifetime); "
        "none by default, as long-lived connections are the point.", nullable=True,
        maximum=MAX_LIFETIME)
    lifetime_jitter: float = _field(
        0.1, "Fraction of max_lifetime by which each connection's lifetime is randomly "
        "shortened, so connections opened together do not all recycle together.",
        float, minimum=0.0, maximum=0.5)
    stuck_thread_timeout: float = _timeout(
        10.0, "Seconds a cancelled connection's handler may take to end before its thread "
        "is reported as stuck (logged with its stack, counted in stats).")
    graceful_timeout: float = _timeout(
        30.0, "Seconds a shutdown waits for connections to finish after cancelling them, "
        "before forcing their sockets shut.")
    drain_delay: float = _field(
        0.0, "Seconds between SIGTERM and the drain, while the server still accepts but "
        "/healthz already answers 503: a load balancer's health checks take the instance out "
        "of rotation before it refuses anyone (set it above the balancer's check interval × "
        "fall count). A second signal cuts it short. Daemon only.", float, minimum=0.0,
        maximum=MAX_TIMEOUT, unit="s")
    linger_timeout: float = _timeout(
        5.0, "Seconds a close may wait for the peer to take what was sent: the write side "
        "is shut, input is read and discarded until the peer's end of stream, then the "
        "socket is closed. Without it, closing with unread input sends a reset and the "
        "kernel drops replies not yet delivered. A shutdown's drain bounds it too.")

    # --- limits ----------------------------------------------------------
    max_connections: int = _field(
        10_000, "Maximum concurrent connections (and so handler threads).", int, minimum=1)
    max_connections_per_ip: int | None = _field(
        None, "Maximum concurrent connections from one peer address; none by default, "
        "since many users can share one address behind NAT.", int, minimum=1, nullable=True)
    on_limit: str = _field(
        "reject", "What to do at max_connections: 'reject' closes new connections at once "
        "(counted as limit); 'wait' stops accepting until a slot frees, leaving clients "
        "in the listen backlog.", str, choices=("reject", "wait"))
    max_running: int | None = _field(
        None, "Most handler threads that run Python at once while more connections than "
        "this are open; the others wait their turn in arrival order (FIFO), without CPU. "
        "Keeps latency fair and bounded when many connections are busy at once, at some "
        "cost in throughput (see docs/benchmarks.md); none by default.", int, minimum=1,
        nullable=True)
    park: bool = _field(
        False, "Serve message handlers (FramedHandler, LineHandler) parked: between messages "
        "a connection waits in the server's epoll with no thread; a small pool "
        "(park_threads) reads, runs the handler per message and parks it again; PROXY "
        "headers and TLS handshakes are parked too. Connections that cannot be parked "
        "(handlers overriding handle(), max_running) run in thread mode; the server logs "
        "why.", bool)
    park_threads: int = _field(
        2, "Threads serving parked connections (with park).", int, minimum=1, maximum=256)
    max_write_buffer: int = _field(
        1024 * 1024, "Most bytes of replies a parked connection may have waiting for its peer "
        "to take them; past it the peer is a slow consumer (closed as slow_consumer).",
        int, minimum=1024, maximum=1024 * 1024 * 1024)
    backlog: int = _field(
        1024, "Listen backlog (the kernel caps it at net.core.somaxconn).", int, minimum=1,
        maximum=MAX_BACKLOG)

    # --- threads and sockets ---------------------------------------------
    thread_stack_size: int = _field(
        0, "Stack size in bytes for handler threads; 0 keeps the interpreter's default. "
        "Otherwise at least 32768.", int, minimum=0, maximum=MAX_THREAD_STACK_SIZE,
        unit="bytes")
    min_spare_threads: int = _field(
        8, "Handler threads kept started and waiting ahead of demand, so a new connection "
        "is handed to a running thread at once instead of waiting for one to start.",
        int, minimum=0)
    max_spare_threads: int = _field(
        64, "Handler threads kept waiting for the next connection after theirs ends, so "
        "that churn does not pay for a thread start per connection.", int, minimum=0)
    spare_thread_timeout: float = _timeout(
        10.0, "Seconds a spare handler thread waits for a connection before it exits.")
    tcp_keepalive: bool = _field(
        True, "Enable TCP keepalive probes, so peers that vanished are eventually noticed "
        "by the kernel even while a handler waits without a deadline.", bool)
    tcp_nodelay: bool = _field(
        True, "Disable Nagle's algorithm, so small replies are sent at once.", bool)

    # --- rate limits -----------------------------------------------------
    rate: float | None = _rate(
        "Per-connection rate limit: messages per second for framed and line handlers, "
        "bytes per second for raw recv(); none by default.")
    burst: float | None = _field(
        None, "How far a connection may run ahead of its rate (tokens saved up); default "
        f"one second's worth of the rate. At most rate × {MAX_TIMEOUT:,.0f}: burst / rate "
        "is the longest a connection can wait for tokens, and it is held to one week like "
        "a timeout.", float, minimum=1.0, nullable=True)
    ip_rate: float | None = _rate(
        "Rate limit shared by all connections from one peer address (same units as "
        "rate, burst one second's worth); none by default.")
    server_rate: float | None = _rate(
        "Rate limit shared by every connection of the server (same units as rate, "
        "burst one second's worth); none by default.")
    on_rate_limit: str = _field(
        "wait", "Over a rate limit: 'wait' stops reading until tokens are back, so TCP "
        "pushes back on the client; 'close' ends the connection (rate_limited).",
        str, choices=("wait", "close"))

    # --- WebSocket (WebSocketHandler apps: ws-echo, ws-chat, yours) ---------
    websocket_ping_interval: float | None = _field(
        None, "Seconds between keepalive pings on each WebSocket; 0: no pings. Unset: the "
        "handler class's ping_interval (20 s for the built-in apps). Keep it under any proxy's "
        "idle timeout.", float, minimum=0.0, maximum=MAX_TIMEOUT, nullable=True, unit="s")
    websocket_ping_timeout: float | None = _field(
        None, "Seconds a WebSocket peer has to answer a ping before the connection ends with "
        "close code 1011 (keepalive_timeout). Unset: the handler class's ping_timeout (20 s).",
        float, minimum=0.0, exclusive_minimum=True, maximum=MAX_TIMEOUT, nullable=True, unit="s")
    websocket_compression: str = _field(
        "default", "permessage-deflate on WebSockets: deflate (accepted when the client offers "
        "it; inflation bounded by the message size limit), off, or default: the handler "
        "class's compression (off for the built-in apps).", str,
        choices=("default", "off", "deflate"))

    # --- broadcast ----------------------------------------------------------
    backplane: str | None = _field(
        None, "redis://HOST:PORT/DB (or rediss://, unix://) of a Redis that joins this "
        "process's hubs to every other process's of the same name: one chat room across "
        "workers and machines; at-most-once delivery, losses counted (needs connserver[redis]). "
        "None: hubs are per process.", str, nullable=True, metavar="URL")
    backplane_queue_bytes: int = _field(
        8 * 1024 * 1024, "Most bytes of messages waiting to be published to Redis (while it is "
        "slow or away); past it, backplane_overflow decides. Counted as outbound_dropped.", int,
        minimum=1024, unit="bytes")
    backplane_overflow: str = _field(
        "drop_oldest", "What a full backplane queue drops: drop_oldest (the room hears the "
        "latest, as a live feed wants) or drop_newest (what was said first goes out first).",
        str, choices=("drop_oldest", "drop_newest"))
    backplane_sharded: bool = _field(
        False, "Use sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7) on the backplane: with a "
        "Redis Cluster (any node's URL), each hub's messages stay on the node owning its "
        "channel.", bool)

    # --- administration ---------------------------------------------------
    admin_address: str | None = _field(
        None, "HOST:PORT (or PORT, meaning 127.0.0.1:PORT) for the admin HTTP endpoint: "
        "/healthz, /stats, /connections, /metrics, /debug/threads, /debug/memory. Off by "
        "default; bind it to loopback unless you mean to expose it.", str, nullable=True,
        aliases=("--admin",), metavar="HOST:PORT")

    # --- PROXY protocol and TLS ---------------------------------------------
    proxy_protocol: bool = _field(
        False, "Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy / "
        "send-proxy-v2 send) before anything else; the handler then sees the client's real "
        "address. Requires trusted_proxy.", bool)
    trusted_proxy: tuple[str, ...] = _field(
        (), "Addresses (CIDR) allowed to send PROXY headers; any other peer is closed "
        "(protocol_error). Repeat the flag for several.", tuple, metavar="CIDR")
    tls_cert: str | None = _field(
        None, "PEM certificate chain file: serve TLS (the handshake runs on the connection's "
        "own thread, under handshake_timeout).", str, nullable=True, metavar="FILE")
    tls_key: str | None = _field(
        None, "PEM private key file for tls_cert (may be omitted if the cert file holds it).",
        str, nullable=True, metavar="FILE")
    tls_client_ca: str | None = _field(
        None, "PEM CA file: require and verify client certificates (mutual TLS).",
        str, nullable=True, metavar="FILE")
    tls_min_version: str = _field(
        "1.2", "Lowest TLS version accepted.", str, choices=("1.2", "1.3"))

    # --- framing ---------------------------------------------------------
    max_frame_size: int = _field(
        1024 * 1024, "Largest frame (or line) accepted from a peer, in bytes; a larger "
        "announced length closes the connection at once (frame_too_large), before any of "
        "it is read.", int, minimum=1, unit="bytes")

    # --- buffers ---------------------------------------------------------
    buffer_size: int = _field(
        65536, "Size in bytes of each pooled receive buffer (the most one recv() returns).",
        int, minimum=1024, maximum=16 * 1024 * 1024, unit="bytes")
    pool_max_free: int = _field(
        64, "Most idle buffers the pool keeps; buffers returned beyond it are dropped, so a "
        "burst does not leave its memory pinned.", int, minimum=0)

    def __post_init__(self) -> None:
        for name, spec in _specs():
            if spec.kind is tuple and isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
            _check(name, spec, getattr(self, name))
        for network in self.trusted_proxy:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError("trusted_proxy", f"{network!r} is not an address or CIDR") from None
        if self.proxy_protocol and not self.trusted_proxy:
            raise ConfigError("trusted_proxy", "proxy_protocol needs at least one trusted_proxy "
                              "(never accept client addresses from just anyone)")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(name, f"no such file: {path!r}")
        if self.tls_cert is None and (self.tls_key or self.tls_client_ca):
            raise ConfigError("tls_cert", "tls_key and tls_client_ca need tls_cert")
        if self.admin_address is not None:
            parse_address(self.admin_address, "admin_address", default_host="127.0.0.1")
        if self.backplane is not None and not self.backplane.startswith(_BACKPLANE_SCHEMES):
            raise ConfigError("backplane", f"{self.backplane!r}: expected a redis://, rediss:// "
                              "or unix:// URL")
        if self.max_spare_threads < self.min_spare_threads:
            raise ConfigError("max_spare_threads", "must not be less than min_spare_threads")
        if self.thread_stack_size and self.thread_stack_size < 32768:
            raise ConfigError("thread_stack_size", "must be 0 (default) or at least 32768")
        if self.rate is not None and self.burst is not None and self.burst / self.rate > MAX_TIMEOUT:
            raise ConfigError("burst", f"must be at most rate × {MAX_TIMEOUT:,.0f}: burst / rate "
                              f"(here {self.burst / self.rate:,.0f} s) is the longest a connection "
                              "can wait for tokens, and every wait is held to one week")

    # --- building ----------------------------------------------------------

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (and validated)."""
        unknown = set(changes) - {name for name, _ in _specs()}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(name, "unknown setting")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: "Config | None" = None) -> "Config":
        """Build from a mapping such as a parsed TOML table; unknown keys are errors.

        Keys may use dashes or underscores (``idle-timeout`` or ``idle_timeout``).
        """
        changes = {str(key).replace("-", "_"): value for key, value in values.items()}
        return (base or cls()).replace(**changes)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, base: "Config | None" = None) -> "Config":
        """Load a TOML file; settings may sit at the top level or in a ``[server]`` table."""
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError("config", f"cannot read {os.fspath(path)!r}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{os.fspath(path)!r} is not valid TOML: {exc}") from exc
        if isinstance(data.get("server"), dict):
            data = {**{k: v for k, v in data.items() if k != "server"}, **data["server"]}
        return cls.from_mapping(data, base=base)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_address(text: str, field: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (or ``PORT`` with a default host) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep and default_host is not None:
        host, port = default_host, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "[" in host or "]" in host:
        host = ""   # unbalanced brackets: no such host, whatever a resolver would try
    # isascii(): str.isdigit() also accepts digits such as "²" that int() refuses.
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(field, f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
    return host, int(port)


def _specs() -> Iterator[tuple[str, FieldSpec]]:
    for field in dataclasses.fields(Config):
        yield field.name, field.metadata["spec"]


def config_fields() -> list[tuple[dataclasses.Field, FieldSpec]]:
    """Each field with its spec, in declaration order (for the CLI and docs)."""
    return [(field, field.metadata["spec"]) for field in dataclasses.fields(Config)]


def _check(name: str, spec: FieldSpec, value: Any) -> None:
    if value is None:
        if not spec.nullable:
            raise ConfigError(name, "must be set (None is not allowed here)")
        return
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, not {value!r}")
        return
    if spec.kind is tuple:
        if not isinstance(value, tuple) or not all(isinstance(item, str) for item in value):
            raise ConfigError(name, f"must be a list of strings, not {value!r}")
        return
    if spec.kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, not {value!r}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(name, f"must be one of {', '.join(spec.choices)}; got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, not {value!r}")
    if spec.kind is int and not isinstance(value, int):
        raise ConfigError(name, f"must be a whole number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be finite, not {value!r}")
    if spec.minimum is not None:
        if spec.exclusive_minimum and value <= spec.minimum:
            raise ConfigError(name, f"must be greater than {spec.quantity(spec.minimum)}; "
                              f"got {value!r}")
        if value < spec.minimum:
            raise ConfigError(name, f"must be at least {spec.quantity(spec.minimum)}; got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(name, f"must be at most {spec.quantity(spec.maximum)}; got {value!r}")


def _number(value: float) -> str:
    """``604,800`` for whole numbers from 1,000 up, ``0.5`` or ``1e-05`` otherwise."""
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:g}"
