"""What 1,000 idle connections cost: buffer-pool statistics and server RSS per connection.

Starts a server in a subprocess: ``connserver`` (the built-in EchoHandler),
``stdlib`` (a ``socketserver.ThreadingTCPServer`` echo, for comparison) or
``connserver-hub`` (a handler that echoes once, then stays subscribed to a Hub:
the price of an idle subscriber). Opens N connections to it and does one round
trip on each (64 bytes, or --message-size; every request is sent before any
reply is read, so the server handles them concurrently), then leaves them idle
and reads the server's RSS from ``/proc/<pid>/statm`` (resident pages × page
size). RSS per idle connection = (RSS with N idle connections − RSS after one
warm-up connection came and went) / N. For connserver it also reports the pool
statistics (hit rate = hits / (hits + misses)). Prints one JSON line; loopback
only; every wait is bounded.

    python benchmarks/pool_idle.py --server connserver --connections 1000
    python benchmarks/pool_idle.py --server stdlib --connections 1000
    python benchmarks/pool_idle.py --server connserver-hub --connections 1000
    python benchmarks/pool_idle.py --server stdlib --tracemalloc   # Python heap, not RSS
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

# Each server reads commands on stdin: "stats" prints one JSON line, EOF stops it.
# With --tracemalloc it also reports the bytes Python has allocated (traced_bytes).
PRELUDE = """\
import json, sys, tracemalloc
if "--tracemalloc" in sys.argv:
    tracemalloc.start()
def traced():
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
"""
SERVERS = {
    "connserver": PRELUDE + """\
import dataclasses
import connserver
from connserver.apps.echo import EchoHandler
server = connserver.Server(("127.0.0.1", 0), EchoHandler, connserver.Config(max_connections=20000))
server.start()
print(server.server_address[1], flush=True)
for line in sys.stdin:
    stats = server.stats()
    print(json.dumps({"pool": dataclasses.asdict(server.buffer_pool.statistics()),
                      "connections_active": stats.connections_active,
                      "leases_held": sum(c.leases for c in server.connections()),
                      "traced_bytes": traced()}), flush=True)
server.shutdown(grace=5.0)
""",
    # Each connection subscribed to a Hub (after its round trip), then idle.
    "connserver-hub": PRELUDE + """\
import dataclasses
import connserver
class Subscriber(connserver.Handler):
    def handle(self):
        data = self.conn.recv()
        self.conn.sendall(data)
        del data
        with self.server.hub("idle").subscribe(self.conn):
            while self.conn.recv():
                pass
server = connserver.Server(("127.0.0.1", 0), Subscriber, connserver.Config(max_connections=20000))
server.start()
print(server.server_address[1], flush=True)
for line in sys.stdin:
    stats = server.stats()
    hub = server.hub("idle")
    print(json.dumps({"pool": dataclasses.asdict(server.buffer_pool.statistics()),
                      "connections_active": stats.connections_active,
                      "subscribers": hub.statistics().subscribers,
                      "leases_held": sum(c.leases for c in server.connections()),
                      "traced_bytes": traced()}), flush=True)
server.shutdown(grace=5.0)
""",
    "stdlib": PRELUDE + """\
import socketserver, threading
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 1024
server = Server(("127.0.0.1", 0), Echo)
threading.Thread(target=server.serve_forever, name="accept").start()
print(server.server_address[1], flush=True)
for line in sys.stdin:
    print(json.dumps({"connections_active": threading.active_count() - 2,
                      "traced_bytes": traced()}), flush=True)
server.shutdown()
server.server_close()
""",
}

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SAFETY_TIMEOUT = 10.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError("no Threads: line")


def ask(server: subprocess.Popen) -> dict:
    server.stdin.write("stats\n")
    server.stdin.flush()
    return json.loads(server.stdout.readline())


def round_trip_all(socks: list[socket.socket], size: int) -> None:
    message = b"x" * size
    for sock in socks:
        sock.sendall(message)
    for sock in socks:
        received = 0
        while received < size:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed a connection")
            received += len(data)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=SERVERS, default="connserver")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--message-size", type=int, default=64,
                        help="bytes in each connection's one round trip (default 64)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also report the Python heap per idle connection (tracemalloc "
                             "in the server; it inflates RSS, so measure RSS without it)")
    args = parser.parse_args()

    command = [sys.executable, "-c", SERVERS[args.server]]
    if args.tracemalloc:
        command.append("--tracemalloc")
    server = subprocess.Popen(command,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        address = ("127.0.0.1", port)
        # Warm up: one connection's round trip loads every lazily imported path.
        with socket.create_connection(address, timeout=SAFETY_TIMEOUT) as warm:
            round_trip_all([warm], args.message_size)
        wait_until(lambda: ask(server)["connections_active"] == 0, "the warm-up connection to end")
        rss_before, threads_before = rss_bytes(server.pid), thread_count(server.pid)
        traced_before = ask(server)["traced_bytes"]

        started = time.monotonic()
        for _ in range(args.connections):
            socks.append(socket.create_connection(address, timeout=SAFETY_TIMEOUT))
        round_trip_all(socks, args.message_size)
        elapsed = time.monotonic() - started
        wait_until(lambda: ask(server)["connections_active"] == args.connections,
                   "every connection to be registered")
        if args.server == "connserver-hub":
            wait_until(lambda: ask(server)["subscribers"] == args.connections, "every subscription")
        rss_after, threads_after = rss_bytes(server.pid), thread_count(server.pid)
        report = ask(server)

        result = {
            "server": args.server,
            "connections": args.connections,
            "message_size": args.message_size,
            "connect_and_round_trip_seconds": round(elapsed, 3),
            "rss_before_kib": rss_before // 1024,
            "rss_idle_kib": rss_after // 1024,
            "rss_per_idle_connection_kib": round((rss_after - rss_before) / args.connections / 1024, 1),
            "threads_before": threads_before,
            "threads_idle": threads_after,
        }
        if traced_before is not None:
            result["python_heap_per_idle_connection_bytes"] = round(
                (report["traced_bytes"] - traced_before) / args.connections)
        pool = report.get("pool")
        if pool is not None:
            lookups = pool["hits"] + pool["misses"]
            result["pool"] = {
                "buffer_size": pool["buffer_size"],
                "hit_rate": round(pool["hits"] / lookups, 4) if lookups else None,
                "hits": pool["hits"], "misses": pool["misses"],
                "allocated": pool["allocated"], "free": pool["free"], "leased": pool["leased"],
                "dropped": pool["dropped"], "pinned": pool["pinned"],
                "leaks_detected": pool["leaks_detected"],
                "pool_memory_kib": pool["allocated"] * pool["buffer_size"] // 1024,
            }
            result["leases_held_by_idle_connections"] = report["leases_held"]
        print(json.dumps(result))
    finally:
        for sock in socks:
            sock.close()
        server.stdin.close()
        try:
            server.wait(timeout=SAFETY_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise


if __name__ == "__main__":
    main()
