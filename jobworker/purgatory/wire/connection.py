"""gRPC over one HTTP/2 connection, sans-IO: bytes in → events out; commands queue bytes.

Theory of operation
-------------------
`ServerConnection` and `ClientConnection` wrap an `h2.connection.H2Connection` and speak gRPC
(doc/PROTOCOL-HTTP2.md in grpc/grpc) on top of it. The transport feeds what it reads from the
socket to `receive_data()`, acts on the returned events, and writes `data_to_send()`. Nothing
here awaits, sleeps, reads a clock or touches a socket.

Inbound flow control is backpressure: the bytes of a *complete* message are handed back to the
peer (WINDOW_UPDATE) only when the consumer says it has taken the message (`acknowledge()` with
the event's `flow_controlled_bytes`, once per message). So a consumer that stops reading stops
its peer after one window of data, without holding up other streams. The bytes of a message
still being received are held back too while the consumer is behind, and released once it has
taken everything delivered: then they are all that blocks progress (a message larger than the
window would deadlock otherwise), and the decoder bounds them by the message size limit. Per
stream, buffered input is thus at most one window plus one message.

Outbound, each stream has an outbox: messages (prefix and payload, never copied) and finally
the trailers, handed to h2 in order as the stream and connection windows allow. The transport
waits while `outbound_pending(stream_id)` is non-zero — `OutboxDrained` says when to look again —
so each stream holds at most about one message beyond its window.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame
from hyperframe.frame import GoAwayFrame

from .compression import SUPPORTED_ENCODINGS, accept_encoding_header, decode_message
from .errors import MessageTooLarge, ProtocolError, UnsupportedEncoding, WireError
from .fields import Block, RepeatDecoder, block_problem, encode_block, header_list_size
from .framing import DEFAULT_MAX_MESSAGE_BYTES, PREFIX_BYTES, MessageDecoder, encode_message_parts
from .metadata import Metadata, decode_metadata, encode_metadata
from .status import (
    Status,
    decode_grpc_message,
    encode_grpc_message,
    parse_grpc_status,
    status_from_h2_error,
    status_from_http,
)
from .timeout import encode_grpc_timeout, parse_grpc_timeout

# Windows sized for throughput and bounded (never 2**31-1): per stream, a consumer that stops
# reading costs at most one stream window of buffered messages; the connection window caps the
# sum. The frame size lets a 64 KiB message travel as one DATA frame.
DEFAULT_STREAM_WINDOW_BYTES = 1 * 2**20
DEFAULT_CONNECTION_WINDOW_BYTES = 8 * 2**20
DEFAULT_MAX_FRAME_BYTES = 1 * 2**20
DEFAULT_MAX_CONCURRENT_STREAMS = 100

# --- budgets: what one peer can make us hold or do (RFC 9113 §10.5) ---------------------------
# Header lists, as SETTINGS_MAX_HEADER_LIST_SIZE announces them (decoded: names, values and 32
# bytes per field, RFC 9113 §6.5.2). A block over it that decodes within the hard budget below
# costs only its stream (trailers-only RESOURCE_EXHAUSTED): HPACK state stays in sync.
DEFAULT_MAX_HEADER_LIST_BYTES = 16 * 2**10
MAX_HEADER_LIST_BYTES = DEFAULT_MAX_HEADER_LIST_BYTES  # the name older callers import
# The encoded block (HEADERS or PUSH_PROMISE plus its CONTINUATIONs), counted on the frame
# headers as they arrive, before a byte of it is decoded. A sane encoder never needs more than
# the decoded size (a literal's overhead is a few bytes, a field counts 32); twice that is the
# slack Go's net/http2 allows (its CVE-2023-45288 fix). Over it: GOAWAY COMPRESSION_ERROR, since
# a block we will not decompress leaves HPACK out of sync (RFC 9113 §4.3).
DEFAULT_MAX_HEADER_BLOCK_BYTES = 2 * DEFAULT_MAX_HEADER_LIST_BYTES
# Where hpack stops decoding (it checks as it goes): also a connection error, COMPRESSION_ERROR.
DEFAULT_MAX_HEADER_DECODE_BYTES = 4 * DEFAULT_MAX_HEADER_LIST_BYTES
# CONTINUATION frames per block: a legitimate peer needs one or two at our block budget; h2
# would buffer 64 before refusing. Beyond: GOAWAY ENHANCE_YOUR_CALM.
DEFAULT_MAX_CONTINUATION_FRAMES = 16
# PING and SETTINGS each make h2 queue an acknowledgement. Acknowledgements queued and not yet
# taken by data_to_send() (see receive_data for the transport's side) are bounded like Go's
# net/http2 (maxQueuedControlFrames); beyond: GOAWAY ENHANCE_YOUR_CALM.
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

# h2 formats repr(frame) for every frame it receives, logging on or off (h2 4.1-4.4,
# H2Connection._receive_frame). hyperframe's repr formats the flags and the body, and a DATA
# frame's body repr serializes and hexlifies the whole payload: 73 µs per 64 KiB, over a
# CPU-second per GiB received; for a unary request's four frames, about 3 µs of its 100 µs
# receive (a replay of captured grpcio bytes, best of 7). The repr is for debugging only: make
# it cheap, for every frame type.
hyperframe.frame.Frame.__repr__ = lambda self: f"{type(self).__name__}(stream_id={self.stream_id})"

# A DATA frame gathers queued items up to this size: one frame per message instead of one for
# the 5-byte prefix and one for the body, while staying under glibc's 128 KiB mmap threshold
# (larger joined buffers were measured to page-fault on every frame).
_COALESCE_BYTES = 96 * 2**10

_CONTENT_TYPE = b"application/grpc"
SHUTDOWN_PING = b"shutdown"  # the PING that follows the first GOAWAY of a graceful shutdown

# h2 moves its whole connection to CLOSED on any GOAWAY, sent or received, and then refuses
# every further frame (python-hyper/h2#1181, open): in-flight calls could never finish, which
# is the point of a graceful GOAWAY (RFC 9113 §6.8). So graceful (NO_ERROR) GOAWAYs bypass h2:
# the server serializes its own, and the client takes them out of the byte stream before h2
# sees them. Erroneous GOAWAYs still go through h2, which rightly tears everything down.
# length (24 bits) and type share the first word; then flags and stream id: 9 bytes.
_FRAME_HEADER = struct.Struct(">IBI")
# A DATA frame's header (no flags) followed by an uncompressed message's gRPC prefix.
_DATA_FRAME_AND_PREFIX = struct.Struct(">IBIBI")

# What h2 raises for a command on a stream it has closed or already forgotten (e.g. one it
# reset by itself for a frame that arrived after END_STREAM): that stream is over, nothing more.
_STREAM_GONE = (
    h2.exceptions.StreamClosedError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.NoSuchStreamError,
)
_DATA_TYPE = 0x0
_HEADERS_TYPE = 0x1
_RST_STREAM_TYPE = 0x3
_SETTINGS_TYPE = 0x4
_PUSH_PROMISE_TYPE = 0x5
_PING_TYPE = 0x6
_GOAWAY_TYPE = 0x7
_CONTINUATION_TYPE = 0x9
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4

# DATA frames carrying messages are serialized here, not by h2 (see _send_data_frames): h2's path
# copies the payload four times and runs two state machines per frame. Profiled, that was the
# largest Python cost of streaming; bypassing it took the server from 1.7 to 1.0 CPU-s per GB.
# These are the states in which h2 itself would send DATA; anywhere else the frame goes
# through h2, which raises what it raises.
_DATA_CONNECTION_STATES = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
_DATA_STREAM_STATES = frozenset(
    {h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE}
)
_HALF_CLOSED_LOCAL = h2.stream.StreamState.HALF_CLOSED_LOCAL


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: a valid call started. Invalid ones never get here: they are answered at once."""

    stream_id: int
    method: str  # the :path, e.g. "/jobworker.v1.JobService/StartJob"
    metadata: Metadata
    timeout_s: float | None
    authority: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the response headers (initial metadata) arrived."""

    stream_id: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A whole message. Call `acknowledge(stream_id, flow_controlled_bytes)` once consumed."""

    stream_id: int
    payload: bytes
    flow_controlled_bytes: int


