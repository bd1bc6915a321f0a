"""permessage-deflate (RFC 7692) with a bound on what a message inflates to.

wsproto's :class:`~wsproto.extensions.PerMessageDeflate` inflates each frame's
payload with ``decompress(data)``, no output limit: 100 KiB of deflated zeros
become 100 MiB in memory before anyone can look at the size. Here every call
is ``decompress(data, max_length)`` with what the message may still hold (plus
one byte, to see it overflow), so a message that would inflate past
``max_message_size`` is refused (close code 1009) having cost at most about
``max_message_size`` of memory, however well it compresses.

Memory is the other cost, per connection and for as long as it is open (zlib's
state, measured in docs/howto/websocket.md): we ask the client to compress
with a 4 KiB window (``client_max_window_bits=12``) when its offer allows it,
and compress what we send with a 4 KiB window and ``memLevel=5``, as the
``websockets`` library does. Sending with a smaller window than negotiated is
always allowed: the peer's inflater only needs a window as large as ours.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, Opcode

__all__ = ["BoundedDeflate", "DeflateTooBig"]

_SYNC_TAIL = b"\x00\x00\xff\xff"   # what a sender strips from each message (RFC 7692, 7.2.1)
_OUR_WINDOW_BITS = 12
_OUR_MEM_LEVEL = 5


class DeflateTooBig(Exception):
    """Raised inside wsproto's parser: a message inflates past the bound (``size`` > ``limit``)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit


class BoundedDeflate(PerMessageDeflate):
    """The server's permessage-deflate: inflates within ``max_message_size``, and
    compresses the messages we send (:meth:`compress`)."""

    def __init__(self, max_message_size: int) -> None:
        super().__init__(client_max_window_bits=_OUR_WINDOW_BITS)
        self.max_message_size = max_message_size
        self._inflated = 0   # bytes the message in progress inflated to so far

    def accept(self, offer: str) -> bool | None | str:
        if self._enabled:
            return None   # a later alternative offer: the first one accepted stands
        params = [param.strip() for param in offer.split(";")[1:]]
        if not any(param.startswith("client_max_window_bits") for param in params):
            # The client did not say it can compress with a smaller window: it uses 15 bits.
            self.client_max_window_bits = self.DEFAULT_CLIENT_MAX_WINDOW_BITS
        return super().accept(offer)

    # --- inbound: inflate within the bound --------------------------------------------

    def _limit(self) -> int:
        """Output to allow the next call: what the message may still hold, plus one."""
        return max(0, self.max_message_size - self._inflated) + 1

    def _count(self, data: bytes) -> bytes:
        self._inflated += len(data)
        if self._inflated > self.max_message_size:
            size, self._inflated = self._inflated, 0
            raise DeflateTooBig(size, self.max_message_size)
        return data

    def frame_inbound_payload_data(self, proto, data):  # type: ignore[no-untyped-def]
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        try:
            return self._count(self._decompressor.decompress(bytes(data), self._limit()))
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA

    def frame_inbound_complete(self, proto, fin):  # type: ignore[no-untyped-def]
        if not fin:
            return None
        if not self._inbound_is_compressible or not self._inbound_compressed:
            self._inbound_compressed = None
            return None
        decompressor = self._decompressor
        assert decompressor is not None
        try:
            data = self._count(decompressor.decompress(_SYNC_TAIL, self._limit()))
            data += self._count(decompressor.flush(self._limit()))
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        self._inflated = 0
        return data

    def frame_inbound_header(self, proto, opcode, rsv, payload_length):  # type: ignore[no-untyped-def]
        result = super().frame_inbound_header(proto, opcode, rsv, payload_length)
        if not isinstance(result, CloseReason) and opcode is not Opcode.CONTINUATION \
                and not opcode.iscontrol():
            self._inflated = 0   # a new message
        return result

    # --- outbound ----------------------------------------------------------------------

    def compress(self, payload: bytes) -> bytes:
        """One whole message, compressed (the RSV1 bit is the caller's to set)."""
        compressor = self._compressor
        if compressor is None:
            bits = min(self.server_max_window_bits, _OUR_WINDOW_BITS)
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits,
                                          _OUR_MEM_LEVEL)
            if not self.server_no_context_takeover:
                self._compressor = compressor
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4] if data.endswith(_SYNC_TAIL) else data

