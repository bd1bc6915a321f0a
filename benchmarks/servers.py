"""The servers the benchmark compares, each started as its own process.

Every server prints its port on the first line of stdout and echoes (or, for
``*-relay``, relays lines or WebSocket messages to every other connection) on
127.0.0.1 until killed.
Each is written the way its users write it, with its defaults: connserver with
its protections on (default Config: deadlines, limits, buffer pool, registry,
watchdog; only max_connections and the backlog raised, as for every server
here); stdlib's ThreadingTCPServer; asyncio with streams and with a Protocol;
the same Protocol on uvloop; gevent's StreamServer (green threads); and a C
epoll server as the machine's limit.

``ECHO`` is the list every echo, burst, paced and hold cell runs, in this
order; a new server is one more line there. ``connserver-parked`` is
``connserver-framed`` with ``Config(park=True)`` (issue 13): between messages
its connections wait in one epoll set served by a small pool of threads.
``HOSTILE`` are the framed-capable servers the hostile-peer cell measures, and
``CHAT`` connserver's chat app in both modes, for the idle-member memory cell.
``WS`` are the WebSocket echo servers (issue 14): connserver's ``ws-echo`` in
thread mode and parked, and the ``websockets`` library's sync and asyncio
servers, with the same limits; ``WS_RELAY`` connserver's WebSocket relay in
both modes, for the WebSocket fan-out cell.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
BACKLOG = 4096          # every server asks for the same listen backlog (the kernel caps it at somaxconn)


@dataclasses.dataclass(frozen=True)
class Server:
    """One server under test: a Python program (run with ``python -c``) or a C binary."""

    name: str
    program: str | None = None          # Python source
    binary: pathlib.Path | None = None  # built from ``binary.name + ".c"`` in this folder
    requires: str | None = None         # a module that must be importable (the ``bench`` extra)

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


def connserver_program(handler: str, options: str = "", module: str = "connserver.apps.echo") -> str:
    """connserver as a user runs it: default Config, only the limits a 10,000-connection test needs
    (``options`` are more ``Config`` keyword arguments, such as ``park=True``)."""
    return f"""
import connserver
from {module} import {handler}
config = connserver.Config(max_connections=30000, backlog={BACKLOG}{', ' + options if options else ''})
server = connserver.Server(("127.0.0.1", 0), {handler}, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


RELAY = f"""
import connserver

class Relay(connserver.LineHandler):
    \"\"\"Every line received goes to every other connection (a chat without nicknames).\"\"\"
    max_line = 65536

    def handle(self):
        self.hub = self.server.hub("relay", max_queue_bytes=256 * 1024)
        with self.hub.subscribe(self.conn):
            super().handle()

    def handle_line(self, line):
        self.hub.publish(line.encode() + b"\\n", exclude=self.conn)

config = connserver.Config(max_connections=30000, backlog={BACKLOG}, write_timeout=5.0)
server = connserver.Server(("127.0.0.1", 0), Relay, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

STDLIB = f"""
import socketserver

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)

class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = {BACKLOG}

server = Server(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

ASYNCIO_STREAMS = f"""
import asyncio

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog={BACKLOG})
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

ASYNCIO_PROTOCOL = f"""
import asyncio
{{loop_import}}

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog={BACKLOG})
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

{{run}}(main())
"""

GEVENT = f"""
from gevent.server import StreamServer

def echo(sock, address):
    while data := sock.recv(65536):
        sock.sendall(data)

