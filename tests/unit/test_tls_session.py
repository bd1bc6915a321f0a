"""TLSSession's send accounting: plaintext counts as sent only once the kernel took its
record whole, and what the kernel holds unacknowledged (ciphertext) counts as the
plaintext of its records; at memory speed (a client SSLObject wired to the session, no
sockets; the kernel's unacknowledged count is the test's to set)."""

from __future__ import annotations

import ssl

import pytest

from connserver.protocols import tls
from connserver.protocols.tls import TLSSession
from tests.tls_support import ca  # noqa: F401 (fixture)

RECORD = 16 * 1024


class Pair:
    """A server TLSSession and a client SSLObject, the handshake done between them."""

    def __init__(self, ca) -> None:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(server_context)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        self.kernel_unacked = 0   # what the session is told the kernel still holds
        self.session = TLSSession(server_context, lambda: self.kernel_unacked)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_context.wrap_bio(self._in, self._out, server_hostname="localhost")
        self.handshake_plaintext = 0   # what sent() answered for handshake flights
        while True:
            try:
                self.client.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self.session.receive(self._out.read(), 0.0)
            self.session.handshake()
            flight = b"".join(self.session.seal())
            self.handshake_plaintext += self.session.sent(len(flight))
            self._in.write(flight)
            if done:
                break

    def deliver(self, ciphertext: bytes) -> bytes:
        """``ciphertext`` reaches the client: the plaintext it can decrypt now."""
        self._in.write(ciphertext)
        plaintext = b""
        while True:
            try:
                plaintext += self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return plaintext


def records(ciphertext: bytes) -> list[int]:
    """The lengths of the TLS records in ``ciphertext`` (headers included)."""
    lengths, position = [], 0
    while position < len(ciphertext):
        length = 5 + int.from_bytes(ciphertext[position + 3:position + 5], "big")
        lengths.append(length)
        position += length
    return lengths


@pytest.fixture
def pair(ca):
    return Pair(ca)


def test_handshake_flights_count_no_plaintext(pair):
    """A handshake's ciphertext, however much the kernel takes, is no plaintext sent."""
    assert pair.handshake_plaintext == 0
    assert pair.session.sent(0) == 0


def test_a_record_counts_once_the_kernel_took_its_last_byte(pair):
    """40,000 bytes make three records; each counts only when all of it was taken."""
    data = bytes(range(256)) * 156 + b"tail"   # 39,940 bytes
    ciphertext = b"".join(pair.session.seal(data))
    lengths = records(ciphertext)
    assert len(lengths) == 3
    counted = []
    for length in lengths:
        counted.append(pair.session.sent(length - 1))
        counted.append(pair.session.sent(1))
    assert counted == [0, RECORD, 0, RECORD, 0, len(data) - 2 * RECORD]
    assert pair.deliver(ciphertext) == data


def test_given_back_ciphertext_keeps_its_place_in_the_stream(pair):
    """A partial send, the rest given back, a newer seal behind it: the counts follow
    the stream, each record once, and the client reads it all in order."""
    session = pair.session
    first = b"a" * (RECORD + 100)
    chunks = session.seal(first)
    ciphertext = b"".join(chunks)
    taken = records(ciphertext)[0] + 10   # the first record and a bit of the second
    assert session.sent(taken) == RECORD
    session.put_back([ciphertext[taken:]])
    rest = b"".join(session.seal(b"b" * 7))   # the given-back bytes come first
    assert rest.startswith(ciphertext[taken:])
    second_end = len(ciphertext) - taken
    assert session.sent(second_end - 1) == 0
    assert session.sent(1) == 100
    assert session.sent(len(rest) - second_end) == 7
    assert pair.deliver(ciphertext[:taken] + rest) == first + b"b" * 7


def test_ciphertext_made_outside_seal_shifts_the_offsets(pair):
    """Ciphertext with no plaintext of ours ahead of a record (as reading makes: an
    alert, a key update) counts for nothing, and our record only once taken too."""
    session = pair.session
    one = b"".join(session.seal(b"one"))
    with session.lock:   # stands in for output made by reading, outside seal()
        session._ssl.write(b"made by reading")
    two = b"".join(session.seal(b"two"))
    made, ours = records(two)
    assert session.sent(len(one)) == 3
    assert session.sent(made) == 0
    assert session.sent(ours - 1) == 0
    assert session.sent(1) == 3


def test_a_stream_given_up_counts_nothing_more(pair):
    """What a best-effort send dropped never counts, nor anything sealed after it,
    however much of that the kernel then takes."""
    session = pair.session
    ciphertext = b"".join(session.seal(b"z" * (2 * RECORD)))
    first = records(ciphertext)[0]
    assert session.sent(first) == RECORD
    session.give_up()   # the second record was dropped, never sent
    later = b"".join(session.seal(b"y" * (2 * RECORD)))
    assert session.sent(len(later)) == 0


