"""The frame scanner: every budget a frame header can decide, decided on its 9 bytes.

Before h2 parses a byte, the scanner walks the frame headers of what was read, and refuses
(GOAWAY) a frame over the size limit, a header block over its size or CONTINUATION budget,
acknowledgements piling up unread, resets beyond the rate limit, a PING policy breach; it
refuses a stream over the stream limit alone (REFUSED_STREAM). Bodies are not copied: h2 gets
the whole read in one call unless a decision needs the events of the frames before it, or a
frame must be taken out: a GOAWAY that h2 must not see (see _on_goaway), because h2 closes its
whole connection on any GOAWAY it receives (python-hyper/h2#1181), and the DATA frames of a
stream in full flow (see _take_data), which are the bulk of a stream's bytes: h2 would copy
each into its frame buffer, copy its body out again and run two state machines for it, where
the connection only needs the body, as it arrives, in pieces if the frame spans reads.

The budgets are here too, as DEFAULT_* constants: what one peer can make us hold or do (RFC
9113 §10.5). `FrameScanner` is a base of the connection, not an object of its own, so that the
per-frame loop reads the connection's state without a layer in between.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import h2.errors

if TYPE_CHECKING:
    from .events import Event

# --- budgets: what one peer can make us hold or do (RFC 9113 §10.5) ---------------------------
# Header lists, as SETTINGS_MAX_HEADER_LIST_SIZE announces them (decoded: names, values and 32
# bytes per field, RFC 9113 §6.5.2). A block over it that decodes within the hard budget below
# costs only its stream (trailers-only RESOURCE_EXHAUSTED): HPACK state stays in sync.
DEFAULT_MAX_HEADER_LIST_BYTES = 16 * 2**10
# The encoded block (HEADERS or PUSH_PROMISE plus its CONTINUATIONs), counted on the frame
# headers as they arrive, before a byte of it is decoded. A sane encoder never needs more than
# the decoded size (a literal's overhead is a few bytes, a field counts 32); twice that is the
# slack Go's net/http2 allows (its CVE-2023-45288 fix). Over it: GOAWAY COMPRESSION_ERROR, since
# a block we will not decompress leaves HPACK out of sync (RFC 9113 §4.3).
HEADER_BLOCK_FACTOR = 2
DEFAULT_MAX_HEADER_BLOCK_BYTES = HEADER_BLOCK_FACTOR * DEFAULT_MAX_HEADER_LIST_BYTES
# Where hpack stops decoding (it checks as it goes): also a connection error, COMPRESSION_ERROR.
HEADER_DECODE_FACTOR = 4
DEFAULT_MAX_HEADER_DECODE_BYTES = HEADER_DECODE_FACTOR * DEFAULT_MAX_HEADER_LIST_BYTES
# The two follow the announced list size unless given (see header_budgets).
# CONTINUATION frames per block: a legitimate peer needs one or two at our block budget; h2
# would buffer 64 before refusing. Beyond: GOAWAY ENHANCE_YOUR_CALM.
DEFAULT_MAX_CONTINUATION_FRAMES = 16
# PING and SETTINGS each make h2 queue an acknowledgement, and h2 answers every frame on a
# stream already reset with an RST_STREAM(STREAM_CLOSED) of its own. These answers, queued and
# not yet taken by data_to_send() (see there for the transport's side), are bounded like Go's
# net/http2 (maxQueuedControlFrames); beyond: GOAWAY ENHANCE_YOUR_CALM. Acknowledgements are
# counted on the frame headers, before h2 queues them; h2's RST_STREAM answers as h2 queues
# them (which streams it answers is h2's to know), so a single read can go past the budget by
# the frames it holds before the GOAWAY.
DEFAULT_MAX_PENDING_ACKS = 10_000
# Stream resets by the peer, streams we refuse (over MAX_CONCURRENT_STREAMS) and requests we
# reset as malformed draw from a token bucket (CVE-2023-44487, rapid reset): nghttp2's figures,
# a burst of 1000 refilled at 33 per second of the transport's clock. Empty: GOAWAY
# ENHANCE_YOUR_CALM. Without a clock (`now` never given) the burst is the connection's lifetime
# allowance.
DEFAULT_MAX_RESET_BURST = 1000
DEFAULT_RESET_REFILL_PER_S = 33.0
# grpc-go's keepalive.EnforcementPolicy defaults: a PING sooner than MinTime after the last one
# is a strike (sooner than 2 h when no call is open: PermitWithoutStream false); sending HEADERS
# or DATA forgives them; the third strike is GOAWAY ENHANCE_YOUR_CALM "too_many_pings". Needs
# the transport's clock (`now`).
DEFAULT_MIN_PING_INTERVAL_S = 300.0
DEFAULT_IDLE_PING_INTERVAL_S = 7200.0
DEFAULT_MAX_PING_STRIKES = 2

# What a client sends first (RFC 9113 §3.4). Anything else is a connection error
# PROTOCOL_ERROR. The RFC lets the GOAWAY be omitted then (the peer does not speak HTTP/2), and
# Go's net/http2 and h2o just close; we send it: our SETTINGS are already out, and a client
# whose HTTP/2 is broken learns why from its debug data, for a few bytes once per connection.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# length (24 bits) and type share the first word; then flags and stream id: 9 bytes.
FRAME_HEADER = struct.Struct(">IBI")
_FRAME_WORD = struct.Struct(">I")  # length and type
_GOAWAY_FIXED = struct.Struct(">II")  # last stream id, error code; then debug data

DATA_TYPE = 0x0
HEADERS_TYPE = 0x1
_RST_STREAM_TYPE = 0x3
_SETTINGS_TYPE = 0x4
_PUSH_PROMISE_TYPE = 0x5
_PING_TYPE = 0x6
_GOAWAY_TYPE = 0x7
_CONTINUATION_TYPE = 0x9
_ACK = 0x1
END_STREAM = 0x1
END_HEADERS = 0x4
_PADDED = 0x8
# DATA frames that change a stream's state (END_STREAM) or carry padding go through h2.
_DATA_VIA_H2_FLAGS = END_STREAM | _PADDED


def header_budgets(
    max_header_list_bytes: int,
    max_header_block_bytes: int | None = None,
    max_header_decode_bytes: int | None = None,
) -> tuple[int, int]:
    """The encoded-block and decoding budgets that go with an announced header-list limit:
    those not given follow it (HEADER_BLOCK_FACTOR and HEADER_DECODE_FACTOR times it); those
    given may not be below it. Below it, a list the announcement allows would cost the whole
    connection (COMPRESSION_ERROR) instead of being accepted, and a list just over it would
    too instead of costing its stream: ValueError, naming both."""
    block = (
        HEADER_BLOCK_FACTOR * max_header_list_bytes
        if max_header_block_bytes is None
        else max_header_block_bytes
    )
    decode = (
        HEADER_DECODE_FACTOR * max_header_list_bytes
        if max_header_decode_bytes is None
        else max_header_decode_bytes
    )
    for name, value in (("max_header_block_bytes", block), ("max_header_decode_bytes", decode)):
        if value < max_header_list_bytes:
            raise ValueError(
                f"{name} ({value}) is below max_header_list_bytes ({max_header_list_bytes}): "
                "header lists the announced limit allows would break the connection"
            )
    return block, decode


class Refusal(Exception):
    """The peer broke a budget or HTTP/2 itself at a frame header: a connection error."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


