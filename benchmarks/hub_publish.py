"""Hub.publish() latency with 50 reading subscribers, with and without one that never reads.

Runs a connserver Server in this process whose handler subscribes each
connection to one Hub. A client subprocess (so its reading does not compete
for this process's GIL) connects the subscribers: READERS that read and check
every message in order, and, in the first run, one *stalled* subscriber with a
tiny SO_RCVBUF that never reads. This process then publishes MESSAGES
fixed-size messages, timing each publish() call, and reports latency
percentiles, what every subscriber received, and what happened to the stalled
one. Each run is repeated without the stalled subscriber, to show that publish
latency does not depend on it. Two publishers: *paced* (RATE messages per
second, the sleep outside the timed call) and *burst* (a tight loop). The hub
keeps its defaults. Prints one JSON line; loopback only; every wait is bounded.

    python benchmarks/hub_publish.py
    python benchmarks/hub_publish.py --readers 50 --messages 10000 --size 256 --rate 10000
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

import connserver

SAFETY_TIMEOUT = 30.0

# The client side: connect, read everything in order, report one JSON line.
CLIENT = """\
import json, selectors, socket, sys, time
port, readers, stalled, messages, size = map(int, sys.argv[1:6])
address = ("127.0.0.1", port)
selector = selectors.DefaultSelector()
state = {}
for index in range(readers):
    sock = socket.create_connection(address)
    sock.sendall(b"R")
    sock.setblocking(False)
    state[sock] = {"buffer": bytearray(), "next": 0, "in_order": True}
    selector.register(sock, selectors.EVENT_READ)
slow = None
if stalled:
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)   # before connect: a tiny window
    slow.connect(address)
    slow.sendall(b"S")
print("connected", flush=True)
deadline = time.monotonic() + %(timeout)r
done = 0
while done < readers and time.monotonic() < deadline:
    for key, _ in selector.select(timeout=1.0):
        sock, entry = key.fileobj, state[key.fileobj]
        data = sock.recv(1 << 20)
        if not data:
            selector.unregister(sock)
            done += 1
            continue
        buffer = entry["buffer"]
        buffer += data
        whole = len(buffer) - len(buffer) %% size
        for offset in range(0, whole, size):
            if int(buffer[offset:offset + 10]) != entry["next"]:
                entry["in_order"] = False
            entry["next"] += 1
        del buffer[:whole]
        if entry["next"] == messages:
            selector.unregister(sock)
            done += 1
result = {"delivered": sorted(e["next"] for e in state.values()),
          "all_in_order": all(e["in_order"] for e in state.values())}
if slow is not None:
    # Only now does the stalled client read: what reached it before the server gave up on it?
    slow.settimeout(5.0)
    got, closed = 0, False
    try:
        while chunk := slow.recv(1 << 16):
            got += len(chunk)
        closed = True
    except (socket.timeout, ConnectionResetError):
        closed = False
    result["stalled_received_messages"] = got // size
    result["stalled_closed_by_server"] = closed
    slow.close()
for sock in state:
    sock.close()
print(json.dumps(result), flush=True)
""" % {"timeout": SAFETY_TIMEOUT}


class Subscriber(connserver.Handler):
    """Subscribes its connection to the benchmark hub until the peer goes away.

    The client's first byte says which kind it is: ``R`` reads, ``S`` is stalled.
    As in tests/loopback/test_hub.py, the stalled one's server-side SO_SNDBUF is pinned at
    8 KiB: Linux otherwise autotunes a loopback send buffer up to tcp_wmem's
    4 MiB, and the kernel would absorb megabytes before its queue fills.
    """

    def handle(self) -> None:
        if self.conn.recv(1) == b"S":
            self.conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        with self.server.hub("bench").subscribe(self.conn):
            while self.conn.recv():
                pass


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def percentile(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run(readers: int, stalled: bool, messages: int, size: int, rate: float) -> dict:
    threads_before = threading.active_count()
    server = connserver.Server(("127.0.0.1", 0), Subscriber)
    server.start()
    hub = server.hub("bench")
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(server.server_address[1]), str(readers),
         str(int(stalled)), str(messages), str(size)],
        stdout=subprocess.PIPE, text=True)
    try:
        if client.stdout.readline().strip() != "connected":
            raise RuntimeError("client failed to connect")
        subscribers = readers + int(stalled)
        wait_until(lambda: hub.statistics().subscribers == subscribers, "every subscription")

        payloads = [b"%010d" % seq + b"." * (size - 11) + b"\n" for seq in range(messages)]
        latencies: list[int] = []
        first_short: int | None = None   # first message not taken by every subscriber
        clock = time.perf_counter_ns
        interval_ns = int(1e9 / rate) if rate else 0
        started = time.perf_counter()
        next_at = clock()
        for seq, payload in enumerate(payloads):
            if interval_ns:
                # Paced: sleep until this message's slot (outside the timed call).
                next_at += interval_ns
                delay = next_at - clock()
                if delay > 0:
                    time.sleep(delay / 1e9)
            before = clock()
            taken = hub.publish(payload)
            latencies.append(clock() - before)
            if taken < subscribers and first_short is None:
                first_short = seq
        publish_seconds = time.perf_counter() - started
        hub_stats = hub.statistics()

        out, _ = client.communicate(timeout=SAFETY_TIMEOUT + 10)
        delivered = json.loads(out.splitlines()[-1])
        wait_until(lambda: server.stats().connections_active == 0, "every connection to end")
        stats = server.stats()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        report = server.shutdown(grace=5.0)
        server.server_close()

    latencies.sort()
    result = {
        "subscribers": subscribers,
        "stalled_subscriber": stalled,
        "rate": rate or "burst",
        "publish_us": {
            "p50": round(percentile(latencies, 0.50) / 1000, 1),
            "p99": round(percentile(latencies, 0.99) / 1000, 1),
            "max": round(latencies[-1] / 1000, 1),
            "mean": round(sum(latencies) / len(latencies) / 1000, 1),
        },
        "publish_total_seconds": round(publish_seconds, 3),
        # With only the stalled subscriber falling behind, the message its queue had no room for.
        "first_message_not_taken_by_all": first_short,
        "readers_delivered_min": min(delivered["delivered"]),
        "readers_delivered_max": max(delivered["delivered"]),
        "readers_all_in_order": delivered["all_in_order"],
        "hub": {"published": hub_stats.published, "queued": hub_stats.queued,
                "dropped": hub_stats.dropped, "slow_consumers": hub_stats.slow_consumers,
                "write_deadlines": hub_stats.write_deadlines},
        "close_reasons": dict(stats.close_reasons),
        "shutdown_clean": report.clean,
        "threads_left_over": threading.active_count() - threads_before,
    }
    if stalled:
        result["stalled"] = {
            "received_before_close": delivered["stalled_received_messages"],
            "closed_by_server": delivered["stalled_closed_by_server"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="bytes per message (at least 16)")
    parser.add_argument("--rate", type=float, default=10_000,
                        help="messages per second for the paced runs (default 10000)")
    args = parser.parse_args()
    if args.size < 16:
        parser.error("--size must be at least 16")
    hub = connserver.Hub()
    result = {"readers": args.readers, "messages": args.messages, "size": args.size,
              "hub_defaults": {"policy": hub.policy, "max_queue_bytes": hub.max_queue_bytes,
                               "max_queue_items": hub.max_queue_items}}
    for name, rate in (("paced", args.rate), ("burst", 0.0)):
        result[name] = {
            "with_stalled": run(args.readers, True, args.messages, args.size, rate),
            "without_stalled": run(args.readers, False, args.messages, args.size, rate),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
