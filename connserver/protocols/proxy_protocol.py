"""The PROXY protocol (HAProxy, versions 1 and 2), parsed strictly and sans-I/O.

A load balancer that terminates the client's TCP connection sends this header
first, so the server learns the client's real address. :func:`header_length`
says how many bytes the header at the start of a buffer takes (or that more
are needed), and :func:`parse` turns exactly those bytes into a
:class:`ProxyHeader`. The connection code peeks at the socket with these and
then consumes exactly the header, so nothing of the application's stream (or
of a TLS handshake that follows) is ever read by mistake.

Limits: a v1 header is at most 107 bytes including CRLF (the spec's bound);
a v2 header is at most ``16 + MAX_V2_PAYLOAD`` bytes, TLVs included.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from ..errors import RemoteProtocolError

__all__ = ["ProxyHeader", "header_length", "parse", "V2_SIGNATURE", "MAX_V1_LENGTH",
           "MAX_V2_PAYLOAD"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1_LENGTH = 107
MAX_V2_PAYLOAD = 4096
_V2_FIXED = struct.Struct("!12sBBH")
_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}   # INET, INET6, UNIX


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    version: int                          # 1 or 2
    command: str                          # "PROXY", or "LOCAL" (the proxy's own health check)
    family: str                           # "TCP4", "TCP6", "UNIX" or "UNKNOWN"
    source: tuple[str, int] | None        # the client, when known
    destination: tuple[str, int] | None   # the address the client connected to
    tlvs: tuple[tuple[int, bytes], ...] = ()


def header_length(data: bytes) -> int | None:
    """Bytes the header at the start of ``data`` takes; None if more are needed.

    Raises :class:`~connserver.RemoteProtocolError` as soon as the bytes cannot
    start a PROXY header, or the declared size is over the limit.
    """
    if not data:
        return None
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        if len(data) < _V2_FIXED.size:
            return None
        _, _, _, length = _V2_FIXED.unpack_from(data)
        if length > MAX_V2_PAYLOAD:
            raise RemoteProtocolError(f"PROXY v2 header declares {length} bytes (limit {MAX_V2_PAYLOAD})")
        return _V2_FIXED.size + length
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
        if end >= 0:
            return end + 2
        if len(data) >= MAX_V1_LENGTH:
            raise RemoteProtocolError("PROXY v1 header longer than 107 bytes")
        return None
    raise RemoteProtocolError("connection does not start with a PROXY protocol header")


def parse(header: bytes) -> ProxyHeader:
    """Parse one complete header (exactly the bytes :func:`header_length` counted)."""
    if header.startswith(V2_SIGNATURE):
        return _parse_v2(header)
    if header.startswith(V1_PREFIX):
        return _parse_v1(header)
    raise RemoteProtocolError("not a PROXY protocol header")


def _parse_v1(header: bytes) -> ProxyHeader:
    if len(header) > MAX_V1_LENGTH or not header.endswith(b"\r\n"):
        raise RemoteProtocolError("malformed PROXY v1 header")
    try:
        text = header[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("PROXY v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise RemoteProtocolError(f"malformed PROXY v1 header {text!r}")
    _, family, source, destination, source_port, destination_port = parts
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(1, "PROXY", family,
                       (_v1_address(source, version), _v1_port(source_port)),
                       (_v1_address(destination, version), _v1_port(destination_port)))


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise RemoteProtocolError(f"bad address {text!r} in PROXY v1 header") from None
    if address.version != version:
        raise RemoteProtocolError(f"bad address {text!r} in PROXY v1 header")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise RemoteProtocolError(f"bad port {text!r} in PROXY v1 header")
    return int(text)


def _parse_v2(header: bytes) -> ProxyHeader:
    if len(header) < _V2_FIXED.size:
        raise RemoteProtocolError("truncated PROXY v2 header")
    _, version_command, family_protocol, length = _V2_FIXED.unpack_from(header)
    if len(header) != _V2_FIXED.size + length:
        raise RemoteProtocolError("PROXY v2 header length does not match")
    if version_command >> 4 != 2:
        raise RemoteProtocolError(f"PROXY v2 header has version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (0, 1):
        raise RemoteProtocolError(f"PROXY v2 header has unknown command {command}")
    payload = header[_V2_FIXED.size:]
    family, transport = family_protocol >> 4, family_protocol & 0xF
    if family not in (0, 1, 2, 3) or transport not in (0, 1, 2):
        raise RemoteProtocolError(f"PROXY v2 header has unknown family/protocol {family_protocol:#x}")
    address_size = _V2_ADDRESS_SIZES.get(family, 0)
    if len(payload) < address_size:
        raise RemoteProtocolError("PROXY v2 address block is shorter than its family needs")
    tlvs = _parse_tlvs(payload[address_size:])
    if command == 0:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, tlvs)
    if family == 1 and transport == 1:
        source, destination, sport, dport = struct.unpack_from("!4s4sHH", payload)
        return ProxyHeader(2, "PROXY", "TCP4", (str(ipaddress.IPv4Address(source)), sport),
                           (str(ipaddress.IPv4Address(destination)), dport), tlvs)
    if family == 2 and transport == 1:
        source, destination, sport, dport = struct.unpack_from("!16s16sHH", payload)
        return ProxyHeader(2, "PROXY", "TCP6", (str(ipaddress.IPv6Address(source)), sport),
                           (str(ipaddress.IPv6Address(destination)), dport), tlvs)
    # UNSPEC, UNIX, or a datagram transport: no usable client address.
    return ProxyHeader(2, "PROXY", "UNIX" if family == 3 else "UNKNOWN", None, None, tlvs)


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise RemoteProtocolError("truncated TLV in PROXY v2 header")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if offset + length > len(data):
            raise RemoteProtocolError("TLV runs past the end of the PROXY v2 header")
        tlvs.append((kind, bytes(data[offset:offset + length])))
        offset += length
    return tuple(tlvs)
