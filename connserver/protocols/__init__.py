"""Protocols, sans-I/O: framing codecs, the PROXY header parser, TLS sessions.

Bytes in, events or bytes out; no sockets. The core drives them.
"""
