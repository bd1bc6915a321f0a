"""How long from server.cancel(id) until the handler blocked in recv() sees Cancelled.

    python benchmarks/cancel_latency.py [--samples 200]

Prints one JSON line (microseconds). Loopback only; bounded by --samples.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))
import connserver  # noqa: E402
from connserver.testing import wait_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    woke: list[float] = []

    class Waiter(connserver.Handler):
        def handle(self) -> None:
            try:
                self.conn.recv()
            except connserver.Cancelled:
                woke.append(time.perf_counter())
                raise

    server = connserver.Server(("127.0.0.1", 0), Waiter, connserver.Config(idle_timeout=60))
    server.start()
    latencies = []
    try:
        for index in range(args.samples):
            with socket.create_connection(server.server_address, timeout=10):
                idle = wait_for(lambda: [i for i in server.connections() if i.operation == "idle"], 10)
                started = time.perf_counter()
                server.cancel(idle[0].id)
                wait_for(lambda: len(woke) == index + 1, 10)
                latencies.append(woke[-1] - started)
            wait_for(lambda: server.stats().connections_active == 0, 10)
    finally:
        server.shutdown(grace=2.0)
        server.server_close()
    latencies.sort()
    print(json.dumps({"samples": len(latencies),
                      "p50_us": round(statistics.median(latencies) * 1e6),
                      "p99_us": round(latencies[int(len(latencies) * 0.99) - 1] * 1e6),
                      "max_us": round(latencies[-1] * 1e6)}))


if __name__ == "__main__":
    main()
