"""TLSSession's send accounting: plaintext counts as sent only once the kernel took its
record whole, at memory speed (a client SSLObject wired to the session, no sockets)."""

from __future__ import annotations

import ssl

import pytest

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
        self.session = TLSSession(server_context)
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


def test_the_bookkeeping_is_dropped_once_everything_went(pair):
    """The per-record notes live only while ciphertext waits: none once it all went."""
    session = pair.session
    ciphertext = b"".join(session.seal(memoryview(b"m" * (5 * RECORD + 3))))
    assert len(session._records) == 6
    assert session.sent(len(ciphertext)) == 5 * RECORD + 3
    assert session._records is None