def test_the_bookkeeping_is_dropped_once_everything_was_acknowledged(pair):
    """The per-record notes live while ciphertext waits or is unacknowledged: those the
    kernel says the peer has are dropped, and none are kept once it holds nothing."""
    session = pair.session
    ciphertext = b"".join(session.seal(memoryview(b"m" * (5 * RECORD + 3))))
    lengths = records(ciphertext)
    assert len(session._ends) == 6
    pair.kernel_unacked = sum(lengths[-2:])   # the last two records are not acknowledged
    assert session.sent(len(ciphertext)) == 5 * RECORD + 3
    assert len(session._ends) - session._first == 2
    assert session.unacked_plaintext(pair.kernel_unacked) == RECORD + 3
    pair.kernel_unacked = 0
    more = b"".join(session.seal(b"n" * (RECORD + 1)))
    assert session.sent(len(more)) == RECORD + 1
    assert session._ends is None and session._plaintext is None


def test_unacknowledged_ciphertext_counts_as_the_plaintext_of_its_records(pair):
    """The last U bytes taken map to the plaintext of the records ending in them; a record
    partly unacknowledged counts whole: what the client could not decrypt, at every U."""
    session = pair.session
    data = bytes(range(256)) * 156 + b"tail"   # 39,940 bytes: three records
    ciphertext = b"".join(session.seal(data))
    one, two, three = records(ciphertext)
    pair.kernel_unacked = len(ciphertext)   # nothing acknowledged while sending
    assert session.sent(len(ciphertext)) == len(data)
    last = len(data) - 2 * RECORD
    expected = {0: 0, 1: last, three - 1: last, three: last, three + 1: RECORD + last,
                two + three: RECORD + last, two + three + 1: len(data), len(ciphertext): len(data)}
    for unacked, plaintext in expected.items():
        assert session.unacked_plaintext(unacked) == plaintext, unacked
    # Held to what a client decrypts of the acknowledged part, byte by byte:
    acked = len(ciphertext) - (three + 1)
    assert len(pair.deliver(ciphertext[:acked])) == len(data) - session.unacked_plaintext(three + 1)


def test_ciphertext_with_no_plaintext_counts_none_unacknowledged(pair):
    """The handshake, ciphertext made by reading (an alert, a key update) and
    close_notify carry no plaintext: unacknowledged, they count 0."""
    session = pair.session
    one = b"".join(session.seal(b"one"))
    with session.lock:   # stands in for output made by reading, outside seal()
        session._ssl.write(b"made by reading")
    two = b"".join(session.seal(b"two"))
    made, ours = records(two)
    goodbye = b"".join(session.close_notify())
    pair.kernel_unacked = 1 << 20   # the kernel still holds everything (no look drops)
    assert session.sent(len(one) + len(two) + len(goodbye)) == 6
    assert session.unacked_plaintext(len(goodbye)) == 0
    assert session.unacked_plaintext(len(goodbye) + 1) == 3
    assert session.unacked_plaintext(len(goodbye) + ours + made) == 3
    assert session.unacked_plaintext(len(goodbye) + ours + made + 1) == 6
    everything = session._taken   # the handshake included
    assert session.unacked_plaintext(everything) == 6


def test_a_record_given_up_counts_no_plaintext_unacknowledged(pair):
    """A record the kernel took only part of before the stream was given up was never
    counted as sent, so its part held unacknowledged counts 0 too."""
    session = pair.session
    ciphertext = b"".join(session.seal(b"g" * (2 * RECORD)))
    first, second = records(ciphertext)
    pair.kernel_unacked = len(ciphertext)
    assert session.sent(first + 100) == RECORD
    session.give_up()
    assert session.unacked_plaintext(100) == 0
    assert session.unacked_plaintext(101) == RECORD


def test_past_the_notes_bound_every_byte_counts(pair, monkeypatch):
    """Notes cover at most _MAX_HISTORY_BYTES of ciphertext, the oldest dropped first;
    unacknowledged ciphertext beyond them counts byte for byte, as if all plaintext."""
    monkeypatch.setattr(tls, "_MAX_HISTORY_BYTES", 3 * RECORD)
    session = pair.session
    pair.kernel_unacked = 1 << 30   # nothing acknowledged: only the bound drops notes
    ciphertext = b"".join(session.seal(b"c" * (10 * RECORD)))
    lengths = records(ciphertext)
    assert session.sent(len(ciphertext)) == 10 * RECORD
    kept = len(session._ends) - session._first
    assert 3 <= kept < 10
    covered = sum(lengths[-kept:])
    assert session.unacked_plaintext(covered) == kept * RECORD   # still exact
    assert session.unacked_plaintext(covered + 1) == kept * RECORD + 1
    assert session.unacked_plaintext(len(ciphertext)) == \
        kept * RECORD + sum(lengths[:-kept]) >= 10 * RECORD