@dataclass(frozen=True, slots=True)
class InputEnded:
    """Server: the client half-closed its side (no more messages will come)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CallEnded:
    """Client: the call is over, with the status from the trailers (or derived from HTTP/2 when
    the server broke the protocol or reset the stream)."""

    stream_id: int
    status: Status
    message: str
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The stream is over because of the peer or the wire, not because of its handler: a reset
    (RST_STREAM), a message over the size limit, an unsupported encoding, broken framing. The
    connection has already said what needs saying to the peer; the handler should be cancelled."""

    stream_id: int
    status: Status
    message: str


@dataclass(frozen=True, slots=True)
class OutboxDrained:
    """Everything queued on this stream has been handed to HTTP/2 (or the stream is gone)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: streams above `last_stream_id` were never processed."""

    error_code: int
    last_stream_id: int
    message: str


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The peer answered our PING: it has seen everything we sent before it."""

    data: bytes


Event = (
    PingAcknowledged
    | RequestReceived
    | ResponseReceived
    | MessageReceived
    | InputEnded
    | CallEnded
    | StreamFailed
    | OutboxDrained
    | ConnectionTerminated
)


class ConnectionBroken(WireError):
    """The connection is broken beyond repair; `data_to_send()` holds the GOAWAY to send."""


# --- per-stream state --------------------------------------------------------------------------


class _EndOfOutput:
    """The last item of an outbox: the server's trailers (the call is over for us), or the
    client's bare END_STREAM (it still awaits the response)."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]] | None) -> None:
        self.headers = headers


