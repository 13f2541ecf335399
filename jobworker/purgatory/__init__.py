"""purgatory — jobworker's gRPC transport: gRPC over HTTP/2 (h2) over TLS 1.3 (pyOpenSSL) on Trio.

Knows nothing about jobs. The names below are its public API; `wire/` is the sans-IO protocol
core, `tls/` the TLS stream, `testing` a kit for tests (in-memory pairs, loopback servers,
certificates).

    server = Server(methods, tls=TLSConfig.server(...), identify=..., errors=...,
                    limits=ServerLimits(max_concurrent_streams=50))
    async with open_channel(host, port, tls=TLSConfig.client(...)) as channel:
        reply = await channel.unary("/pkg.Svc/Method", request, Reply, timeout_s=5)
"""

from .client import Channel, ResponseStream, open_channel, open_channel_over
from .limits import ServerLimits, default_max_connections
from .server import ConnectionInfo, ErrorMapper, RpcMethod, Server, ServerCall
from .tls import (
    TLSCertificateRejected,
    TLSConfig,
    TLSConfigError,
    TLSError,
    TLSHandshakeTimeout,
    TLSNegotiationFailed,
    TLSPeerClosed,
    TLSStream,
)
from .wire import DEFAULT_MAX_MESSAGE_BYTES, GrpcError, Metadata, Status

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Channel",
    "ConnectionInfo",
    "ErrorMapper",
    "GrpcError",
    "Metadata",
    "ResponseStream",
    "RpcMethod",
    "Server",
    "ServerCall",
    "ServerLimits",
    "Status",
    "TLSCertificateRejected",
    "TLSConfig",
    "TLSConfigError",
    "TLSError",
    "TLSHandshakeTimeout",
    "TLSNegotiationFailed",
    "TLSPeerClosed",
    "TLSStream",
    "default_max_connections",
    "open_channel",
    "open_channel_over",
]
