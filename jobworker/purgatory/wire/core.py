"""The connection core both sides share: h2 under our settings, inbound flow control, outboxes.

gRPC over one HTTP/2 connection, sans-IO: bytes in → events out; commands queue bytes.

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

Where the rest is: what every frame header decides before h2 parses it, and the budgets, in
scanner.py; the DATA and HEADERS frames we serialize ourselves in fastpath.py; every reliance
on h2's internals in h2_internals.py; each side's own rules in server_side.py and
client_side.py; the events in events.py.
"""

from __future__ import annotations

from typing import ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .compression import decode_message
from .errors import ConnectionBroken, ProtocolError, WireError
from .events import (
    ConnectionTerminated,
    Event,
    MessageReceived,
    OutboxDrained,
    PingAcknowledged,
    StreamFailed,
)
from .fastpath import FastPaths
from .fields import RepeatDecoder, header_list_size
from .framing import DEFAULT_MAX_MESSAGE_BYTES, PREFIX_BYTES, encode_message_parts
from .h2_internals import (
    break_cycles,
    data_stream,
    emit_data,
    half_closed_local,
    inbound_connection_window,
    install_decoder,
    replace_local_settings,
    set_max_inbound_frame_size,
    take_inbound_data,
    unacknowledged_inbound_bytes,
)
from .scanner import (
    DEFAULT_MAX_CONTINUATION_FRAMES,
    DEFAULT_MAX_HEADER_LIST_BYTES,
    DEFAULT_MAX_PENDING_ACKS,
    DEFAULT_MAX_RESET_BURST,
    DEFAULT_RESET_REFILL_PER_S,
    FRAME_HEADER,
    FrameScanner,
    Refusal,
    header_budgets,
)
from .status import status_from_h2_error
from .streams import STREAM_GONE, EndOfOutput, Stream

# Windows sized for throughput and bounded (never 2**31-1): per stream, a consumer that stops
# reading costs at most one stream window of buffered messages; the connection window caps the
# sum. The frame size lets a 64 KiB message travel as one DATA frame.
DEFAULT_STREAM_WINDOW_BYTES = 1 * 2**20
DEFAULT_CONNECTION_WINDOW_BYTES = 8 * 2**20
DEFAULT_MAX_FRAME_BYTES = 1 * 2**20
DEFAULT_MAX_CONCURRENT_STREAMS = 100

# A DATA frame gathers queued items up to this size: one frame per message instead of one for
# the 5-byte prefix and one for the body, while staying under glibc's 128 KiB mmap threshold
# (larger joined buffers were measured to page-fault on every frame).
_COALESCE_BYTES = 96 * 2**10