class _Stream:
    __slots__ = (
        "decoder",
        "encoding",
        "headers_sent",
        "outbox",
        "outbox_bytes",
        "partial_acked",
        "partial_held",
        "unconsumed",
        "done",
        "messages_left",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self.decoder = MessageDecoder(max_message_bytes=max_message_bytes)
        self.encoding: str | None = None  # the peer's grpc-encoding
        self.headers_sent = False
        self.outbox: collections.deque[memoryview | _EndOfOutput] = collections.deque()
        self.outbox_bytes = 0
        # Wire bytes of the message being received: acknowledged already, and held back.
        self.partial_acked = 0
        self.partial_held = 0
        self.unconsumed = 0  # messages delivered and not yet acknowledged by the consumer
        self.done = False  # locally finished: trailers queued or stream reset
        self.messages_left: int | None = None  # inbound messages still allowed (None: any)


class _Refusal(Exception):
    """The peer broke a budget or HTTP/2 itself at a frame header: a connection error."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


class _GrpcConnection:
    client_side: ClassVar[bool]

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_window_bytes: int = DEFAULT_STREAM_WINDOW_BYTES,
        connection_window_bytes: int = DEFAULT_CONNECTION_WINDOW_BYTES,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
        max_header_block_bytes: int = DEFAULT_MAX_HEADER_BLOCK_BYTES,
        max_header_decode_bytes: int = DEFAULT_MAX_HEADER_DECODE_BYTES,
        max_continuation_frames: int = DEFAULT_MAX_CONTINUATION_FRAMES,
        max_pending_acks: int = DEFAULT_MAX_PENDING_ACKS,
        max_reset_burst: int = DEFAULT_MAX_RESET_BURST,
        reset_refill_per_s: float = DEFAULT_RESET_REFILL_PER_S,
    ) -> None:
        # Inbound headers are checked by fields.block_problem, faster than h2 and as stream
        # errors (see fields.py); our own outbound ones are constants plus encode_metadata's
        # already-validated metadata, so h2's outbound checks and its normalising passes are
        # skipped too (a fifth of a unary call's CPU, measured).
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        # hpack checks the decoded size as it decodes and stops at the hard budget; the decoder
        # tells blocks over the announced limit apart (see _oversized).
        self._h2.decoder = RepeatDecoder(max_header_decode_bytes, list_limit=max_header_list_bytes)
        settings = {
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window_bytes,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_bytes,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_bytes,
        }
        self._h2.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=settings
        )
        # The stream limit h2 enforces after initiate(): ours is enforced first, by refusing
        # the stream alone (see _scan); h2's, twice as high, is a backstop that never fires
        # while the two agree.
        self._h2_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                **settings,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2 * max_concurrent_streams + 1,
            },
        )
        # h2 sizes its frame parser from the settings it was constructed with, and treats
        # initial_values as already acknowledged, so the larger frame size we announce would
        # never reach the parser: set it directly (accepting large frames early is harmless).
        self._h2.max_inbound_frame_size = max_frame_bytes
        self._connection_window_bytes = connection_window_bytes
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_bytes = max_header_list_bytes
        self._max_frame_bytes = max_frame_bytes
        self._max_block_bytes = max_header_block_bytes
        self._max_continuations = max_continuation_frames
        self._max_pending_acks = max_pending_acks
        self._reset_burst = max_reset_burst
        self._reset_refill_per_s = reset_refill_per_s
        self._streams: dict[int, _Stream] = {}
        self._terminated = False
        self._disposed = False
        # Output serialized past h2 (DATA, graceful GOAWAY), with h2's own output moved in
        # ahead of each of our frames, so the wire order is the order of the commands.
        self._out: list[bytes | memoryview] = []
        # The frame scanner's state (see _scan).
        self._carry = b""  # unfed bytes: a split frame header, or a frame held whole
        self._skip = 24 if not self.client_side else 0  # preface, then the current frame's body
        self._frame_bytes = self._skip  # the size of what _skip counts down
        self._block_stream = 0  # the stream of a header block still open, else 0
        self._block_bytes = 0
        self._block_frames = 0
        self._highest_opened = 0
        self._pending_acks = 0  # ACKs h2 queued since the last data_to_send()
        self._reset_tokens = float(max_reset_burst)
        self._now: float | None = None
        self._ping_forgiven = False  # we sent HEADERS or DATA since the last PING

    # --- the I/O boundary ----------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface: SETTINGS, then the connection window raised above
        HTTP/2's 64 KiB default (it has no setting of its own)."""
        self._h2.initiate_connection()
        # The SETTINGS frame is out: from now on h2 reads the same values but a looser stream
        # limit (public attribute; acknowledging our SETTINGS changes nothing, nothing pends).
        self._h2.local_settings = self._h2_settings
        increment = self._connection_window_bytes - self._h2.inbound_flow_control_window
        if increment > 0:
            self._h2.increment_flow_control_window(increment)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer. Handing bytes out is taken to mean they are being
        written: the transport calls this only once the previous batch has left (or is the
        one batch in flight), which is what bounds the acknowledgements a peer that does not
        read can make us queue (DEFAULT_MAX_PENDING_ACKS)."""
        if self._disposed:
            return b""
        self._pending_acks = 0
        pending = self._h2.data_to_send()
        out = self._out
        if not out:
            return pending
        if pending:
            out.append(pending)
        data = b"".join(out)
        out.clear()
        return data

    def _take_h2_output(self) -> None:
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)

    @property
    def buffered_input_bytes(self) -> int:
        """Received bytes held inside the connection and not yet turned into events, at most:
        a split frame header or a held frame, the part of a frame received so far, the frames
        of an unfinished header block."""
        partial = self._frame_bytes - self._skip if self._skip else 0
        return len(self._carry) + partial + self._block_bytes + 9 * self._block_frames

    def receive_data(self, data: bytes, *, now: float | None = None) -> list[Event]:
        """Process bytes from the peer. Raises ConnectionBroken when the peer broke HTTP/2 or
        a budget (the GOAWAY is then queued in data_to_send()).

        `now`, the transport's clock in seconds, enables the budgets that need one (the
        reset bucket's refill, the PING policy); without it they count without time."""
        if self._terminated:
            return []
        if now is not None:
            self._tick(now)
        events: list[Event] = []
        try:
            self._scan(data, events)
        except _Refusal as refusal:
            self._terminated = True
            self._h2.close_connection(
                error_code=refusal.error_code, additional_data=str(refusal).encode()
            )
            code = h2.errors.ErrorCodes(refusal.error_code).name
            raise ConnectionBroken(f"{code}: {refusal}") from None
        return events

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
        must be taken out (the client's graceful GOAWAY, see _intercept)."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        view = memoryview(data)
        end = len(view)
        pos = start = 0
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
        opened = 0
        while end - pos >= 9:
            word, flags, stream_id = _FRAME_HEADER.unpack_from(view, pos)
            length = word >> 8
            frame_type = word & 0xFF
            if length > self._max_frame_bytes:
                raise _Refusal(
                    h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes}",
                )
            if frame_type != _DATA_TYPE:
                stream_id &= 0x7FFFFFFF
                if frame_type == _HEADERS_TYPE or frame_type == _PUSH_PROMISE_TYPE:
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
                        self._owe_ack()
                        if frame_type == _PING_TYPE and self._now is not None:
                            self._judge_ping(self._now)
                elif frame_type == _RST_STREAM_TYPE:
                    self._spend_reset()
                elif frame_type == _GOAWAY_TYPE and self.client_side:
                    if end - pos < 9 + length:
                        break  # held until whole: it may have to be taken out
                    if self._intercept(view[pos : pos + 9 + length], events, view[start:pos]):
                        pos = start = pos + 9 + length
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
            raise _Refusal(
                h2.errors.ErrorCodes.COMPRESSION_ERROR,
                f"header block of {length} bytes exceeds the limit of {self._max_block_bytes}",
            )
        if not flags & _END_HEADERS and not self._block_stream:
            self._block_stream = stream_id
            self._block_bytes = length
            self._block_frames = 1

    def _continue_block(self, flags: int, length: int) -> None:
        self._block_bytes += length
        self._block_frames += 1
        if self._block_bytes > self._max_block_bytes:
            raise _Refusal(
                h2.errors.ErrorCodes.COMPRESSION_ERROR,
                f"header block of {self._block_bytes} bytes or more exceeds the limit of "
                f"{self._max_block_bytes}",
            )
        if self._block_frames > 1 + self._max_continuations:
            raise _Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                f"header block in more than {self._max_continuations} CONTINUATION frames",
            )
        if flags & _END_HEADERS:
            self._block_stream = self._block_bytes = self._block_frames = 0

    def _owe_ack(self) -> None:
        self._pending_acks += 1
        if self._pending_acks > self._max_pending_acks:
            raise _Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                f"more than {self._max_pending_acks} PING and SETTINGS acknowledgements "
                "queued and not read",
            )

    def _spend_reset(self) -> None:
        """A stream reset by the peer, or one we refused or reset because of it."""
        self._reset_tokens -= 1
        if self._reset_tokens < 0:
            raise _Refusal(
                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too many reset or refused streams"
            )

    def _refuse_stream(self, stream_id: int) -> None:
        raise NotImplementedError

    def _judge_ping(self, now: float) -> None:
        """The server's PING policy (grpc-go's); the client judges no pings."""

    def _intercept(self, frame: memoryview, events: list[Event], before: memoryview) -> bool:
        raise NotImplementedError

    def _feed_h2(self, data: bytes | memoryview, events: list[Event]) -> None:
        if not data:
            return
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._terminated = True
            raise ConnectionBroken(f"HTTP/2 protocol error from peer: {exc}") from exc
        decoder = self._h2.decoder
        try:
            for event in h2_events:
                self._dispatch(event, events)
        finally:
            decoder.oversized = 0

    def _oversized(self, headers: list[tuple[bytes, bytes]] | None) -> int:
        """The decoded size of a header list over the announced limit, else 0. Free unless
        the decoder saw such a block in this batch."""
        if not self._h2.decoder.oversized or not headers:
            return 0
        size = header_list_size(headers)
        return size if size > self.max_header_list_bytes else 0

    def dispose(self) -> None:
        """Drop everything this connection holds, breaking the reference cycles of h2's
        objects (bound methods in dispatch tables, streams and state machines), so that the
        memory of a finished connection returns by reference counting alone, without waiting
        for the cyclic collector. Call once the connection is over; afterwards commands find
        no stream, receive_data() returns nothing and data_to_send() returns b""."""
        if self._disposed:
            return
        self._disposed = self._terminated = True
        for stream in self._streams.values():
            stream.outbox.clear()
        self._streams.clear()
        self._out.clear()
        self._carry = b""
        _break_cycles(self._h2)
        self._h2_settings = None  # type: ignore[assignment]

    # --- commands shared by both sides ---------------------------------------------------------

    def acknowledge(self, stream_id: int, flow_controlled_bytes: int) -> None:
        """The consumer has taken a message (call once per MessageReceived): give its bytes
        back to the peer, and those of a partial message behind it once nothing else waits."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.unconsumed -= 1
            flow_controlled_bytes += self._release_partial(stream)
        self._ack(stream_id, flow_controlled_bytes)

    def _ack(self, stream_id: int, flow_controlled_bytes: int) -> None:
        if flow_controlled_bytes > 0 and not self._terminated:
            self._h2.acknowledge_received_data(flow_controlled_bytes, stream_id)

    @staticmethod
    def _release_partial(stream: _Stream) -> int:
        if stream.unconsumed > 0 or not stream.partial_held:
            return 0
        released, stream.partial_held = stream.partial_held, 0
        stream.partial_acked += released
        return released

    def send_message(self, stream_id: int, payload: bytes) -> None:
        """Queue one message; it goes out as the windows allow (see outbound_pending)."""
        stream = self._open_stream(stream_id)
        self._ensure_headers(stream_id, stream)
        if not stream.outbox and self._send_whole(stream_id, payload):
            return
        prefix, body = encode_message_parts(payload)
        self._enqueue(stream, memoryview(prefix))
        if body:
            self._enqueue(stream, memoryview(body))
        self._flush(stream_id, stream, [])

    def stream_open(self, stream_id: int) -> bool:
        """True while we may still send on the stream (not ended by us, not reset)."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.done and not self._terminated

    def outbound_pending(self, stream_id: int) -> int:
        """Bytes queued on the stream and not yet handed to HTTP/2 (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        return stream.outbox_bytes if stream is not None else 0

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon a stream (RST_STREAM). Harmless on a stream that already ended."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.outbox.clear()
            stream.outbox_bytes = 0
        if self._terminated:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except _STREAM_GONE:
            pass

    def close(self, *, error_code: int = 0, last_stream_id: int | None = None) -> None:
        """Queue a GOAWAY and stop: whatever the peer still sends is dropped."""
        if not self._terminated:
            self._h2.close_connection(error_code=error_code, last_stream_id=last_stream_id)
            self._terminated = True

    def ping(self, data: bytes = b"\0" * 8) -> None:
        self._h2.ping(data)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # --- internals -----------------------------------------------------------------------------

    def _open_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.done:
            raise ProtocolError(f"stream {stream_id} is not open for sending")
        return stream

    def _ensure_headers(self, stream_id: int, stream: _Stream) -> None:
        """Client headers are sent by start_call; the server sends its own lazily."""

    @staticmethod
    def _enqueue(stream: _Stream, item: memoryview) -> None:
        stream.outbox.append(item)
        stream.outbox_bytes += len(item)

    def _flush(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        """Hand the stream's outbox to h2 as far as the windows allow."""
        if self._terminated:
            return
        try:
            if not self._flush_outbox(stream_id, stream):
                return  # waiting for the peer to open its window
        except _STREAM_GONE:
            stream.outbox.clear()
            stream.outbox_bytes = 0
            stream.done = True
            self._streams.pop(stream_id, None)
        events.append(OutboxDrained(stream_id))

    def _flush_outbox(self, stream_id: int, stream: _Stream) -> bool:
        """True when the outbox is empty afterwards."""
        outbox = stream.outbox
        while outbox:
            item = outbox[0]
            if isinstance(item, _EndOfOutput):
                outbox.popleft()
                if item.headers is None:
                    self._h2.end_stream(stream_id)
                else:
                    self._send_header_block(stream_id, item.headers, end_stream=True)
                    self._streams.pop(stream_id, None)
                    self._stop_input(stream_id)
                break
            window = min(
                self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
            )
            if window <= 0:
                return False
            # Gather whole items (a message's prefix and body, small messages) into one frame.
            parts: list[bytes | memoryview] = []
            size = 0
            limit = max(min(window, _COALESCE_BYTES), min(len(item), window))
            while outbox and not isinstance(outbox[0], _EndOfOutput):
                item = outbox[0]
                room = limit - size
                if len(item) <= room:
                    parts.append(outbox.popleft())
                    size += len(item)
                elif not parts:
                    parts.append(item[:room])
                    outbox[0] = item[room:]
                    size += room
                    break
                else:
                    break
            h2_stream = self._h2.streams[stream_id]  # present: the window lookup found it
            if self._data_sendable(h2_stream):
                parts.insert(0, _FRAME_HEADER.pack(size << 8, 0, stream_id))
                self._send_data_frames(h2_stream, parts, size)
            else:
                self._h2.send_data(stream_id, parts[0] if len(parts) == 1 else b"".join(parts))
            stream.outbox_bytes -= size
        return True

    def _stop_input(self, stream_id: int) -> None:
        """The server answered in full while the client may still send: ask it to stop,
        without error (RFC 9113 §8.1), as grpc-go does; the stream then no longer counts
        against the stream limit."""
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is not None and h2_stream.state_machine.state is _HALF_CLOSED_LOCAL:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _send_whole(self, stream_id: int, payload: bytes) -> bool:
        """The common case, fast: a message that fits the windows goes out at once, as one
        DATA frame with its frame header and gRPC prefix packed together, or, to a peer whose
        frames are smaller (HTTP/2's default is 16 KiB), as consecutive full frames sliced from
        the payload without copying it (streaming 64 KiB messages, this path is half the Python
        cost of the general one, measured). False when the general path must run: it queues,
        splits and defers as the windows say."""
        if self._terminated:
            return False
        h2_stream = self._h2.streams.get(stream_id)
        size = PREFIX_BYTES + len(payload)
        if (
            h2_stream is None
            or size > h2_stream.outbound_flow_control_window
            or size > self._h2.outbound_flow_control_window
            or not self._data_sendable(h2_stream)
        ):
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
                pieces += (_FRAME_HEADER.pack(len(part) << 8, 0, stream_id), part)
                start += frame_bytes
        self._send_data_frames(h2_stream, pieces, size)
        return True

    def _data_sendable(self, h2_stream: h2.stream.H2Stream) -> bool:
        """Whether h2 itself would send DATA now (else the frame goes through h2)."""
        return (
            h2_stream.state_machine.state in _DATA_STREAM_STATES
            and self._h2.state_machine.state in _DATA_CONNECTION_STATES
        )

    def _send_data_frames(
        self, h2_stream: h2.stream.H2Stream, pieces: list[bytes | memoryview], size: int
    ) -> None:
        """DATA frames, as `pieces`: each frame's 9-byte header (no flags; the first may be
        followed by a message prefix) and then its payload, `size` bytes of payload in all.
        The flow-control accounting is h2's own, so that h2's windows stay true for every
        frame it still sends and every WINDOW_UPDATE it receives. Nothing is copied here;
        data_to_send() joins it all once."""
        self._take_h2_output()
        self._ping_forgiven = True
        self._out += pieces
        self._h2.outbound_flow_control_window -= size
        h2_stream.outbound_flow_control_window -= size

    def _send_header_block(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False
    ) -> None:
        """h2's send_headers for a stream h2 knows, cheaper (see fields.encode_block): the same
        state transitions, which raise what h2 would raise, and one HEADERS frame of literals.
        A block that needs CONTINUATION frames, and the first block after the peer resized the
        HPACK table (h2's encoder must announce that), go through h2."""
        h2_stream = self._h2.streams.get(stream_id)
        block = encode_block(headers)
        if (
            h2_stream is None
            or len(block) > self._h2.max_outbound_frame_size
            or self._h2.encoder.header_table.resized
        ):
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
            return
        self._h2.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        self._take_h2_output()
        self._ping_forgiven = True
        self._out.append(
            _FRAME_HEADER.pack(len(block) << 8 | _HEADERS_TYPE, flags, stream_id) + block
        )

    def _flush_all(self, events: list[Event]) -> None:
        for stream_id, stream in list(self._streams.items()):
            if stream.outbox:
                self._flush(stream_id, stream, events)

    def _dispatch(self, event: h2.events.Event, events: list[Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event, events)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._flush_all(events)
        elif isinstance(event, h2.events.StreamReset):
            if self._streams.pop(event.stream_id, None) is not None:
                status = status_from_h2_error(event.error_code)
                events.append(
                    StreamFailed(event.stream_id, status, f"stream reset by peer ({status.name})")
                )
        elif isinstance(event, h2.events.ConnectionTerminated):
            message = (event.additional_data or b"").decode("utf-8", "replace")
            events.append(
                ConnectionTerminated(event.error_code or 0, event.last_stream_id or 0, message)
            )
        elif isinstance(event, h2.events.PingAckReceived):
            events.append(PingAcknowledged(event.ping_data))
        # PING is answered by h2 itself; SETTINGS are acknowledged by h2 itself.

    def _on_data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        flow_bytes = event.flow_controlled_length
        if stream is None:
            # Data for a stream we already finished (e.g. reset): nobody will consume it.
            self._ack(stream_id, flow_bytes)
            return
        data = event.data
        padding = flow_bytes - len(data)
        partial_before = stream.decoder.partial_message_bytes
        try:
            messages = stream.decoder.feed(data)
            payloads = [
                decode_message(m, stream.encoding, max_bytes=self.max_message_bytes)
                for m in messages
            ]
        except WireError as exc:
            self._ack(stream_id, flow_bytes + stream.partial_held)
            self._fail_stream(stream_id, exc, events)
            return
        if stream.messages_left is not None:
            stream.messages_left -= len(messages)
            if stream.messages_left < 0:
                self._ack(stream_id, flow_bytes + stream.partial_held)
                self._on_too_many_messages(stream_id, events)
                return
        partial_after = stream.decoder.partial_message_bytes
        # Attribute the frame's bytes: each complete message's share is acknowledged when its
        # consumer takes it; the unfinished message's share is held (see _release_partial).
        if messages:
            first_share = PREFIX_BYTES + len(messages[0].payload) - stream.partial_acked
            shares = [first_share] + [PREFIX_BYTES + len(m.payload) for m in messages[1:]]
            stream.partial_acked, stream.partial_held = 0, partial_after
        else:
            shares = []
            stream.partial_held += partial_after - partial_before
        stream.unconsumed += len(messages)
        self._ack(stream_id, padding + self._release_partial(stream))
        for payload, share in zip(payloads, shares, strict=True):
            events.append(MessageReceived(stream_id, payload, share))
        # END_STREAM comes as h2's separate StreamEnded event, handled by each side.

    def _fail_stream(self, stream_id: int, exc: WireError, events: list[Event]) -> None:
        raise NotImplementedError

    def _on_too_many_messages(self, stream_id: int, events: list[Event]) -> None:
        raise NotImplementedError


def _failure(exc: WireError) -> tuple[Status, str]:
    """The status a broken inbound message gives its call (the spec's mapping)."""
    if isinstance(exc, MessageTooLarge):
        return Status.RESOURCE_EXHAUSTED, (
            f"received message larger than max ({exc.declared_bytes} vs. {exc.max_bytes} bytes)"
        )
    if isinstance(exc, UnsupportedEncoding):
        return Status.UNIMPLEMENTED, str(exc)
    if isinstance(exc, _HeadersTooLarge):
        return Status.RESOURCE_EXHAUSTED, str(exc)
    return Status.INTERNAL, str(exc)


class _HeadersTooLarge(WireError):
    """A header list over the announced limit, decoded whole: only its stream fails."""


# --- server side -------------------------------------------------------------------------------


class ServerConnection(_GrpcConnection):
    """The server's side of one gRPC connection."""

    client_side = False

    def __init__(
        self,
        *,
        max_request_messages: int | None = None,
        min_ping_interval_s: float = DEFAULT_MIN_PING_INTERVAL_S,
        idle_ping_interval_s: float = DEFAULT_IDLE_PING_INTERVAL_S,
        max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES,
        **kwargs: Any,
    ) -> None:
        """`max_request_messages`: how many messages a call's request may hold (None: any);
        the next one ends the call with INTERNAL (a unary method takes exactly one). The other
        budgets are the module's DEFAULT_* constants, under the same names in lowercase."""
        super().__init__(**kwargs)
        self._draining_last_stream_id: int | None = None
        self.max_request_messages = max_request_messages
        self._refused: set[int] = set()  # streams refused at the stream limit, not yet reset
        self._min_ping_interval_s = min_ping_interval_s
        self._idle_ping_interval_s = idle_ping_interval_s
        self._max_ping_strikes = max_ping_strikes
        self._last_ping_at: float | None = None
        self._ping_strikes = 0

    def limit_request_messages(self, stream_id: int, count: int | None) -> None:
        """Change how many more request messages the call may receive (None: any). Messages
        that came in the same read as the request were already counted against the
        connection's `max_request_messages`."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.messages_left = count

    def _refuse_stream(self, stream_id: int) -> None:
        """A stream over our MAX_CONCURRENT_STREAMS: refused alone (RFC 9113 §5.1.2), once h2
        has decoded its headers (the HPACK state must follow every block)."""
        self._spend_reset()
        self._refused.add(stream_id)

    def _refuse(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        except _STREAM_GONE:
            pass  # the peer reset it in the same read

    def _judge_ping(self, now: float) -> None:
        # grpc-go's enforcement (http2_server.go handlePing), on the transport's clock.
        last, self._last_ping_at = self._last_ping_at, now
        if self._ping_forgiven:
            self._ping_forgiven = False
            self._ping_strikes = 0
            return
        if last is None:
            return
        interval = self._min_ping_interval_s if self._streams else self._idle_ping_interval_s
        if now - last < interval:
            self._ping_strikes += 1
            if self._ping_strikes > self._max_ping_strikes:
                raise _Refusal(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too_many_pings")

    def _dispatch(self, event: h2.events.Event, events: list[Event]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event, events)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._on_input_ended(event.stream_id, stream, events)
        elif isinstance(event, h2.events.TrailersReceived):
            # Clients send no trailers in gRPC; the StreamEnded that follows counts. Malformed
            # ones still end the call, as the RFC asks.
            problem = block_problem(event.headers or (), Block.TRAILERS)
            oversized = self._oversized(event.headers)
            if oversized and self._streams.get(event.stream_id) is not None:
                self._spend_reset()
                message = f"trailers of {oversized} bytes exceed the limit"
                self._fail_stream(event.stream_id, _HeadersTooLarge(message), events)
            elif problem is not None and self._streams.get(event.stream_id) is not None:
                self._refuse_malformed(event.stream_id, f"malformed trailers: {problem}", events)
        else:
            super()._dispatch(event, events)

    # -- receiving --

    def _on_request(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        if (stream_id in self._refused) if self._refused else False:
            self._refused.discard(stream_id)
            self._refuse(stream_id)
            return
        if self._draining_last_stream_id is not None and stream_id > self._draining_last_stream_id:
            self._refuse(stream_id)
            return
        oversized = self._oversized(event.headers)
        if oversized:
            # Decoded whole, so HPACK is in sync: only this request is refused (as grpc-core
            # answers metadata over its limit: RESOURCE_EXHAUSTED).
            message = (
                f"header list of {oversized} bytes exceeds the limit of "
                f"{self.max_header_list_bytes} bytes"
            )
            self._answer_early(stream_id, Status.RESOURCE_EXHAUSTED, message)
            return
        if block_problem(event.headers or (), Block.REQUEST) is not None:
            self._spend_reset()
            self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)  # §8.1.1: stream error
            return
        headers = dict(event.headers or ())
        problem = _request_problem(headers)
        if problem is not None:
            http_status, status, message = problem
            self._answer_early(stream_id, status, message, http_status=http_status)
            return
        stream = _Stream(self.max_message_bytes)
        stream.messages_left = self.max_request_messages
        self._streams[stream_id] = stream
        encoding = headers.get(b"grpc-encoding", b"identity").decode("ascii", "replace").lower()
        if encoding not in SUPPORTED_ENCODINGS:
            self._streams.pop(stream_id)
            self._answer_early(
                stream_id, Status.UNIMPLEMENTED, f"grpc-encoding {encoding!r} is not supported"
            )
            return
        stream.encoding = encoding
        timeout_s = None
        if b"grpc-timeout" in headers:
            try:
                timeout_s = parse_grpc_timeout(headers[b"grpc-timeout"])
            except ProtocolError as exc:
                self._streams.pop(stream_id)
                self._answer_early(stream_id, Status.INTERNAL, str(exc))
                return
        try:
            metadata = decode_metadata(event.headers or ())
        except ProtocolError as exc:
            self._streams.pop(stream_id)
            self._answer_early(stream_id, Status.INTERNAL, str(exc))
            return
        events.append(
            RequestReceived(
                stream_id=stream_id,
                method=headers[b":path"].decode("utf-8", "replace"),
                metadata=metadata,
                timeout_s=timeout_s,
                authority=headers.get(b":authority", b"").decode("utf-8", "replace"),
            )
        )

    def _on_input_ended(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        if not stream.decoder.at_message_boundary:
            self._fail_stream(stream_id, ProtocolError("request ended inside a message"), events)
            return
        events.append(InputEnded(stream_id))

    def _refuse_malformed(self, stream_id: int, message: str, events: list[Event]) -> None:
        self._spend_reset()
        self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        events.append(StreamFailed(stream_id, Status.INTERNAL, message))

    def _on_too_many_messages(self, stream_id: int, events: list[Event]) -> None:
        # The gRPC spec: a unary call's server that receives a second message answers
        # INTERNAL. The trailers end our side; the RST_STREAM(NO_ERROR) after them tells the
        # client to stop sending (_stop_input).
        self._spend_reset()
        allowed = self.max_request_messages
        self._fail_stream(
            stream_id,
            ProtocolError(f"more request messages than the {allowed} the call takes"),
            events,
        )

    def _fail_stream(self, stream_id: int, exc: WireError, events: list[Event]) -> None:
        status, message = _failure(exc)
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.done:
            stream.outbox.clear()
            stream.outbox_bytes = 0
            self.send_trailers(stream_id, status, message)
        events.append(StreamFailed(stream_id, status, message))

    # -- sending --

    def _ensure_headers(self, stream_id: int, stream: _Stream) -> None:
        if not stream.headers_sent:
            self.send_headers(stream_id)

    def send_headers(self, stream_id: int, metadata: Metadata = ()) -> None:
        """Send the response headers (initial metadata). Implied by the first message."""
        stream = self._open_stream(stream_id)
        if stream.headers_sent:
            raise ProtocolError(f"response headers already sent on stream {stream_id}")
        stream.headers_sent = True
        headers = [
            (b":status", b"200"),
            (b"content-type", _CONTENT_TYPE),
            (b"grpc-accept-encoding", accept_encoding_header().encode()),
            *encode_metadata(metadata),
        ]
        self._send_header_block(stream_id, headers)

    def send_trailers(
        self, stream_id: int, status: Status, message: str = "", metadata: Metadata = ()
    ) -> None:
        """End the call. Queued behind any pending messages; a trailers-only response when no
        headers were sent."""
        stream = self._open_stream(stream_id)
        trailers = _status_headers(status, message) + encode_metadata(metadata)
        if not stream.headers_sent:
            stream.headers_sent = True
            trailers = [
                (b":status", b"200"),
                (b"content-type", _CONTENT_TYPE),
                (b"grpc-accept-encoding", accept_encoding_header().encode()),
                *trailers,
            ]
        stream.done = True
        stream.outbox.append(_EndOfOutput(trailers))
        self._flush(stream_id, stream, [])

    def _answer_early(
        self, stream_id: int, status: Status, message: str, *, http_status: int = 200
    ) -> None:
        """A trailers-only response to a request we will not hand to any handler."""
        headers = [(b":status", str(http_status).encode())]
        if http_status == 200:
            headers += [
                (b"content-type", _CONTENT_TYPE),
                (b"grpc-accept-encoding", accept_encoding_header().encode()),
            ]
        headers += _status_headers(status, message)
        try:
            self._send_header_block(stream_id, headers, end_stream=True)
            # The client may still be sending; we will not read it.
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except _STREAM_GONE:
            pass

    def start_graceful_shutdown(self) -> None:
        """First GOAWAY of a graceful shutdown: last stream 2^31-1 tells the client to stop
        opening streams without cutting any in flight (RFC 9113 §6.8), and a PING measures when
        it has seen it."""
        self._send_graceful_goaway(2**31 - 1)
        self._h2.ping(SHUTDOWN_PING)

    def finish_graceful_shutdown(self) -> None:
        """Second GOAWAY: the real last stream. Streams opened after it are refused; those
        before it go on until they finish (the transport closes when none is left)."""
        last = self._h2.highest_inbound_stream_id
        self._draining_last_stream_id = last
        self._send_graceful_goaway(last)

    def _send_graceful_goaway(self, last_stream_id: int) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._take_h2_output()
        self._out.append(frame.serialize())


def _break_cycles(connection: h2.connection.H2Connection) -> None:
    """Empty h2's objects, so that nothing it built refers back to itself: the connection's
    dispatch tables hold its bound methods, each stream's state machine and callbacks refer
    to the stream, the frame buffer holds frames. Emptying every h2 object's attributes
    breaks each such cycle whatever its shape (h2 4.x keeps its state in instance dicts)."""
    decoder = connection.decoder
    if isinstance(decoder, RepeatDecoder):
        decoder.forget()
    for stream in list(connection.streams.values()):
        for part in (stream.state_machine, stream):
            vars(part).clear()
    for part in (connection.state_machine, connection.incoming_buffer, connection):
        vars(part).clear()


def _request_problem(headers: dict[bytes, bytes]) -> tuple[int, Status, str] | None:
    """Why a request is not gRPC, as (HTTP status, gRPC status, message); None when it is."""
    if headers.get(b":method") != b"POST":
        return (
            405,
            Status.INTERNAL,
            f"method {headers.get(b':method', b'').decode(errors='replace')} not allowed",
        )
    content_type = headers.get(b"content-type", b"")
    if content_type != _CONTENT_TYPE and not content_type.startswith(
        (_CONTENT_TYPE + b"+", _CONTENT_TYPE + b";")
    ):
        return (
            415,
            Status.INTERNAL,
            f"content-type {content_type.decode(errors='replace')!r} is not gRPC",
        )
    subtype = content_type.partition(b";")[0][len(_CONTENT_TYPE) :].strip()
    if subtype and subtype != b"+proto":
        # Another message codec (+json...): we speak protobuf only. Like an unsupported
        # grpc-encoding, which the spec answers UNIMPLEMENTED.
        return (
            200,
            Status.UNIMPLEMENTED,
            f"content-subtype {subtype[1:].decode(errors='replace')!r} is not supported",
        )
    if headers.get(b"te") != b"trailers":
        return 200, Status.INTERNAL, "te: trailers is required"
    path = headers.get(b":path", b"")
    if not path.startswith(b"/") or path.count(b"/") != 2:
        return 200, Status.INTERNAL, f"malformed method path {path.decode(errors='replace')!r}"
    return None


def _status_headers(status: Status, message: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"grpc-status", str(int(status)).encode())]
    if message:
        headers.append((b"grpc-message", encode_grpc_message(message).encode("ascii")))
    return headers


# --- client side -------------------------------------------------------------------------------


class ClientConnection(_GrpcConnection):
    """The client's side of one gRPC connection: starts calls and reads their answers."""

    client_side = True

    def __init__(self, *, authority: str, user_agent: str = "purgatory", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._authority = authority.encode()
        self._user_agent = user_agent.encode()
        self._response_started: set[int] = set()
        self.goaway_last_stream_id: int | None = None

    def _intercept(self, frame: memoryview, events: list[Event], before: memoryview) -> bool:
        """A whole GOAWAY frame: a graceful one (NO_ERROR) is taken out of the byte stream
        before h2 sees it (see _FRAME_HEADER), after the frames before it; True if so."""
        if len(frame) < 17:
            return False  # malformed: h2 says so
        last_stream_id, error_code = struct.unpack_from(">I I", frame, 9)
        if error_code != h2.errors.ErrorCodes.NO_ERROR:
            return False
        self._feed_h2(before, events)
        self._on_graceful_goaway(last_stream_id & 0x7FFFFFFF, bytes(frame[17:]), events)
        return True

    def _on_graceful_goaway(self, last_stream_id: int, debug: bytes, events: list[Event]) -> None:
        self.goaway_last_stream_id = last_stream_id
        events.append(ConnectionTerminated(0, last_stream_id, debug.decode("utf-8", "replace")))
        for stream_id in [s for s in self._streams if s > last_stream_id]:
            self._end(
                stream_id,
                Status.UNAVAILABLE,
                "the server went away before processing the call",
                (),
                events,
            )

    def start_call(
        self, method: str, metadata: Metadata = (), *, timeout_s: float | None = None
    ) -> int:
        """Open a stream for a call to `method` ("/package.Service/Method"); its stream id."""
        if self.goaway_last_stream_id is not None:
            raise ProtocolError("the server is going away: no new calls on this connection")
        stream_id = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", method.encode()),
            (b":authority", self._authority),
            (b"te", b"trailers"),
            (b"content-type", _CONTENT_TYPE),
            (b"user-agent", self._user_agent),
            (b"grpc-accept-encoding", accept_encoding_header().encode()),
        ]
        if timeout_s is not None:
            headers.append((b"grpc-timeout", encode_grpc_timeout(timeout_s).encode()))
        headers += encode_metadata(metadata)
        self._h2.send_headers(stream_id, headers)
        stream = _Stream(self.max_message_bytes)
        stream.headers_sent = True
        self._streams[stream_id] = stream
        return stream_id

    @property
    def stream_available(self) -> bool:
        """True if the server's MAX_CONCURRENT_STREAMS allows one more call now."""
        limit = self._h2.remote_settings.max_concurrent_streams
        return self._h2.open_outbound_streams < limit

    def end_input(self, stream_id: int) -> None:
        """No more messages from us (END_STREAM), queued behind pending ones."""
        stream = self._open_stream(stream_id)
        stream.done = True
        stream.outbox.append(_EndOfOutput(None))
        self._flush(stream_id, stream, [])

    def _dispatch(self, event: h2.events.Event, events: list[Event]) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._on_response(event, events)
        elif isinstance(event, h2.events.TrailersReceived):
            problem = block_problem(event.headers or (), Block.TRAILERS)
            if self._oversized(event.headers):
                self._refuse_oversized(event.stream_id, events)
            elif problem is None:
                self._on_trailers(event.stream_id, event.headers or (), events)
            else:
                self._refuse_malformed(event.stream_id, f"malformed trailers: {problem}", events)
        elif isinstance(event, h2.events.StreamEnded):
            # Still open after END_STREAM: the server ended the call without trailers.
            self._end(
                event.stream_id,
                Status.INTERNAL,
                "server ended the call without a status",
                (),
                events,
            )
        elif isinstance(event, h2.events.StreamReset):
            status = status_from_h2_error(event.error_code)
            self._end(
                event.stream_id, status, f"stream reset by server ({status.name})", (), events
            )
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_last_stream_id = event.last_stream_id or 0
            super()._dispatch(event, events)
            for stream_id in [s for s in self._streams if s > self.goaway_last_stream_id]:
                self._end(
                    stream_id,
                    Status.UNAVAILABLE,
                    "the server went away before processing the call",
                    (),
                    events,
                )
        else:
            super()._dispatch(event, events)

    def _on_response(self, event: h2.events.ResponseReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        headers = list(event.headers or ())
        if self._oversized(headers):
            self._refuse_oversized(stream_id, events)
            return
        problem = block_problem(headers, Block.RESPONSE)
        if problem is not None:
            self._refuse_malformed(stream_id, f"malformed response headers: {problem}", events)
            return
        if b"grpc-status" in dict(headers):  # trailers-only
            self._on_trailers(stream_id, headers, events)
            return
        fields = dict(headers)
        http_status = int(fields.get(b":status", b"0") or 0)
        if http_status != 200:
            status = status_from_http(http_status)
            self._end(stream_id, status, f"HTTP status {http_status}", (), events)
            self.reset(stream_id)
            return
        content_type = fields.get(b"content-type", b"")
        if not content_type.startswith(_CONTENT_TYPE):
            self._end(
                stream_id, Status.UNKNOWN, f"content-type {content_type!r} is not gRPC", (), events
            )
            self.reset(stream_id)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.encoding = fields.get(b"grpc-encoding", b"identity").decode("ascii", "replace")
        try:
            metadata = decode_metadata(headers)
        except ProtocolError as exc:
            self._end(stream_id, Status.INTERNAL, str(exc), (), events)
            self.reset(stream_id)
            return
        self._response_started.add(stream_id)
        events.append(ResponseReceived(stream_id, metadata))

    def _on_trailers(
        self, stream_id: int, headers: Iterable[tuple[bytes, bytes]], events: list[Event]
    ) -> None:
        headers = list(headers)
        fields = dict(headers)
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.decoder.at_message_boundary:
            self._end(stream_id, Status.INTERNAL, "response ended inside a message", (), events)
            return
        status = parse_grpc_status(fields.get(b"grpc-status", b""))
        message = decode_grpc_message(fields.get(b"grpc-message", b""))
        try:
            metadata = decode_metadata(headers)
        except ProtocolError:
            metadata = ()
        self._end(stream_id, status, message, metadata, events)

    def _end(
        self,
        stream_id: int,
        status: Status,
        message: str,
        metadata: Metadata,
        events: list[Event],
    ) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        self._response_started.discard(stream_id)
        events.append(CallEnded(stream_id, status, message, metadata))

    def _refuse_malformed(self, stream_id: int, message: str, events: list[Event]) -> None:
        self._end(stream_id, Status.INTERNAL, message, (), events)
        self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _refuse_oversized(self, stream_id: int, events: list[Event]) -> None:
        message = f"response headers exceed the limit of {self.max_header_list_bytes} bytes"
        self._end(stream_id, Status.RESOURCE_EXHAUSTED, message, (), events)
        self.reset(stream_id)

    def _fail_stream(self, stream_id: int, exc: WireError, events: list[Event]) -> None:
        status, message = _failure(exc)
        self._end(stream_id, status, message, (), events)
        self.reset(stream_id)
