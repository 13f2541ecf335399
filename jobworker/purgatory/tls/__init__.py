"""Mutual TLS 1.3 as a `trio.abc.Stream`, over any trio stream or straight on a socket.

- config.py: `TLSConfig` (the OpenSSL context, certificates and CAs), the verify and ALPN
  callbacks, the name checks, and the typed errors a failure becomes;
- stream.py: `TLSStream`, what both engines share (state, handshake, reading, closing);
- socket_engine.py: OpenSSL on a socket's descriptor (production);
- memory_engine.py: OpenSSL between memory BIOs, over any stream (tests, proxies).
- openssl_internals.py: what tls relies on inside pyOpenSSL beyond its API (reading records
  straight into a reused buffer), checked by tests.

``TLSStream(transport, config)`` picks the engine once, by the transport.
"""

from .config import (
    ALPN_PROTOCOL,
    TLSCertificateRejected,
    TLSConfig,
    TLSConfigError,
    TLSError,
    TLSHandshakeTimeout,
    TLSNegotiationFailed,
    TLSPeerClosed,
)
from .memory_engine import SEND_CHUNK_BYTES, MemoryTLSStream
from .socket_engine import SocketTLSStream
from .stream import CLOSE_NOTIFY_TIMEOUT_S, RECEIVE_BYTES, TLSStream

__all__ = [
    "ALPN_PROTOCOL",
    "CLOSE_NOTIFY_TIMEOUT_S",
    "RECEIVE_BYTES",
    "SEND_CHUNK_BYTES",
    "MemoryTLSStream",
    "SocketTLSStream",
    "TLSCertificateRejected",
    "TLSConfig",
    "TLSConfigError",
    "TLSError",
    "TLSHandshakeTimeout",
    "TLSNegotiationFailed",
    "TLSPeerClosed",
    "TLSStream",
]