class GrpcConnection(FrameScanner, FastPaths):
    """What both sides share: h2 set up with our settings and budgets, the frame scanner in
    front of it, inbound flow control, the outboxes, and the commands on a stream."""

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
        max_header_block_bytes: int | None = None,
        max_header_decode_bytes: int | None = None,
        max_continuation_frames: int = DEFAULT_MAX_CONTINUATION_FRAMES,
        max_pending_acks: int = DEFAULT_MAX_PENDING_ACKS,
        max_reset_burst: int = DEFAULT_MAX_RESET_BURST,
        reset_refill_per_s: float = DEFAULT_RESET_REFILL_PER_S,
    ) -> None:
        """The budgets are scanner.py's DEFAULT_* constants, under the same names in lowercase;
        the header block and decoding budgets follow max_header_list_bytes unless given, and
        may not be below it (ValueError: see header_budgets)."""
        max_header_block_bytes, max_header_decode_bytes = header_budgets(
            max_header_list_bytes, max_header_block_bytes, max_header_decode_bytes
        )
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
        self._decoder = RepeatDecoder(max_header_decode_bytes, list_limit=max_header_list_bytes)
        install_decoder(self._h2, self._decoder)
        settings = {
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window_bytes,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_bytes,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_bytes,
        }
        replace_local_settings(
            self._h2, h2.settings.Settings(client=self.client_side, initial_values=settings)
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
        set_max_inbound_frame_size(self._h2, max_frame_bytes)
        self._connection_window_bytes = connection_window_bytes
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_bytes = max_header_list_bytes
        self._streams: dict[int, Stream] = {}
        self._terminated = False
        self._disposed = False
        # Flow-controlled bytes handed back to the peer so far: with what was received, it
        # shows the inbound accounting is exact (every byte given back once).
        self.acknowledged_bytes = 0
        # Output serialized past h2 (DATA, graceful GOAWAY), with h2's own output moved in
        # ahead of each of our frames, so the wire order is the order of the commands.
        self._out: list[bytes | memoryview] = []
        self._init_scanner(
            max_frame_bytes=max_frame_bytes,
            max_header_block_bytes=max_header_block_bytes,
            max_continuation_frames=max_continuation_frames,
            max_pending_acks=max_pending_acks,
            max_reset_burst=max_reset_burst,
            reset_refill_per_s=reset_refill_per_s,
        )
        self._ping_forgiven = False  # we sent HEADERS or DATA since the last PING

    # --- the I/O boundary ----------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface: SETTINGS, then the connection window raised above
        HTTP/2's 64 KiB default (it has no setting of its own)."""
        self._h2.initiate_connection()
        # The SETTINGS frame is out: from now on h2 reads the same values but a looser stream
        # limit (public attribute; acknowledging our SETTINGS changes nothing, nothing pends).
        replace_local_settings(self._h2, self._h2_settings)
        increment = self._connection_window_bytes - inbound_connection_window(self._h2)
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
        except Refusal as refusal:
            self._terminate()
            self._h2.close_connection(
                error_code=refusal.error_code, additional_data=str(refusal).encode()
            )
            code = h2.errors.ErrorCodes(refusal.error_code).name
            raise ConnectionBroken(f"{code}: {refusal}") from None
        return events

    def _feed_h2(self, data: bytes | memoryview, events: list[Event]) -> None:
        if not data:
            return
        # What h2 queues while it reads is counted (its RST_STREAM answers): set apart first
        # what it held before.
        self._take_h2_output()
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._terminate()
            raise ConnectionBroken(f"HTTP/2 protocol error from peer: {exc}") from exc
        answers = self._h2.data_to_send()
        if answers:
            self._out.append(answers)
            self._count_answers(answers)
        decoder = self._decoder
        try:
            for event in h2_events:
                self._dispatch(event, events)
        finally:
            decoder.oversized = 0

    def _oversized(self, headers: list[tuple[bytes, bytes]] | None) -> int:
        """The decoded size of a header list over the announced limit, else 0. Free unless
        the decoder saw such a block in this batch."""
        if not self._decoder.oversized or not headers:
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
            stream.drop_outbox()
        self._streams.clear()
        self._out.clear()
        self._carry = b""
        self._decoder.forget()
        break_cycles(self._h2)
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
            self.acknowledged_bytes += flow_controlled_bytes

    def _drop_stream(self, stream_id: int) -> Stream | None:
        """Forget a stream (ended, reset, failed). The bytes of a partial message held back
        for it go back now: nobody will ever take a message behind them, and without this the
        connection's window would shrink by them for good, until every call hangs. (Messages
        already delivered are still acknowledged by their consumer, stream or no stream.)"""
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.partial_held:
            held, stream.partial_held = stream.partial_held, 0
            self._ack(stream_id, held)
        return stream

    @property
    def unacknowledged_bytes(self) -> int:
        """Flow-controlled bytes received on the connection and not given back yet (by us, or
        by h2 for a stream it closed). Once every call has ended and its messages were taken
        or released, 0: the inbound accounting leaks nothing."""
        return unacknowledged_inbound_bytes(self._h2)

    @staticmethod
    def _release_partial(stream: Stream) -> int:
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
        stream = self._drop_stream(stream_id)
        if stream is not None:
            stream.drop_outbox()
        if self._terminated:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except STREAM_GONE:
            pass

    def close(self, *, error_code: int = 0, last_stream_id: int | None = None) -> None:
        """Queue a GOAWAY and stop: whatever the peer still sends is dropped."""
        if not self._terminated:
            self._h2.close_connection(error_code=error_code, last_stream_id=last_stream_id)
            self._terminate()

    def ping(self, data: bytes = b"\0" * 8) -> None:
        """Queue a PING (its answer is a PingAcknowledged); nothing once the connection is over."""
        if not self._terminated:
            self._h2.ping(data)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        """How many bytes of DATA the stream may send now: the smaller of its window and the
        connection's, as h2 counts them (0 for a stream that is gone)."""
        try:
            return self._h2.local_flow_control_window(stream_id)
        except STREAM_GONE:
            return 0

    # --- internals -----------------------------------------------------------------------------

    def _terminate(self) -> None:
        """The connection is over for us, whichever side ended it: no stream is open any more
        (stream_open() says False, commands on a stream raise the wire's ProtocolError or do
        nothing) and what the outboxes held is dropped. h2 may be CLOSED from here on (it
        closes on a GOAWAY it sends or receives), and it is never given a command again."""
        self._terminated = True
        for stream in self._streams.values():
            stream.drop_outbox()
            stream.done = True
        self._streams.clear()

    def _open_stream(self, stream_id: int) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.done:
            raise ProtocolError(f"stream {stream_id} is not open for sending")
        return stream

    def _ensure_headers(self, stream_id: int, stream: Stream) -> None:
        """Client headers are sent by start_call; the server sends its own lazily."""

    @staticmethod
    def _enqueue(stream: Stream, item: memoryview) -> None:
        stream.outbox.append(item)
        stream.outbox_bytes += len(item)

    def _flush(self, stream_id: int, stream: Stream, events: list[Event]) -> None:
        """Hand the stream's outbox to h2 as far as the windows allow."""
        if self._terminated:
            return
        try:
            if not self._flush_outbox(stream_id, stream):
                return  # waiting for the peer to open its window
        except STREAM_GONE:
            stream.drop_outbox()
            stream.done = stream.gone = True
            self._drop_stream(stream_id)
        events.append(OutboxDrained(stream_id))

    def _flush_outbox(self, stream_id: int, stream: Stream) -> bool:
        """True when the outbox is empty afterwards."""
        outbox = stream.outbox
        while outbox:
            item = outbox[0]
            if isinstance(item, EndOfOutput):
                outbox.popleft()
                if item.headers is None:
                    self._h2.end_stream(stream_id)
                else:
                    self._send_header_block(stream_id, item.headers, end_stream=True)
                    self._drop_stream(stream_id)
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
            while outbox and not isinstance(outbox[0], EndOfOutput):
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
            h2_stream = data_stream(self._h2, stream_id)
            if h2_stream is not None:
                parts.insert(0, FRAME_HEADER.pack(size << 8, 0, stream_id))
                self._ping_forgiven = True
                emit_data(self._h2, h2_stream, self._out, parts, size)
            else:
                self._h2.send_data(stream_id, parts[0] if len(parts) == 1 else b"".join(parts))
            stream.outbox_bytes -= size
        return True

    def _stop_input(self, stream_id: int) -> None:
        """The server answered in full while the client may still send: ask it to stop,
        without error (RFC 9113 §8.1), as grpc-go does; the stream then no longer counts
        against the stream limit."""
        if half_closed_local(self._h2, stream_id):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

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
            if self._drop_stream(event.stream_id) is not None:
                status = status_from_h2_error(event.error_code)
                events.append(
                    StreamFailed(event.stream_id, status, f"stream reset by peer ({status.name})")
                )
        elif isinstance(event, h2.events.ConnectionTerminated):
            # Only an error GOAWAY reaches h2 (see _on_goaway), which is CLOSED from now on.
            message = (event.additional_data or b"").decode("utf-8", "replace")
            events.append(
                ConnectionTerminated(event.error_code or 0, event.last_stream_id or 0, message)
            )
            self._terminate()
        elif isinstance(event, h2.events.PingAckReceived):
            events.append(PingAcknowledged(event.ping_data))
        # PING is answered by h2 itself; SETTINGS are acknowledged by h2 itself.

    def _take_data(self, stream_id: int, length: int) -> bool:
        return (
            not self._terminated
            and stream_id in self._streams
            and take_inbound_data(self._h2, stream_id, length)
        )

    def _on_frame_data(self, stream_id: int, data: memoryview, events: list[Event]) -> None:
        self._on_stream_data(stream_id, data, len(data), events)

    def _on_data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        self._on_stream_data(event.stream_id, event.data, event.flow_controlled_length, events)

    def _on_stream_data(
        self, stream_id: int, data: bytes | memoryview, flow_bytes: int, events: list[Event]
    ) -> None:
        """Bytes of the stream's DATA, `flow_bytes` of window with any padding: a whole frame's
        body from h2, or a piece of one taken past it."""
        stream = self._streams.get(stream_id)
        if stream is None:
            # Data for a stream we already finished (e.g. reset): nobody will consume it.
            self._ack(stream_id, flow_bytes)
            return
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
            stream.partial_held = 0
            self._fail_stream(stream_id, exc, events)
            return
        if stream.messages_left is not None:
            stream.messages_left -= len(messages)
            if stream.messages_left < 0:
                self._ack(stream_id, flow_bytes + stream.partial_held)
                stream.partial_held = 0
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
