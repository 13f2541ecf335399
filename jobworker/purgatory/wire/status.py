"""gRPC status codes, the application error, and the status-related header codecs.

Spec: grpc/grpc doc/statuscodes.md (the codes), doc/PROTOCOL-HTTP2.md (`grpc-status`,
`grpc-message` percent-encoding, RST_STREAM mapping) and doc/http-grpc-status-mapping.md (what a
client synthesizes when a response carries no `grpc-status`).
"""

from __future__ import annotations

import enum
import re

from jobworker.purgatory.wire.metadata import Metadata, header_bytes


@enum.unique
class Status(enum.IntEnum):
    """The 17 canonical gRPC status codes; the value is what `grpc-status` carries."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """An RPC that ended with a non-OK status: raised by handlers, surfaced by the client.

    The message travels as `grpc-message` (so it reaches the peer: never put internals in it);
    `trailers` is extra custom metadata sent with the status, e.g. `grpc-status-details-bin`.
    """

    def __init__(self, status: Status, message: str = "", *, trailers: Metadata = ()) -> None:
        status = Status(status)
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.trailers = tuple(trailers)

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}" if self.message else self.status.name


def parse_grpc_status(value: bytes | str) -> Status:
    """The `grpc-status` header as a Status; UNKNOWN when unparsable or out of range.

    statuscodes.md: "Error parsing returned status -> UNKNOWN". Never raises, because the
    trailers are the last word on a call and must always yield some status.
    """
    raw = header_bytes(value)
    if not re.fullmatch(rb"[0-9]{1,3}", raw):
        return Status.UNKNOWN
    try:
        return Status(int(raw))
    except ValueError:
        return Status.UNKNOWN


# Percent-Byte-Unencoded: 0x20-0x7E except "%"; everything else (and all non-ASCII UTF-8
# bytes) travels as %XX with uppercase hex.
_MUST_ESCAPE = re.compile(r"[^\x20-\x24\x26-\x7e]")
_ESCAPE_TABLE = [chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in range(256)]
_ESCAPED_BYTE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")


def encode_grpc_message(text: str) -> str:
    """Percent-encode a status message for the `grpc-message` header (UTF-8, then %XX).

    Lone surrogates (which have no UTF-8 form) become "?": this runs on the error path and must
    not itself fail.
    """
    if not _MUST_ESCAPE.search(text):
        return text
    return "".join(_ESCAPE_TABLE[b] for b in text.encode("utf-8", "replace"))


def decode_grpc_message(value: str | bytes) -> str:
    """Decode a `grpc-message` header leniently; never raises.

    The spec forbids failing or discarding the message on bad input. Valid %XX escapes are
    decoded (hex in either case); a "%" not followed by two hex digits stays as is. Bytes that do
    not form UTF-8, whether escaped or raw, come back as "%XX" too, so nothing is lost.
    """
    raw = header_bytes(value)
    if b"%" in raw:
        raw = _ESCAPED_BYTE.sub(lambda m: bytes((int(m[1], 16),)), raw)
    text = raw.decode("utf-8", "surrogateescape")
    return _UNDECODABLE.sub(lambda m: f"%{ord(m[0]) - 0xDC00:02X}", text)


# doc/http-grpc-status-mapping.md. Only for responses without grpc-status; not symmetric.
_HTTP_TO_STATUS = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    431: Status.INTERNAL,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}


def status_from_http(http_status: int) -> Status:
    """The status a client synthesizes for a response that has no `grpc-status`.

    Every code outside the table, 200 included, is UNKNOWN: a truly OK gRPC response always
    carries `grpc-status: 0`.
    """
    return _HTTP_TO_STATUS.get(http_status, Status.UNKNOWN)


# PROTOCOL-HTTP2.md, "Errors": RST_STREAM error code -> status, as seen by a client.
_H2_ERROR_TO_STATUS = {
    0x7: Status.UNAVAILABLE,  # REFUSED_STREAM: nothing was processed; safe to retry
    0x8: Status.CANCELLED,  # CANCEL (from a server)
    0xB: Status.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: Status.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


def status_from_h2_error(error_code: int) -> Status:
    """The status for a stream reset by the peer with this HTTP/2 error code.

    Everything not listed (NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ...) is INTERNAL.
    """
    return _H2_ERROR_TO_STATUS.get(error_code, Status.INTERNAL)
