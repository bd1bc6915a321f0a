"""How long a new connection waits for its first reply while N others are busy.

Starts a server in a subprocess pinned to CPU 0 (``connserver`` echo, or stdlib
``socketserver.ThreadingTCPServer`` for comparison), drives N echo connections
from this process pinned to CPU 1 (each with one 64-byte request outstanding),
and every PROBE_INTERVAL opens a fresh connection and times connect → first
echoed byte. Prints one JSON line. Loopback only; bounded by --duration.

    python benchmarks/accept_under_load.py --server connserver --connections 1000
    python benchmarks/accept_under_load.py --server stdlib --connections 1000
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time

SERVERS = {
    "connserver": "import connserver, sys\n"
                  "from connserver.apps.echo import EchoHandler\n"
                  "s = connserver.Server(('127.0.0.1', 0), EchoHandler, connserver.Config(max_connections=20000))\n"
                  "print(s.server_address[1], flush=True)\n"
                  "s.serve_forever()\n",
    "stdlib": "import socketserver, sys\n"
              "class H(socketserver.BaseRequestHandler):\n"
              "    def handle(self):\n"
              "        while d := self.request.recv(65536):\n"
              "            self.request.sendall(d)\n"
              "class S(socketserver.ThreadingTCPServer):\n"
              "    daemon_threads = True\n"
              "    request_queue_size = 1024\n"
              "s = S(('127.0.0.1', 0), H)\n"
              "print(s.server_address[1], flush=True)\n"
              "s.serve_forever()\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=SERVERS, default="connserver")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--probe-interval", type=float, default=0.25)
    args = parser.parse_args()

    os.sched_setaffinity(0, {1})
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", SERVERS[args.server]],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        result = drive(port, args)
        result["server"] = args.server
        print(json.dumps(result))
    finally:
        server.kill()
        server.wait(10)


def drive(port: int, args: argparse.Namespace) -> dict:
    payload = b"x" * 64
    selector = selectors.DefaultSelector()
    counts = {}
    first_reply = {}
    opened_at = {}
    for _ in range(args.connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setblocking(False)
        opened_at[sock] = time.monotonic()
        sock.send(payload)
        counts[sock] = 0
        selector.register(sock, selectors.EVENT_READ, "load")
    probes: list[float] = []
    pending_probe = None
    next_probe = time.monotonic() + 1.0
    end = time.monotonic() + args.duration
    measure_from = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if pending_probe is None and now >= next_probe:
            probe = socket.socket()
            probe.setblocking(False)
            probe.connect_ex(("127.0.0.1", port))
            pending_probe = (probe, now, False)
            selector.register(probe, selectors.EVENT_WRITE, "probe")
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            if key.data == "load":
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("server closed a load connection")
                if len(data) >= 64:   # one full echo back: send the next request
                    counts[sock] += 1
                    first_reply.setdefault(sock, time.monotonic() - opened_at[sock])
                    sock.send(payload)
            else:
                probe, started, sent = pending_probe
                if not sent:
                    probe.send(b"p")
                    selector.modify(probe, selectors.EVENT_READ, "probe")
                    pending_probe = (probe, started, True)
                elif probe.recv(10):
                    probes.append(time.monotonic() - started)
                    selector.unregister(probe)
                    probe.close()
                    pending_probe = None
                    next_probe = time.monotonic() + args.probe_interval
    elapsed = time.monotonic() - measure_from
    values = list(counts.values())
    total = sum(values)
    jain = total ** 2 / (len(values) * sum(v * v for v in values)) if total else 0.0
    for sock in counts:
        sock.close()
    return {
        "connections": args.connections,
        "round_trips_per_s": round(total / elapsed),
        "starved": sum(1 for v in values if v == 0),
        "jain": round(jain, 4),
        "first_reply_p50_ms": round(1000 * statistics.median(first_reply.values()), 1) if first_reply else None,
        "first_reply_max_ms": round(1000 * max(first_reply.values()), 1) if first_reply else None,
        "probe_count": len(probes),
        "probe_p50_ms": round(1000 * statistics.median(probes), 1) if probes else None,
        "probe_max_ms": round(1000 * max(probes), 1) if probes else None,
    }


if __name__ == "__main__":
    main()