server = StreamServer(("127.0.0.1", 0), echo, backlog={BACKLOG})
server.start()
print(server.server_port, flush=True)
server.serve_forever()
"""

CONNSERVER = Server("connserver", connserver_program("EchoHandler"))
STDLIB_THREADING = Server("stdlib-threading", STDLIB)
C_EPOLL = Server("c-epoll", binary=HERE / "epoll_echo")

# The echo peers, in the order the alternation runs them (and the tables list them). Every
# cell sends length-prefixed frames: a raw echo server returns them unchanged, a framed one
# (a message handler, the kind a parked mode would serve) parses each.
ECHO = [
    CONNSERVER,
    Server("connserver-framed", connserver_program("FramedEchoHandler")),
    Server("connserver-parked", connserver_program("FramedEchoHandler", "park=True")),
    STDLIB_THREADING,
    Server("asyncio-streams", ASYNCIO_STREAMS),
    Server("asyncio-protocol", ASYNCIO_PROTOCOL.format(loop_import="", run="asyncio.run")),
    Server("uvloop", ASYNCIO_PROTOCOL.format(loop_import="import uvloop", run="uvloop.run"),
           requires="uvloop"),
    Server("gevent", GEVENT, requires="gevent"),
    C_EPOLL,
]

# connserver with FIFO run slots (N=1,000 only), and the fan-out cells' server.
CONNSERVER_FAIR = Server("connserver-fair", connserver_program("EchoHandler", "max_running=4"))
CONNSERVER_RELAY = Server("connserver-relay", RELAY)

# The hostile-peer cell: the servers that can serve frames (the raw ones echo them unchanged).
HOSTILE = ("connserver-framed", "connserver-parked", "asyncio-streams", "uvloop")

# connserver's chat app (a LineHandler whose members are hub subscribers), thread per
# connection and parked, as ``connserver serve chat [--park]`` runs it.
CHAT = [
    Server("chat-thread", connserver_program("ChatHandler", module="connserver.apps.chat")),
    Server("chat-parked", connserver_program("ChatHandler", "park=True", module="connserver.apps.chat")),
]

BY_NAME = {server.name: server for server in ECHO + CHAT + [CONNSERVER_FAIR, CONNSERVER_RELAY]}

# ------------------------------------------------------------------ WebSocket (issue 14)
#
# The same limits on every WebSocket server: messages up to 1 MiB, no compression, and no
# keepalive pings (connserver's WebSocketHandler and both ``websockets`` servers ping every
# 20 s by default; a benchmark window is shorter, so pings are switched off on all of them:
# ``ping_interval = None`` / ``ping_interval=None``). permessage-deflate is declined by all:
# connserver's default (``compression = None``, set explicitly), ``compression=None`` for
# ``websockets``. The ``websockets`` sync server then runs two threads per connection (the
# handler and the reader; its keepalive thread only exists with pings).
WS_MAX_MESSAGE = 1 << 20


def connserver_ws_program(options: str = "") -> str:
    """connserver's ``ws-echo`` app (``WebSocketEchoHandler``), default Config but the limits."""
    return f"""
import connserver
from connserver.apps.ws_echo import WebSocketEchoHandler

class Echo(WebSocketEchoHandler):
    max_message_size = {WS_MAX_MESSAGE}
    ping_interval = None
    compression = None

config = connserver.Config(max_connections=30000, backlog={BACKLOG}{', ' + options if options else ''})
server = connserver.Server(("127.0.0.1", 0), Echo, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


WEBSOCKETS_SYNC = f"""
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

def echo(websocket):
    try:
        for message in websocket:
            websocket.send(message)
    except ConnectionClosed:
        pass

with serve(echo, "127.0.0.1", 0, max_size={WS_MAX_MESSAGE}, compression=None, ping_interval=None,
           backlog={BACKLOG}) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"""

WEBSOCKETS_ASYNCIO = f"""
import asyncio
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

async def echo(websocket):
    try:
        async for message in websocket:
            await websocket.send(message)
    except ConnectionClosed:
        pass

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size={WS_MAX_MESSAGE}, compression=None, ping_interval=None,
                     backlog={BACKLOG}) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

asyncio.run(main())
"""

# The WebSocket echo servers, in the order the alternation runs them (cells ``ws-echo``, ``ws-hold``).
WS = [
    Server("connserver-ws", connserver_ws_program(), requires="wsproto"),
    Server("connserver-ws-parked", connserver_ws_program("park=True"), requires="wsproto"),
    Server("websockets-sync", WEBSOCKETS_SYNC, requires="websockets"),
    Server("websockets-asyncio", WEBSOCKETS_ASYNCIO, requires="websockets"),
]


def connserver_ws_relay_program(options: str = "") -> str:
    """``RELAY`` over WebSocket (cell ``ws-fanout``): every connection is a hub subscriber once
    upgraded, and every message it sends goes to every other one as one frame, built once by
    ``message_frame()`` and shared by every subscriber's queue, as ws-chat broadcasts. The same
    hub queue bound and write timeout as ``RELAY``, the same limits as the ws-echo servers."""
    return f"""
import connserver
from connserver.protocols.websocket import message_frame

class Relay(connserver.WebSocketHandler):
    \"\"\"Every message received goes to every other connection.\"\"\"
    max_message_size = {WS_MAX_MESSAGE}
    ping_interval = None
    compression = None
    subscription = None

    def on_connect(self):
        hub = self.server.hub("ws-relay", max_queue_bytes=256 * 1024)
        self.subscription = hub.subscribe(self.conn)

    def handle_message(self, message):
        self.subscription.hub.publish(message_frame(message), exclude=self.subscription)

    def on_close(self, code, reason):
        if self.subscription is not None:
            self.subscription.mute()   # nothing after the close frame

config = connserver.Config(max_connections=30000, backlog={BACKLOG}, write_timeout=5.0{', ' + options if options else ''})
server = connserver.Server(("127.0.0.1", 0), Relay, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


# connserver's WebSocket relay in both modes (cell ``ws-fanout``), in the order it alternates them.
WS_RELAY = [
    Server("connserver-ws-relay", connserver_ws_relay_program(), requires="wsproto"),
    Server("connserver-ws-relay-parked", connserver_ws_relay_program("park=True"), requires="wsproto"),
]
BY_NAME.update({server.name: server for server in WS + WS_RELAY})
