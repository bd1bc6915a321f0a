"""TLS: the server's context, and each connection's TLS state without a socket.

The listener is never wrapped: each connection's handshake runs on its own
thread (see :meth:`connserver.Connection.start_tls`), so a client that never
sends a ClientHello stalls only its own thread, until ``handshake_timeout``.

A connection's TLS is an ``ssl.SSLObject`` between two memory BIOs
(:class:`TLSSession`), not an ``ssl.SSLSocket``. OpenSSL then never touches the
network: the connection moves ciphertext to and from its plain blocking socket
with the same deadline-bound ``recv``/``sendmsg`` as for plaintext (an
``SSLSocket`` retries reads in CPython's own poll, where ``SO_RCVTIMEO`` does
not reach, so a trickled record could stretch a read to the idle timeout), and
a hub's writer thread can encrypt and send without ever blocking.
"""

from __future__ import annotations

import os
import ssl
import threading
from array import array
from bisect import bisect_right
from typing import Callable

from ..config import Config
from ..errors import ConfigError

__all__ = ["server_context", "TLSSession"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_HEADER = 5   # a TLS record header: type, version (2 bytes), length (2 bytes)
_RECORD = 16 * 1024   # most plaintext one TLS record carries (2**14)
# Records the kernel took are noted until the peer has acknowledged them (the kernel is
# asked every _LOOK_BYTES of ciphertext it takes), covering at most _MAX_HISTORY_BYTES of
# ciphertext: more than Linux lets a send buffer grow by itself (tcp_wmem, 4 MiB).
_LOOK_BYTES = 16 * 1024
_MAX_HISTORY_BYTES = 8 * 1024 * 1024


def server_context(config: Config) -> ssl.SSLContext:
    """An SSLContext for serving: modern defaults, no renegotiation, optional mTLS."""
    if os.environ.get("SSLKEYLOGFILE"):
        # Python's default context would write every session key to that file.
        raise ConfigError("tls_cert", "SSLKEYLOGFILE is set, which would write TLS session "
                          "keys to disk; unset it to serve TLS")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[config.tls_min_version]
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls_cert", f"cannot load the certificate/key: {exc}") from exc
    if config.tls_client_ca:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls_client_ca", f"cannot load the CA file: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TLSSession:
    """The server side of one TLS connection, sans-I/O: ciphertext in, ciphertext out.

    Two threads may use one session: the connection's handler thread (reading,
    and writing while not subscribed) and a hub's writer (writing while
    subscribed). ``lock`` makes each OpenSSL call exclusive, and keeps the
    ciphertext in the order it was made, which TLS requires (each record is
    numbered): :meth:`seal` hands out everything made so far, oldest first;
    whoever could not send all of it gives the rest back with :meth:`put_back`,
    ahead of anything newer.

    Plaintext counts as sent only once the kernel has taken the whole record
    carrying it: sealed is not sent (a parked reply's ciphertext may wait here
    until the connection dies). So :meth:`seal` notes where each record ends in
    the ciphertext stream, and whoever hands ciphertext to the kernel reports
    how much with :meth:`sent`, which answers with the plaintext now wholly out.
    Offsets count the stream in order, and :meth:`put_back` returns only bytes
    never sent, so give-backs leave them true.

    What the kernel took, the peer may not have acknowledged when the connection
    closes: the kernel counts that in ciphertext (SIOCOUTQ), the last bytes of the
    stream it took, and :meth:`unacked_plaintext` turns it into the plaintext those
    records carry. So records stay noted after they went, until the kernel says the
    peer has them: ``unacked()``, given by the connection (the session never touches
    its socket), tells how many bytes of what the kernel took it still holds; it is
    asked once per ``_LOOK_BYTES`` taken, and the notes never cover more than
    ``_MAX_HISTORY_BYTES`` of ciphertext (the oldest go first). Without ``unacked``,
    only that bound drops them. A connection gone quiet keeps the notes of what was
    unacknowledged when the kernel was last asked and of less than ``_LOOK_BYTES``
    taken since (12 bytes a record); none once the kernel said it held nothing.
    """

    __slots__ = ("lock", "_ssl", "_incoming", "_outgoing", "_unsent", "output_ready",
                 "established", "record_started", "_record_left", "_header",
                 "_made", "_taken", "_ends", "_plaintext", "_first", "_pending",
                 "_listed_after", "_looked", "_unacked", "_cut")

    def __init__(self, context: ssl.SSLContext,
                 unacked: Callable[[], int] | None = None) -> None:
        self.lock = threading.Lock()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._unsent: list = []        # ciphertext handed out, then given back unsent
        self.output_ready = False      # reading made ciphertext (an alert, a key update)
        self.established = False       # the handshake is complete
        # Monotonic time the record now arriving began (None between records): the
        # rest of it is due within read_timeout of its first byte.
        self.record_started: float | None = None
        self._record_left = 0          # bytes of that record's body still to come
        self._header = b""             # the part of a record header seen so far
        self._made = 0                 # ciphertext handed out by seal() and close_notify()
        self._taken = 0                # of it, what the kernel took (sent())
        # Our records of application data, oldest first: where each one's ciphertext
        # ends in the stream, and the plaintext it carries. [_first, _pending): taken
        # whole by the kernel, perhaps not acknowledged yet; [_pending:): waiting to be
        # taken whole. None while empty, so a quiet connection holds no arrays.
        self._ends: array | None = None       # "q"
        self._plaintext: array | None = None  # "I"
        self._first = 0
        self._pending = 0
        self._listed_after = 0         # every record taken that ends after this offset is noted
        self._looked = 0               # _taken when the kernel was last asked
        self._unacked = unacked
        self._cut = False              # ciphertext was dropped: nothing after it can arrive

    # --- the peer's ciphertext ----------------------------------------------------

    def handshake(self) -> bool:
        """Advance the handshake with what was received; True once it is complete."""
        with self.lock:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return False
            finally:
                self.output_ready = self._outgoing.pending > 0
        self.established = True
        return True

    def receive(self, data: bytes, now: float) -> None:
        """Ciphertext read from the socket at ``now``."""
        with self.lock:
            self._incoming.write(data)
        # Follow the record headers going by, to know whether a record is incomplete.
        left, header = self._record_left, self._header
        position, size = 0, len(data)
        while True:
            if left:
                step = min(left, size - position)
                position += step
                left -= step
            if position >= size:
                break
            need = _HEADER - len(header)
            header += data[position:position + need]
            position += need
            if len(header) == _HEADER:
                left = int.from_bytes(header[3:5], "big")
                header = b""
        self._record_left, self._header = left, header
        if not (left or header):
            self.record_started = None
        elif self.record_started is None:
            self.record_started = now

    def receive_eof(self) -> None:
        """The peer closed the TCP connection."""
        with self.lock:
            self._incoming.write_eof()

    def read(self, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of plaintext; ``None`` until more ciphertext arrives;
        ``b""`` once the peer sent close_notify. Raises ``ssl.SSLError`` on bad input."""
        with self.lock:
            if not self._incoming.pending and not self._ssl.pending():
                return None   # nothing to decrypt: spare OpenSSL (and an exception)
            try:
                return self._ssl.read(limit)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLZeroReturnError:
                return b""
            finally:
                self.output_ready = self._outgoing.pending > 0

    # --- our ciphertext -----------------------------------------------------------

    def seal(self, data: bytes | bytearray | memoryview = b"") -> list:
        """Encrypt ``data``; return all ciphertext not yet handed out, oldest first.

        ``data`` counts as sent only as :meth:`sent` reports its records taken."""
        with self.lock:
            if data:
                self._write_records(data)
            chunks, self._unsent = self._unsent, []
            if self._outgoing.pending:
                self._made += self._outgoing.pending
                chunks.append(self._outgoing.read())
            self.output_ready = False
            return chunks

    def _write_records(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt a record's worth at a time (lock held), noting where each ends: one
        write per record makes the boundaries OpenSSL's own, never a guess."""
        if self._cut:
            self._ssl.write(data)   # the peer cannot decrypt it: nothing to note
            return
        ends, plaintext = self._ends, self._plaintext
        if ends is None or plaintext is None:
            ends, plaintext = self._ends, self._plaintext = array("q"), array("I")
        ready = self._made   # the stream offset at which the BIO's pending bytes start
        outgoing, write = self._outgoing, self._ssl.write
        if isinstance(data, (bytes, bytearray)) and len(data) <= _RECORD:   # most writes
            write(data)
            ends.append(ready + outgoing.pending)
            plaintext.append(len(data))
            return
        with memoryview(data) as whole, whole.cast("B") as view:
            size = view.nbytes
            for start in range(0, size, _RECORD):
                write(view[start:start + _RECORD])   # the slice dies here, before view
                ends.append(ready + outgoing.pending)
                plaintext.append(min(_RECORD, size - start))

    def sent(self, ciphertext: int) -> int:
        """The kernel took the next ``ciphertext`` bytes of our stream: the plaintext
        whose records it now holds whole (to count as sent; 0 for a partial record,
        a handshake flight or an alert). Every sender must report every byte."""
        with self.lock:
            taken = self._taken = self._taken + ciphertext
            ends, carried = self._ends, self._plaintext
            if ends is None or carried is None:
                return 0
            plaintext = 0
            start = self._pending
            if start < len(ends) and ends[start] <= taken:
                stop = self._pending = bisect_right(ends, taken, start)
                plaintext = sum(carried[start:stop])
            if taken - self._looked >= _LOOK_BYTES:
                self._look()
            return plaintext

    def _look(self) -> None:
        """Forget the records the peer has acknowledged, as the kernel tells, and the
        oldest past ``_MAX_HISTORY_BYTES``; none left, no arrays (lock held)."""
        ends, plaintext = self._ends, self._plaintext
        assert ends is not None and plaintext is not None
        taken = self._looked = self._taken
        floor = taken - _MAX_HISTORY_BYTES
        if self._unacked is not None:
            floor = max(floor, taken - self._unacked())   # acknowledgements only advance
        first = self._first
        if first < self._pending and ends[first] <= floor:
            first = self._first = bisect_right(ends, floor, first, self._pending)
            self._listed_after = max(self._listed_after, ends[first - 1])
        if first == len(ends):   # all delivered, nothing waiting
            self._ends = self._plaintext = None
            self._first = self._pending = 0
        elif 2 * first >= len(ends):   # deleting only a majority keeps this linear
            del ends[:first], plaintext[:first]
            self._pending -= first
            self._first = 0

    def unacked_plaintext(self, unacked: int) -> int:
        """The plaintext carried by the last ``unacked`` bytes of ciphertext the kernel
        took (what it still holds unacknowledged: SIOCOUTQ, less our FIN).

        Record by record: a record partly unacknowledged counts whole, as its peer
        cannot decrypt it; ciphertext carrying none of our plaintext (the handshake,
        alerts, close_notify, a record given up) counts 0. Where the notes no longer
        reach (past ``_MAX_HISTORY_BYTES``, or bytes sent before TLS began), each
        byte counts as one of plaintext: the records' own overhead is counted too.
        """
        with self.lock:
            if unacked <= 0:
                return 0
            acked = self._taken - unacked
            total = max(0, self._listed_after - acked)
            ends, plaintext = self._ends, self._plaintext
            if ends is not None and plaintext is not None and self._first < self._pending:
                start = bisect_right(ends, acked, self._first, self._pending)
                total += sum(plaintext[start:self._pending])
            return total

    def give_up(self) -> None:
        """Ciphertext handed out will not all be sent (a best-effort alert, close_notify
        or goodbye the socket did not take whole): the stream is cut there, so no
        plaintext still waiting in it counts as sent, nor any sealed after it."""
        with self.lock:
            ends, plaintext = self._ends, self._plaintext
            if ends is not None and plaintext is not None:
                del ends[self._pending:], plaintext[self._pending:]
                if self._first == self._pending:
                    self._ends = self._plaintext = None
                    self._first = self._pending = 0
            self._cut = True

    def put_back(self, chunks: list) -> None:
        """Ciphertext from :meth:`seal` that was not sent: it goes out before anything newer."""
        if chunks:
            with self.lock:
                self._unsent[:0] = chunks

    def has_output(self) -> bool:
        """Whether there is ciphertext to send."""
        with self.lock:
            return bool(self._unsent) or self._outgoing.pending > 0

    def has_input(self) -> bool:
        """Whether received ciphertext (or plaintext it gave) waits to be read."""
        with self.lock:
            return self._incoming.pending > 0 or self._ssl.pending() > 0

    def pending_bytes(self) -> int:
        """Bytes of ciphertext waiting to be sent (a parked connection's bounded queue)."""
        with self.lock:
            return sum(len(chunk) for chunk in self._unsent) + self._outgoing.pending

    def close_notify(self) -> list:
        """The ciphertext still to send, ending with a close_notify alert (if it can)."""
        with self.lock:
            if self.established:
                try:
                    self._ssl.unwrap()   # queues close_notify, then wants the peer's
                except (ssl.SSLError, ValueError):
                    pass
            chunks, self._unsent = self._unsent, []
            if self._outgoing.pending:
                self._made += self._outgoing.pending
                chunks.append(self._outgoing.read())
            return chunks

    # --- what the handler may ask -------------------------------------------------

    def version(self) -> str | None:
        """The protocol negotiated, such as ``"TLSv1.3"``."""
        with self.lock:
            return self._ssl.version()

    def getpeercert(self, binary_form: bool = False) -> dict | bytes | None:
        """The client's certificate (mutual TLS), as ``ssl.SSLSocket.getpeercert``."""
        with self.lock:
            return self._ssl.getpeercert(binary_form)
