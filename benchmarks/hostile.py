"""Hostile peers for the suite's hostile-peer cell: tricklers (slowloris) and non-readers.

    python benchmarks/hostile.py --port PORT --trickle 500 --stall 500 --duration 30

* A **trickler** sends a frame header (a 4-byte big-endian length, 1,000 bytes
  announced) and then one byte of the payload every ``--interval`` seconds,
  never completing the frame. The peers' schedules are spread evenly over the
  interval. It reads (and drops) whatever comes back.
* A **non-reader** asks for the smallest receive buffer before connecting, then
  sends 64 KiB frames as fast as the socket takes them, up to
  ``--stall-bytes`` in all, and never reads: the server's replies to it stall
  in the kernel, then in the server.

When every connection is up, every non-reader's socket has refused more (or
reached its cap) and none has taken a byte for 0.5 s (the server stopped
reading them), it prints ``ready`` on stdout; then it keeps the peers
going until ``--duration`` has passed since the start, SIGTERM/SIGINT, or its
stdin closes. Last, it prints one JSON line: per kind, how many connected, how
many were still open at the end (no FIN, reset or error seen and the kernel's
TCP state still ESTABLISHED), how many the server closed and how. Loopback
only (``--host`` must be in 127.0.0.0/8); bounded by ``--duration`` (at most
120 s), the counts and ``--stall-bytes``.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import time

TCP_ESTABLISHED = 1
FRAME = 64 * 1024
QUIET = 0.5     # ready once no non-reader's socket has taken a byte for this long


class Peer:
    """One hostile connection and what happened to it."""

    def __init__(self, kind: str, index: int) -> None:
        self.kind, self.index = kind, index
        self.sock: socket.socket | None = None
        self.connected = False
        self.ended: str | None = None       # "fin", "reset", "error:NAME" once the server ended it
        self.sent = 0
        self.blocked = False                # a non-reader whose socket refused more
        self.pending = b""                  # the rest of a frame the socket did not take
        self.next_due = 0.0                 # a trickler's next byte

    def end(self, how: str) -> None:
        if self.ended is None:
            self.ended = how


def open_peer(peer: Peer, address: tuple[str, int], small_rcvbuf: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if small_rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)   # the kernel rounds it up (~2.3 KiB)
        # and a small send buffer, so that "the socket refuses more" means the server stopped reading
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FRAME)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer.sock = sock
    code = sock.connect_ex(address)
    if code not in (0, errno.EINPROGRESS):
        peer.end(f"error:{errno.errorcode.get(code, code)}")


def tcp_state(sock: socket.socket) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None


def send_some(peer: Peer, data: bytes) -> int:
    """Send what the socket takes; the peer ends on an error."""
    try:
        return peer.sock.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        peer.end("reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else
                 f"error:{errno.errorcode.get(exc.errno, exc.errno)}")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trickle", type=int, default=500, help="trickling peers (slowloris)")
    parser.add_argument("--stall", type=int, default=500, help="non-reading peers")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a trickler's bytes")
    parser.add_argument("--stall-bytes", type=int, default=2 * 1024 * 1024,
                        help="most bytes each non-reader sends")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds from start to the end (≤ 120)")
    parser.add_argument("--ready-timeout", type=float, default=15.0,
                        help="print ready after this long even if not every peer is up")
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host) in ipaddress.ip_network("127.0.0.0/8"):
        sys.exit("hostile.py: --host must be a loopback address (127.0.0.0/8)")
    if not 0 < args.duration <= 120 or args.trickle + args.stall > 5000:
        sys.exit("hostile.py: --duration must be in (0, 120] and at most 5,000 peers")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    address = (args.host, args.port)
    start = time.monotonic()
    peers = [Peer("trickle", i) for i in range(args.trickle)] + [Peer("stall", i) for i in range(args.stall)]
    ep = select.epoll()
    by_fd: dict[int, Peer] = {}
    for peer in peers:
        open_peer(peer, address, small_rcvbuf=peer.kind == "stall")
        if peer.ended is None:
            by_fd[peer.sock.fileno()] = peer
            ep.register(peer.sock.fileno(), select.EPOLLOUT | select.EPOLLRDHUP)
    stdin_fd = sys.stdin.fileno()
    ep.register(stdin_fd, select.EPOLLIN)
    frame = struct.pack(">I", FRAME) + os.urandom(FRAME)
    header = struct.pack(">I", 1000)
    ready_at: float | None = None
    deadline = start + args.duration

    last_progress = [start]

    def pump(peer: Peer) -> None:
        """A non-reader: frames until the socket refuses more or the cap is reached."""
        while peer.ended is None and peer.sent < args.stall_bytes:
            data = peer.pending or frame
            data = data[:args.stall_bytes - peer.sent]
            n = send_some(peer, data)
            peer.sent += n
            if n:
                last_progress[0] = time.monotonic()
            peer.pending = data[n:] if n < len(data) else b""
            if n < len(data):
                peer.blocked = True
                return
        if peer.ended is None:
            peer.blocked = True
            ep.modify(peer.sock.fileno(), select.EPOLLRDHUP)

    while not stop:
        now = time.monotonic()
        if now >= deadline:
            break
        if ready_at is None:
            live = [p for p in peers if p.ended is None]
            quiet = now - last_progress[0] >= QUIET
            if ((quiet and all(p.connected and (p.kind == "trickle" or p.blocked) for p in live))
                    or now - start >= args.ready_timeout):
                ready_at = now
                print("ready", flush=True)
        due = min((p.next_due for p in peers if p.kind == "trickle" and p.connected and p.ended is None),
                  default=deadline)
        timeout = max(0.0, min(due, deadline, start + args.ready_timeout) - now)
        for fd, events in ep.poll(min(timeout, 0.1)):
            if fd == stdin_fd:
                if not os.read(stdin_fd, 4096):
                    stop.append(1)
                    ep.unregister(stdin_fd)
                continue
            peer = by_fd.get(fd)
            if peer is None or peer.ended is not None:
                continue
            if not peer.connected and events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                code = peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    peer.end(f"error:{errno.errorcode.get(code, code)}")
                    ep.unregister(fd)
                    continue
                peer.connected = True
                if peer.kind == "trickle":
                    peer.sent += send_some(peer, header)
                    peer.next_due = time.monotonic() + args.interval * (1 + peer.index / max(1, args.trickle))
                    ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                else:
                    pump(peer)
            elif peer.kind == "trickle" and events & select.EPOLLIN:
                try:
                    while peer.sock.recv(65536):
                        pass
                    peer.end("fin")
                except BlockingIOError:
                    pass
                except OSError:
                    peer.end("reset")
            elif events & (select.EPOLLERR | select.EPOLLHUP):
                peer.end("reset")
            elif events & select.EPOLLRDHUP:
                peer.end("fin")
            elif peer.kind == "stall" and events & select.EPOLLOUT:
                pump(peer)
            if peer.ended is not None:
                ep.unregister(fd)
        now = time.monotonic()
        for peer in peers:
            if peer.kind == "trickle" and peer.connected and peer.ended is None and peer.next_due <= now:
                peer.sent += send_some(peer, b"x")
                peer.next_due += args.interval
                if peer.ended is not None:
                    ep.unregister(peer.sock.fileno())
    end = time.monotonic()

    report: dict[str, object] = {"tool": "hostile", "ready_s": round(ready_at - start, 3) if ready_at else None,
                                 "ran_s": round(end - start, 3), "interrupted": bool(stop)}
    for kind, count in (("trickle", args.trickle), ("stall", args.stall)):
        mine = [p for p in peers if p.kind == kind]
        still = 0
        how: dict[str, int] = {}
        for peer in mine:
            if peer.ended is None and peer.connected and tcp_state(peer.sock) == TCP_ESTABLISHED:
                still += 1
            elif peer.ended is not None:
                how[peer.ended] = how.get(peer.ended, 0) + 1
        report[kind] = {"count": count, "connected": sum(p.connected for p in mine), "still_open": still,
                        "ended": how, "bytes_sent": sum(p.sent for p in mine),
                        "blocked": sum(p.blocked for p in mine)}
    for peer in peers:
        if peer.sock is not None:
            peer.sock.close()
    ep.close()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
