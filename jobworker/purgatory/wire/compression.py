"""Per-message compression (`grpc-encoding`): identity and gzip.

Spec: grpc/grpc doc/PROTOCOL-HTTP2.md ("Message-Encoding", "Compressed-Flag") and
doc/compression.md. Each message is compressed on its own; no context spans messages.

Decompression is where a small message becomes a large one, so the size limit is applied to the
*output*, incrementally: a zip bomb stops at `max_bytes + 1` bytes of output, not at 1 GiB.
"""

from __future__ import annotations

import zlib

from jobworker.purgatory.wire.errors import MessageTooLarge, ProtocolError, UnsupportedEncoding
from jobworker.purgatory.wire.framing import Message

SUPPORTED_ENCODINGS = ("identity", "gzip")
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip container only, not raw deflate or zlib


def accept_encoding_header() -> str:
    """The `grpc-accept-encoding` value advertising what `decode_payload` understands."""
    return ",".join(SUPPORTED_ENCODINGS)


def _normalize(encoding: str | None) -> str:
    return "identity" if encoding is None else encoding.strip().lower()


def decode_payload(encoding: str | None, payload: bytes, *, max_bytes: int) -> bytes:
    """Decompress one message body sent with `grpc-encoding: encoding` (None means identity).

    Raises `MessageTooLarge` when the result would exceed `max_bytes` (its `declared_bytes` is
    then a lower bound), `ProtocolError` for corrupt data, `UnsupportedEncoding` otherwise.
    """
    name = _normalize(encoding)
    if name == "identity":
        if len(payload) > max_bytes:
            raise MessageTooLarge(len(payload), max_bytes)
        return payload
    if name == "gzip":
        return _gunzip(payload, max_bytes)
    raise UnsupportedEncoding(encoding or "")


def encode_payload(encoding: str | None, payload: bytes) -> bytes:
    """Compress one message body for `grpc-encoding: encoding`; the sender sets the flag."""
    name = _normalize(encoding)
    if name == "identity":
        return payload
    if name == "gzip":
        compressor = zlib.compressobj(wbits=_GZIP_WBITS)
        return compressor.compress(payload) + compressor.flush()
    raise UnsupportedEncoding(encoding or "")


def decode_message(message: Message, encoding: str | None, *, max_bytes: int) -> bytes:
    """The body of a received message, honouring its Compressed-Flag.

    A flagged message on a stream without a real encoding is a `ProtocolError` (the spec: with
    no Message-Encoding the flag must be 0); an unflagged one is passed through.
    """
    if not message.compressed:
        return message.payload
    if _normalize(encoding) == "identity":
        raise ProtocolError("compressed flag set but the stream has no grpc-encoding")
    return decode_payload(encoding, message.payload, max_bytes=max_bytes)


def _gunzip(payload: bytes, max_bytes: int) -> bytes:
    # Concatenated gzip members are one valid gzip stream (RFC 1952), so keep going while input
    # remains; each member consumes at least its 18-byte header and trailer, so this terminates.
    pieces: list[bytes] = []
    output_bytes = 0
    data = payload
    try:
        while True:
            inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
            # max_length is at least 1 here (0 would mean "unlimited" to zlib). When it is reached
            # we have seen one byte too many, which is all we need to know.
            piece = inflater.decompress(data, max_bytes - output_bytes + 1)
            output_bytes += len(piece)
            if output_bytes > max_bytes:
                raise MessageTooLarge(output_bytes, max_bytes)
            if not inflater.eof:
                raise ProtocolError("truncated gzip message")
            pieces.append(piece)
            data = inflater.unused_data
            if not data:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
    except zlib.error as exc:
        raise ProtocolError(f"corrupt gzip message: {exc}") from None
