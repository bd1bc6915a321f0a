"""The server's TLS context, made once at start-up from the configuration.

The listener is never wrapped: each connection's handshake runs on its own
thread (see :meth:`connserver.Connection.start_tls`), so a client that never
sends a ClientHello stalls only its own thread, until ``handshake_timeout``.
"""

from __future__ import annotations

import os
import ssl

from .config import Config
from .errors import ConfigError

__all__ = ["server_context"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


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