class FrameScanner:
    """The scanner's state and walk, as a base of the connection. The connection provides
    `_streams` (its open streams), `max_concurrent_streams`, `client_side`, `_feed_h2` (hand
    bytes to h2 and dispatch its events) and the hooks below."""

    client_side: bool
    max_concurrent_streams: int
    _streams: dict
    _terminated: bool

    def _init_scanner(
        self,
        *,
        max_frame_bytes: int,
        max_header_block_bytes: int,
        max_continuation_frames: int,
        max_pending_acks: int,
        max_reset_burst: int,
        reset_refill_per_s: float,
    ) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._max_block_bytes = max_header_block_bytes
        self._max_continuations = max_continuation_frames
        self._max_pending_acks = max_pending_acks
        self._reset_burst = max_reset_burst
        self._reset_refill_per_s = reset_refill_per_s
        self._carry = b""  # unfed bytes: a split frame header, or a GOAWAY's fixed part
        self._preface = b"" if self.client_side else PREFACE  # what is still to come of it
        self._skip = len(self._preface)  # the preface, then the current frame's body
        self._drop = 0  # the rest of a frame taken out (a GOAWAY's debug data): h2 never sees it
        self._data_left = 0  # the rest of a DATA frame's body taken past h2 (see _take_data)
        self._data_stream = 0  # and its stream
        self._frame_bytes = self._skip  # the size of what _skip counts down
        self._block_stream = 0  # the stream of a header block still open, else 0
        self._block_bytes = 0
        self._block_frames = 0
        self._highest_opened = 0
        self._pending_acks = 0  # ACKs h2 queued since the last data_to_send()
        self._reset_tokens = float(max_reset_burst)
        self._now: float | None = None

    @property
    def buffered_input_bytes(self) -> int:
        """Received bytes held inside the connection and not yet turned into events, at most:
        a split frame header or a held frame, the part of a frame received so far, the frames
        of an unfinished header block."""
        partial = self._frame_bytes - self._skip if self._skip else 0
        return len(self._carry) + partial + self._block_bytes + 9 * self._block_frames

    def _tick(self, now: float) -> None:
        if self._now is not None and now > self._now:
            refilled = self._reset_tokens + (now - self._now) * self._reset_refill_per_s
            self._reset_tokens = min(float(self._reset_burst), refilled)
        self._now = now

    def _scan(self, data: bytes, events: list[Event]) -> None:
        """Read the frame headers before h2 parses anything, and feed h2 what passes.

        Every budget that a frame header can decide is decided here, on its 9 bytes, before
        its body is buffered or a header block decoded: frame size, header block size and
        CONTINUATION count, acknowledgements owed, resets, the stream limit. Bodies pass
        through untouched, and h2 gets the whole read in one call unless a decision needs
        the events of the frames before it (a new stream at the stream limit), or a frame
        must be taken out (a GOAWAY, see _on_goaway)."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        view = memoryview(data)
        end = len(view)
        pos = start = 0
        if self._preface:
            expected = self._preface[:end]
            if view[: len(expected)] != expected:
                raise Refusal(h2.errors.ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 preface")
            self._preface = self._preface[len(expected) :]
        if self._drop:
            pos = start = min(self._drop, end)
            self._drop -= pos
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
        elif self._data_left:
            pos = start = min(self._data_left, end)
            self._data_left -= pos
            self._on_frame_data(self._data_stream, view[:pos], events)
        opened = 0
        while end - pos >= 9:
            word, flags, stream_id = FRAME_HEADER.unpack_from(view, pos)
            length = word >> 8
            frame_type = word & 0xFF
            if length > self._max_frame_bytes:
                raise Refusal(
                    h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes}",
                )
            if frame_type == DATA_TYPE:
                if not flags & _DATA_VIA_H2_FLAGS and not self._block_stream:
                    # h2 must have read the frames before it: they may open, reset or
                    # close its stream.
                    self._feed_h2(view[start:pos], events)
                    start = pos
                    opened = 0
                    stream_id &= 0x7FFFFFFF
                    if self._take_data(stream_id, length):
                        body = pos + 9
                        pos = body + length
                        self._on_frame_data(stream_id, view[body : min(pos, end)], events)
                        if pos > end:
                            self._data_left = pos - end
                            self._data_stream = stream_id
                            pos = end
                        start = pos
                        continue
            else:
                stream_id &= 0x7FFFFFFF
                if frame_type == HEADERS_TYPE or frame_type == _PUSH_PROMISE_TYPE:
                    self._open_block(stream_id, flags, length)
                    if stream_id > self._highest_opened and not self.client_side:
                        self._highest_opened = stream_id
                        opened += 1
                        if len(self._streams) + opened > self.max_concurrent_streams:
                            # Let the streams before it open and close first, then count.
                            self._feed_h2(view[start:pos], events)
                            start = pos
                            opened = 1
                            if len(self._streams) + 1 > self.max_concurrent_streams:
                                self._refuse_stream(stream_id)
                                opened = 0
                elif frame_type == _CONTINUATION_TYPE:
                    if stream_id == self._block_stream:
                        self._continue_block(flags, length)
                elif frame_type == _PING_TYPE or frame_type == _SETTINGS_TYPE:
                    if not flags & _ACK:
                        self._owe(1, "PING and SETTINGS acknowledgements")
                        if frame_type == _PING_TYPE and self._now is not None:
                            self._judge_ping(self._now)
                elif frame_type == _RST_STREAM_TYPE:
                    self._spend_reset()
                elif (
                    frame_type == _GOAWAY_TYPE
                    and stream_id == 0
                    and length >= 8
                    and not self._block_stream
                ):
                    # A well-formed GOAWAY (h2 refuses the others, as it should).
                    if end - pos < 17:
                        break  # held until its fixed part is in: it may have to be taken out
                    last_stream_id, error_code = _GOAWAY_FIXED.unpack_from(view, pos + 9)
                    debug = bytes(view[pos + 17 : min(end, pos + 9 + length, pos + 17 + 256)])
                    if self._on_goaway(
                        last_stream_id & 0x7FFFFFFF, error_code, debug, events, view[start:pos]
                    ):
                        if self._terminated:
                            return  # the peer is tearing down: what follows is not read
                        pos += 9 + length
                        if pos > end:
                            self._drop = pos - end
                            pos = end
                        start = pos
                        opened = 0
                        continue
            pos += 9 + length
        if pos > end:
            self._skip = pos - end
            self._frame_bytes = 9 + length
            pos = end
        elif pos < end:
            self._carry = bytes(view[pos:])  # a split header (< 9 bytes) or a held GOAWAY
        self._feed_h2(view[start:pos], events)

    def _open_block(self, stream_id: int, flags: int, length: int) -> None:
        if length > self._max_block_bytes:
            raise Refusal(
                h2.errors.ErrorCodes.COMPRESSION_ERROR,
                f"header block of {length} bytes exceeds the limit of {self._max_block_bytes}",
            )
        if not flags & END_HEADERS and not self._block_stream:
            self._block_stream = stream_id
            self._block_bytes = length
            self._block_frames = 1

    def _continue_block(self, flags: int, length: int) -> None:
        self._block_bytes += length
        self._block_frames += 1
        if self._block_bytes > self._max_block_bytes:
            raise Refusal(
                h2.errors.ErrorCodes.COMPRESSION_ERROR,
                f"header block of {self._block_bytes} bytes or more exceeds the limit of "
                f"{self._max_block_bytes}",
            )
        if self._block_frames > 1 + self._max_continuations:
            raise Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                f"header block in more than {self._max_continuations} CONTINUATION frames",
            )
        if flags & END_HEADERS:
            self._block_stream = self._block_bytes = self._block_frames = 0

    def _owe(self, frames: int, what: str) -> None:
        """Frames the peer's frames make us send: a peer that never reads them may not make
        them pile up past the budget."""
        self._pending_acks += frames
        if self._pending_acks > self._max_pending_acks:
            raise Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                f"more than {self._max_pending_acks} {what} queued and not read",
            )

    def _count_answers(self, output: bytes) -> None:
        """Count the RST_STREAM frames in `output`, what h2 queued while it read: its answers
        to frames on streams already reset."""
        pos, end, answers = 0, len(output), 0
        while end - pos >= 9:
            word = _FRAME_WORD.unpack_from(output, pos)[0]
            if word & 0xFF == _RST_STREAM_TYPE:
                answers += 1
            pos += 9 + (word >> 8)
        if answers:
            self._owe(answers, "acknowledgements and RST_STREAM answers")

    def _spend_reset(self) -> None:
        """A stream reset by the peer, or one we refused or reset because of it."""
        self._reset_tokens -= 1
        if self._reset_tokens < 0:
            raise Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too many reset or refused streams"
            )

    def _refuse_stream(self, stream_id: int) -> None:
        raise NotImplementedError

    def _judge_ping(self, now: float) -> None:
        """The server's PING policy (grpc-go's); the client judges no pings."""

    def _on_goaway(
        self,
        last_stream_id: int,
        error_code: int,
        debug: bytes,
        events: list[Event],
        before: memoryview,
    ) -> bool:
        """A well-formed GOAWAY (its debug data cut short): True if it is taken out of the byte
        stream, after feeding h2 `before` (the frames ahead of it); False to let h2 see it."""
        raise NotImplementedError

    def _feed_h2(self, data: bytes | memoryview, events: list[Event]) -> None:
        raise NotImplementedError

    def _take_data(self, stream_id: int, length: int) -> bool:
        """Whether a DATA frame (unpadded, no END_STREAM, outside any header block) of `length`
        bytes on `stream_id` is taken past h2; if so, h2's books are kept as if it had read it
        and its body goes to _on_frame_data as it arrives."""
        raise NotImplementedError

    def _on_frame_data(self, stream_id: int, data: memoryview, events: list[Event]) -> None:
        """A piece of the body of a DATA frame taken past h2 (see _take_data)."""
        raise NotImplementedError
