"""The servers the benchmark compares, each started as its own process.

Every server prints its port on the first line of stdout and echoes (or, for
``*-relay``, relays lines to every other connection) on 127.0.0.1 until killed.
connserver runs as a user would run it: default Config (deadlines, limits,
buffer pool, registry, watchdog all on), only max_connections raised.
"""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent

CONNSERVER = """
import connserver
from connserver.apps.echo import {handler}
config = connserver.Config(max_connections=30000, backlog=4096{options})
server = connserver.Server(("127.0.0.1", 0), {handler}, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

RELAY = """
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

config = connserver.Config(max_connections=30000, backlog=4096, write_timeout=5.0)
server = connserver.Server(("127.0.0.1", 0), Relay, config)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

STDLIB = """
import socketserver

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)

class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096

server = Server(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

ASYNCIO_STREAMS = """
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
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

ASYNCIO_PROTOCOL = """
import asyncio

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

PYTHON_SERVERS = {
    "connserver": CONNSERVER.format(handler="EchoHandler", options=""),
    # The same with FIFO run slots (Config.max_running): fairness under load.
    "connserver-fair": CONNSERVER.format(handler="EchoHandler", options=", max_running=4"),
    "connserver-framed": CONNSERVER.format(handler="FramedEchoHandler", options=""),
    "connserver-relay": RELAY,
    "stdlib-threading": STDLIB,
    "asyncio-streams": ASYNCIO_STREAMS,
    "asyncio-protocol": ASYNCIO_PROTOCOL,
}
C_SERVERS = {"c-epoll": HERE / "epoll_echo"}
