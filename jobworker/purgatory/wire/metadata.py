"""Custom metadata <-> HTTP/2 header fields.

Spec: grpc/grpc doc/PROTOCOL-HTTP2.md ("Custom-Metadata"). Keys are `[0-9a-z_.-]+`; keys ending in
`-bin` carry arbitrary bytes as base64 (we send it unpadded, accept both); every other value is
printable ASCII (0x20-0x7E).

Two rules shape this module:

* What `decode_metadata` returns, `encode_metadata` accepts. The spec asks that an application
  may echo received metadata back without tripping an error, so anything we could not send
  (a value with bytes outside 0x20-0x7E, a key outside the gRPC grammar) is dropped on receipt
  rather than passed up.
* Transport headers are not metadata. Pseudo-headers, `grpc-*` and the HTTP headers that gRPC or
  HTTP/2 itself owns are refused on send and dropped on receipt; the connection layer reads
  those directly from the header list.

The one exception is `grpc-status-details-bin` (a serialized `google.rpc.Status` with rich error
details). It is `grpc-`-prefixed but the application, not the transport, produces and consumes it
(grpcio exposes it as trailing metadata too), so it passes through in both directions, e.g. in
`GrpcError.trailers`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from jobworker.purgatory.wire.errors import ProtocolError

Metadata = tuple[tuple[str, str | bytes], ...]
"""Custom metadata in order, duplicates allowed: `str` values for ASCII keys, `bytes` for `-bin`."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Owned by HTTP/1.1 / HTTP/2 or by the gRPC call definition: never application metadata.
# (h2 would silently strip the connection-specific ones on send; refusing them is clearer.)
RESERVED_KEYS = frozenset(
    {
        "content-type",
        "content-length",
        "te",
        "user-agent",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    }
)

# Received names that are never metadata, skipped before any other work: what every gRPC request
# and response carries.
_TRANSPORT_NAMES = frozenset(
    {
        b":method",
        b":scheme",
        b":path",
        b":authority",
        b":status",
        b"content-type",
        b"te",
        b"user-agent",
        b"grpc-accept-encoding",
        b"grpc-encoding",
        b"grpc-timeout",
        b"grpc-status",
        b"grpc-message",
    }
)

_KEY_RE = re.compile(rb"[0-9a-z_.\-]+")
_ASCII_VALUE_RE = re.compile(rb"[\x20-\x7e]*")
_SURROUNDING_WS = b" \t"


def header_bytes(value: bytes | str) -> bytes:
    """A header name or value as bytes; h2 yields bytes, or str if given a header_encoding."""
    if isinstance(value, str):
        # surrogateescape: never raises, even for a str holding lone surrogates.
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def is_reserved_key(key: str) -> bool:
    """True for keys that belong to the transport rather than the application."""
    if key == STATUS_DETAILS_KEY:
        return False
    return key.startswith((":", "grpc-")) or key in RESERVED_KEYS


def encode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """Validate custom metadata and render it as HTTP/2 header fields.

    Keys are lowercased (HTTP/2 requires lowercase names). Raises `ValueError` naming the key for
    any entry we must not send: a key outside `[0-9a-z_.-]+`, a reserved key, a `-bin` value that
    is not bytes, or an ASCII value that is not a `str` of printable ASCII without leading or
    trailing whitespace (h2 would strip that whitespace, so the peer would see another value).
    Values are never echoed in the message: they may be credentials.
    """
    headers: list[tuple[bytes, bytes]] = []
    for key, value in metadata:
        if not isinstance(key, str) or not key.isascii():
            # isascii first: str.lower() maps e.g. KELVIN SIGN to "k".
            raise ValueError(f"metadata key {key!r} must be an ASCII str")
        name = key.lower()
        raw_name = name.encode("ascii")
        if not _KEY_RE.fullmatch(raw_name):
            raise ValueError(f"metadata key {key!r} must match [0-9a-z_.-]+")
        if is_reserved_key(name):
            raise ValueError(f"metadata key {key!r} is reserved for the transport")
        if name.endswith("-bin"):
            if not isinstance(value, bytes | bytearray | memoryview):
                raise ValueError(f"metadata value for binary key {key!r} must be bytes")
            headers.append((raw_name, base64.b64encode(value).rstrip(b"=")))
            continue
        if not isinstance(value, str):
            raise ValueError(f"metadata value for key {key!r} must be str (bytes need a -bin key)")
        if not value.isascii() or not _ASCII_VALUE_RE.fullmatch(raw := value.encode("ascii")):
            raise ValueError(f"metadata value for key {key!r} must be printable ASCII (0x20-0x7E)")
        if raw != raw.strip(_SURROUNDING_WS):
            raise ValueError(f"metadata value for key {key!r} has leading or trailing whitespace")
        headers.append((raw_name, raw))
    return headers


def decode_metadata(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Metadata:
    """Extract the custom metadata from a received header list, in order.

    Drops pseudo-headers, reserved and `grpc-*` headers (except `grpc-status-details-bin`),
    keys outside the gRPC grammar, and ASCII values with bytes outside 0x20-0x7E (the spec says
    not to fail the call for those). Surrounding whitespace of ASCII values is stripped.
    `-bin` values are split on "," (proxies may join duplicates) and base64-decoded, padded or
    not; undecodable base64 raises `ProtocolError`.
    """
    result: list[tuple[str, str | bytes]] = []
    for raw_key, raw_value in headers:
        if raw_key in _TRANSPORT_NAMES:
            continue
        key_bytes = header_bytes(raw_key).lower()
        if not _KEY_RE.fullmatch(key_bytes):
            continue  # pseudo-headers (":path"), and names gRPC cannot represent
        key = key_bytes.decode("ascii")
        if is_reserved_key(key):
            continue
        if key.endswith("-bin"):
            for part in header_bytes(raw_value).split(b","):
                result.append((key, _decode_base64(key, part.strip(_SURROUNDING_WS))))
            continue
        stripped = header_bytes(raw_value).strip(_SURROUNDING_WS)
        if not _ASCII_VALUE_RE.fullmatch(stripped):
            continue
        result.append((key, stripped.decode("ascii")))
    return tuple(result)


def _decode_base64(key: str, value: bytes) -> bytes:
    """Standard-alphabet base64, with or without padding; anything else is a ProtocolError."""
    unpadded = value.rstrip(b"=")
    if len(value) - len(unpadded) > 2 or len(unpadded) % 4 == 1:
        raise ProtocolError(f"invalid base64 in binary metadata {key!r}")
    try:
        return base64.b64decode(unpadded + b"=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        raise ProtocolError(f"invalid base64 in binary metadata {key!r}") from None
