"""Bytes of Python heap one idle WebSocket's protocol state holds, measured with tracemalloc.

    python benchmarks/ws_state.py [--count 2000]

The ``ws-hold`` cell's reference for issue 14's target "an idle WebSocket
connection costs no more than a parked framed connection plus wsproto's
state". Three figures, per connection, after the upgrade and one 64-byte binary
message each (the state an idle connection keeps between messages):

* ``wsproto_frames``: wsproto's own frame connection
  (``wsproto.connection.Connection``, server side), the least any wsproto-based
  server keeps;
* ``connserver_protocol``: connserver's whole sans-I/O protocol object
  (``connserver.protocols.websocket.WebSocketProtocol``; the h11 connection
  that parsed the upgrade is dropped once it is accepted, and since issue 14's
  fast path it holds wsproto's frame connection and the message bounds only
  while a frame the fast path leaves to wsproto is in progress, so between
  messages neither);
* ``connserver_deflate``: the same with permessage-deflate negotiated
  (``compression="deflate"``) and one compressed message each way, so its two
  zlib contexts exist: what compression costs an idle connection.

Prints one JSON line. Standard library plus wsproto and connserver; no sockets.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tracemalloc
import zlib

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from connserver.protocols.websocket import WebSocketProtocol

REQUEST = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MASK = b"\x01\x02\x03\x04"
PAYLOAD = os.urandom(64)
FRAME = b"\x82\xc0" + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(PAYLOAD))


def frames_only() -> Connection:
    connection = Connection(ConnectionType.SERVER)
    connection.receive_data(FRAME)
    events = list(connection.events())
    assert len(events) == 1 and isinstance(events[0], BytesMessage) and events[0].data == PAYLOAD
    connection.send(BytesMessage(data=PAYLOAD))
    return connection


def connserver_protocol() -> WebSocketProtocol:
    protocol = WebSocketProtocol(1 << 20)
    protocol.feed(REQUEST)
    protocol.accept()
    events = protocol.feed(FRAME)
    assert events == [PAYLOAD], events
    return protocol


DEFLATE_REQUEST = REQUEST[:-2] + (b"Sec-WebSocket-Extensions: permessage-deflate; "
                                  b"client_max_window_bits\r\n\r\n")


def compressed_frame(payload: bytes) -> bytes:
    """A masked client frame of ``payload`` deflated as a browser would (RSV1, 12-bit window,
    the sync flush's empty block's 4 bytes cut off, RFC 7692 7.2.1)."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
    body = (deflater.compress(payload) + deflater.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert len(body) < 126
    return bytes([0xC2, 0x80 | len(body)]) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(body))


def connserver_deflate() -> WebSocketProtocol:
    """permessage-deflate negotiated, one message each way: both zlib contexts now exist and
    live as long as the connection (context takeover), as in any compressed conversation."""
    protocol = WebSocketProtocol(1 << 20, compression="deflate")
    protocol.feed(DEFLATE_REQUEST)
    protocol.accept()
    assert protocol.compressed
    events = protocol.feed(compressed_frame(PAYLOAD))
    assert events == [PAYLOAD], events
    protocol.frame_parts(PAYLOAD)
    return protocol


def per_object(make, count: int) -> float:
    """Heap bytes per live object: traced memory after making ``count`` of them, less before."""
    make()   # first use: imports and caches are not per connection
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [make() for _ in range(count)]
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    out = {"count": args.count,
           "wsproto_frames_bytes": round(per_object(frames_only, args.count)),
           "connserver_protocol_bytes": round(per_object(connserver_protocol, args.count)),
           "connserver_deflate_bytes": round(per_object(connserver_deflate, args.count // 4))}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
