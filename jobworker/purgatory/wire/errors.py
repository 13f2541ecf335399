"""The wire layer's error family.

These are *transport* failures: the peer broke the gRPC framing or header rules, or sent more
than we agreed to hold. The connection driver turns them into a status (INTERNAL,
RESOURCE_EXHAUSTED, UNIMPLEMENTED) or an RST_STREAM; they never reach application handlers as
themselves. Application-level failures are `status.GrpcError`, a separate family.
"""

from __future__ import annotations


class WireError(Exception):
    """Base of everything the sans-IO codecs raise for bad input from the peer."""


class ProtocolError(WireError):
    """The peer violated the gRPC-over-HTTP/2 rules (bad prefix, bad base64, bad timeout...)."""


class MessageTooLarge(WireError):
    """A message is (or decompresses to) more than we are willing to buffer.

    `declared_bytes` is the length the peer announced in the prefix; when the size only becomes
    known while decompressing, it is a lower bound (decompression stops just past the limit).
    """

    def __init__(self, declared_bytes: int, max_bytes: int) -> None:
        super().__init__(declared_bytes, max_bytes)
        self.declared_bytes = declared_bytes
        self.max_bytes = max_bytes

    def __str__(self) -> str:
        return f"message of {self.declared_bytes} bytes exceeds the limit of {self.max_bytes} bytes"


class UnsupportedEncoding(WireError):
    """The peer used a `grpc-encoding` we do not implement (the server answers UNIMPLEMENTED)."""

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.encoding = encoding

    def __str__(self) -> str:
        return f"unsupported message encoding {self.encoding!r}"


class ConnectionBroken(WireError):
    """The connection is broken beyond repair; `data_to_send()` holds the GOAWAY to send."""
