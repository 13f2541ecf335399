"""purgatory — jobworker's gRPC transport: gRPC over HTTP/2 (h2) over TLS 1.3 (pyOpenSSL) on Trio.

Knows nothing about jobs. The names below are its public API; `wire/` is the sans-IO protocol
core, `tls/` the TLS stream, `testing` a kit for tests (in-memory pairs, loopback servers,
certificates).

    server = Server(methods, tls=TLSConfig.server(...), identify=..., errors=...,
                    limits=ServerLimits(max_concurrent_streams=50))
    async with open_channel(host, port, tls=TLSConfig.client(...)) as channel:
        reply = await channel.unary("/pkg.Svc/Method", request, Reply, timeout_s=5)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Channel, ResponseStream, open_channel, open_channel_over
    from .limits import ServerLimits, default_max_connections
    from .server import (
        CallEnded,
        CallObserver,
        ConnectionInfo,
        ErrorMapper,
        RpcMethod,
        Server,
        ServerCall,
    )
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

# Each name's module, imported on first use (PEP 562): a client loads the client, the TLS
# stream and the wire, never the server and its budgets.
_HOMES = {
    "Channel": "client",
    "ResponseStream": "client",
    "open_channel": "client",
    "open_channel_over": "client",
    "ServerLimits": "limits",
    "default_max_connections": "limits",
    "CallEnded": "server",
    "CallObserver": "server",
    "ConnectionInfo": "server",
    "ErrorMapper": "server",
    "RpcMethod": "server",
    "Server": "server",
    "ServerCall": "server",
    "TLSCertificateRejected": "tls",
    "TLSConfig": "tls",
    "TLSConfigError": "tls",
    "TLSError": "tls",
    "TLSHandshakeTimeout": "tls",
    "TLSNegotiationFailed": "tls",
    "TLSPeerClosed": "tls",
    "TLSStream": "tls",
    "DEFAULT_MAX_MESSAGE_BYTES": "wire",
    "GrpcError": "wire",
    "Metadata": "wire",
    "Status": "wire",
}

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CallEnded",
    "CallObserver",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{home}", __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
