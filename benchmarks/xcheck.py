"""A second, independent echo client, to cross-check loadgen on a few cells.

    python benchmarks/xcheck.py --port PORT [--connections 10] [--size 64]
                                [--warmup 0.5] [--duration 2] [--server-pid PID]

It shares no code with ``loadgen.c``: pure Python on ``select.epoll``, the same
closed loop (each connection keeps exactly one request outstanding, every echo
is compared byte for byte with what was sent), and its own reading of the
server's CPU time from ``/proc/PID/stat``. If the two clients agree on what a
server costs per round trip, the number belongs to the server and not to the
tool. Being Python, it drives less load than loadgen; its own CPU use is
reported, so a reader can see when the client was the limit.

Prints one JSON object on one line. Loopback only; the run stops by itself
(warm-up + duration + at most one second of drain).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import select
import socket
import sys
import time

DRAIN_S = 1.0


def server_snapshot(pid: int | None) -> float | None:
    """User + system CPU seconds of the server process (threads and waited-for children)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(ordered: list[int], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))] / 1000


def run(port: int, connections: int, size: int, warmup: float, duration: float,
        server_pid: int | None) -> dict:
    pattern = os.urandom(size + 256)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
    poller = select.epoll()
    index = {}
    sent = [b""] * connections
    received = [bytearray() for _ in range(connections)]
    seq = [0] * connections
    started_at = [0] * connections

    def request(i: int) -> bytes:
        head = seq[i].to_bytes(8, "big") + i.to_bytes(4, "big")
        offset = (seq[i] * 7 + i * 13) % 256
        return (head + pattern[offset:offset + size])[:size] if size >= 12 else pattern[offset:offset + size]

    for i, sock in enumerate(socks):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        index[sock.fileno()] = i
        poller.register(sock.fileno(), select.EPOLLIN)
    start = time.monotonic_ns()
    window_start = start + int(warmup * 1e9)
    window_end = window_start + int(duration * 1e9)
    drain_end = window_end + int(DRAIN_S * 1e9)
    for i, sock in enumerate(socks):
        sent[i] = request(i)
        started_at[i] = time.monotonic_ns()
        sock.send(sent[i])
    outstanding = connections
    latencies: list[int] = []
    counted = 0
    error = None
    cpu0 = server0 = None
    cpu1 = server1 = None
    try:
        while outstanding and error is None:
            now = time.monotonic_ns()
            if cpu0 is None and now >= window_start:
                cpu0, server0 = own_cpu(), server_snapshot(server_pid)
            if cpu1 is None and now >= window_end:
                cpu1, server1 = own_cpu(), server_snapshot(server_pid)
            if now >= drain_end:
                break
            for fd, _ in poller.poll(0.05):
                i = index[fd]
                data = socks[i].recv(65536)
                if not data:
                    error = f"connection {i} closed by the server"
                    break
                buffer = received[i]
                buffer += data
                if len(buffer) < size:
                    continue
                if buffer != sent[i]:
                    error = f"connection {i} request {seq[i]}: the echo differs from the request"
                    break
                done = time.monotonic_ns()
                if window_start <= done < window_end:
                    counted += 1
                    latencies.append(done - started_at[i])
                buffer.clear()
                seq[i] += 1
                if done < window_end:
                    sent[i] = request(i)
                    started_at[i] = done
                    socks[i].send(sent[i])
                else:
                    outstanding -= 1
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    if cpu1 is None:
        cpu1, server1 = own_cpu(), server_snapshot(server_pid)
    if error is None and not counted:
        error = "no round trip completed in the window"

    window = duration
    latencies.sort()
    result = {
        "tool": "xcheck", "params": {"port": port, "connections": connections, "size": size,
                                     "warmup_s": warmup, "duration_s": duration},
        "results": {"round_trips": counted, "window_s": window,
                    "round_trips_per_s": counted / window if window else None,
                    "latency": {"p50_us": percentile(latencies, 0.5),
                                "p99_us": percentile(latencies, 0.99)}},
        "client_cpu": {"util": (cpu1 - cpu0) / window if cpu0 is not None else None},
        "ok": error is None, "error": error,
    }
    if server_pid:
        cpu = server1 - server0 if server0 is not None and server1 is not None else None
        result["server"] = {"pid": server_pid, "cpu_s": cpu, "util": cpu / window if cpu is not None else None}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--server-pid", type=int)
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback or args.host != "127.0.0.1":
        parser.error("xcheck connects to 127.0.0.1 only")
    if not (1 <= args.connections <= 1000 and 1 <= args.size <= 65536 and 0 < args.duration <= 600):
        parser.error("connections 1-1000, size 1-65536, duration up to 600 s")
    result = run(args.port, args.connections, args.size, args.warmup, args.duration, args.server_pid)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
