"""The fast paths: DATA and HEADERS frames we serialize ourselves instead of through h2.

h2's send path copies a DATA payload several times and runs two state machines per frame, and
its send_headers encodes through hpack, checking and normalizing as it goes: profiled, these
were the largest Python costs of streaming and of a unary answer. So the common cases skip
them: a message that fits the windows goes out as DATA frames packed here (frame header and
gRPC prefix together, the payload never copied), and our response headers and trailers as one
HEADERS frame of HPACK literals (fields.encode_block). h2's books are kept as h2 keeps them
(windows charged, state machines driven) by the functions of h2_internals, so that h2 stays
right for every frame it still sends. Anything unusual (a window too small, a stream not in a
sending state, a block needing CONTINUATION, a pending table size update) goes through h2.

`FastPaths` is a base of the connection (see core.GrpcConnection), so the paths read its state
directly.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import h2.exceptions

from .fields import encode_block
from .framing import PREFIX_BYTES
from .h2_internals import (
    emit_data,
    emit_headers,
    forgotten,
    literal_headers_stream,
    whole_data_stream,
)
from .scanner import END_HEADERS, END_STREAM, FRAME_HEADER, HEADERS_TYPE

if TYPE_CHECKING:
    import h2.connection

# A DATA frame's header (no flags) followed by an uncompressed message's gRPC prefix.
_DATA_FRAME_AND_PREFIX = struct.Struct(">IBIBI")


class FastPaths:
    """The connection provides `_h2`, `_out` (output serialized past h2, joined by
    data_to_send()), `_terminated` and `_ping_forgiven` (we sent HEADERS or DATA)."""

    _h2: h2.connection.H2Connection
    _out: list[bytes | memoryview]
    _terminated: bool
    _ping_forgiven: bool

    def _send_whole(self, stream_id: int, payload: bytes) -> bool:
        """The common case, fast: a message that fits the windows goes out at once, as one
        DATA frame with its frame header and gRPC prefix packed together, or, to a peer whose
        frames are smaller (HTTP/2's default is 16 KiB), as consecutive full frames sliced from
        the payload without copying it. False when the general path must run: it queues,
        splits and defers as the windows say."""
        if self._terminated:
            return False
        size = PREFIX_BYTES + len(payload)
        h2_stream = whole_data_stream(self._h2, stream_id, size)
        if h2_stream is None:
            return False
        frame_bytes = self._h2.max_outbound_frame_size
        first = min(size, frame_bytes)
        pieces: list[bytes | memoryview] = [
            _DATA_FRAME_AND_PREFIX.pack(first << 8, 0, stream_id, 0, len(payload))
        ]
        if size <= frame_bytes:
            pieces.append(payload)
        else:
            view = memoryview(payload)
            start = first - PREFIX_BYTES
            pieces.append(view[:start])
            while start < len(payload):
                part = view[start : start + frame_bytes]
                pieces += (FRAME_HEADER.pack(len(part) << 8, 0, stream_id), part)
                start += frame_bytes
        self._ping_forgiven = True
        emit_data(self._h2, h2_stream, self._out, pieces, size)
        return True

    def _send_header_block(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False
    ) -> None:
        """h2's send_headers for a stream h2 knows, cheaper (see fields.encode_block): the same
        state transitions, which raise what h2 would raise, and one HEADERS frame of literals.
        A block that needs CONTINUATION frames, and the first block after the peer resized the
        HPACK table (h2's encoder must announce that), go through h2.

        Only the server sends header blocks here, each on a stream the client opened: one h2
        has forgotten is gone (h2 reset it while the events of the read that did so were still
        being dispatched), and raises what a closed stream raises (streams.STREAM_GONE), since
        h2's send_headers would take its id for a new stream (TooManyStreamsError, at best)."""
        if forgotten(self._h2, stream_id):
            raise h2.exceptions.StreamClosedError(stream_id)
        block = encode_block(headers)
        h2_stream = literal_headers_stream(self._h2, stream_id, len(block))
        if h2_stream is None:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
            return
        flags = END_HEADERS | END_STREAM if end_stream else END_HEADERS
        frame = FRAME_HEADER.pack(len(block) << 8 | HEADERS_TYPE, flags, stream_id) + block
        emit_headers(self._h2, h2_stream, self._out, frame, end_stream=end_stream)
        self._ping_forgiven = True
