"""PROXY protocol: the strict parser, with hypothesis (the server behind it:
tests/loopback/test_proxy_protocol_server.py)."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connserver
from connserver.proxy_protocol import V2_SIGNATURE, header_length, parse


def v2_header(source=("1.2.3.4", 1000), destination=("5.6.7.8", 2000), command=1, tlvs=b""):
    payload = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0]) +
               struct.pack("!HH", source[1], destination[1]) + tlvs)
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(payload)) + payload


def test_v1_and_v2_headers_parse():
    """Valid v1 (TCP4, TCP6, UNKNOWN) and v2 (PROXY, LOCAL, TLVs) headers parse."""
    header = parse(b"PROXY TCP4 192.168.0.1 10.0.0.1 56324 443\r\n")
    assert header.source == ("192.168.0.1", 56324) and header.destination == ("10.0.0.1", 443)
    assert parse(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n").source == ("2001:db8::1", 1)
    assert parse(b"PROXY UNKNOWN whatever\r\n").family == "UNKNOWN"
    header = parse(v2_header(tlvs=b"\x04\x00\x02hi"))
    assert header.version == 2 and header.source == ("1.2.3.4", 1000) and header.tlvs == ((4, b"hi"),)
    assert parse(v2_header(command=0)).command == "LOCAL"


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",            # missing field
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",         # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",      # port out of range
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",              # family mismatch
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",          # unknown family
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",            # LF without CR
])
def test_malformed_v1_is_refused(bad):
    """Anything but the exact v1 grammar is a RemoteProtocolError."""
    with pytest.raises(connserver.RemoteProtocolError):
        length = header_length(bad)
        parse(bad if length is None else bad[:length])


def test_limits_are_checked_before_buffering():
    """A v1 line past 107 bytes or a v2 length past the limit fails at once."""
    with pytest.raises(connserver.RemoteProtocolError):
        header_length(b"PROXY " + b"x" * 200)
    with pytest.raises(connserver.RemoteProtocolError):
        header_length(V2_SIGNATURE + b"\x21\x11\xff\xff")
    with pytest.raises(connserver.RemoteProtocolError):
        header_length(b"GET / HTTP/1.1\r\n")
    assert header_length(b"PRO") is None and header_length(V2_SIGNATURE[:5]) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(data):
    """Any input gives a header or a RemoteProtocolError, never another exception."""
    try:
        length = header_length(data)
        if length is not None and len(data) >= length:
            parse(data[:length])
    except connserver.RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 15), st.integers(0, 255), st.binary(max_size=64))
def test_mutated_v2_headers_never_crash(version_command, family, body):
    """v2 headers with any version, command, family and body parse or are refused cleanly."""
    data = V2_SIGNATURE + bytes([version_command, family]) + struct.pack("!H", len(body)) + body
    try:
        parse(data[:header_length(data)])
    except connserver.RemoteProtocolError:
        pass


def test_proxy_protocol_requires_trusted_proxies():
    """Turning PROXY on without trusted proxies is a configuration error."""
    with pytest.raises(connserver.ConfigError, match="trusted_proxy"):
        connserver.Config(proxy_protocol=True)
    with pytest.raises(connserver.ConfigError, match="trusted_proxy"):
        connserver.Config(proxy_protocol=True, trusted_proxy=["not-an-ip"])
