"""The server's side of a gRPC connection: requests checked and admitted, answers, trailers,
the keepalive PING policy, refused streams and the graceful shutdown's two GOAWAYs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.errors
import h2.events
from hyperframe.frame import GoAwayFrame

from .compression import SUPPORTED_ENCODINGS, accept_encoding_header
from .core import GrpcConnection
from .errors import ProtocolError, WireError
from .events import (
    ConnectionTerminated,
    Event,
    InputEnded,
    RequestReceived,
    RequestRefused,
    StreamFailed,
)
from .fields import Block, block_problem
from .h2_internals import highest_inbound_stream_id
from .metadata import Metadata, decode_metadata, encode_metadata
from .scanner import (
    DEFAULT_IDLE_PING_INTERVAL_S,
    DEFAULT_MAX_PING_STRIKES,
    DEFAULT_MIN_PING_INTERVAL_S,
    Refusal,
)
from .status import Status, encode_grpc_message, status_from_h2_error
from .streams import (
    CONTENT_TYPE,
    STREAM_GONE,
    EndOfOutput,
    HeadersTooLarge,
    Stream,
    failure,
)
from .timeout import parse_grpc_timeout

# What every response's first header block starts with (the call's status and metadata follow).
_RESPONSE_HEADERS = (
    (b":status", b"200"),
    (b"content-type", CONTENT_TYPE),
    (b"grpc-accept-encoding", accept_encoding_header().encode()),
)

_REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR

SHUTDOWN_PING = b"shutdown"  # the PING that follows the first GOAWAY of a graceful shutdown

# h2 moves its whole connection to CLOSED on any GOAWAY, sent or received, and then refuses
# every further frame and command (python-hyper/h2#1181, open): in-flight calls could never
# finish, which is the point of a graceful GOAWAY (RFC 9113 §6.8). So graceful (NO_ERROR)
# GOAWAYs bypass h2: the server serializes its own, and each side takes the peer's out of the
# byte stream before h2 sees it. The server takes the client's error GOAWAYs out too, and ends
# every stream itself: through h2 they would make every command raise, and every frame after
# them a connection error of our own. The client lets the server's error GOAWAYs through h2,
# which rightly tears everything down (client_side.py).


class ServerConnection(GrpcConnection):
    """The server's side of one gRPC connection."""

    client_side = False

    def __init__(
        self,
        *,
        max_request_messages: int | None = None,
        streaming_request: Callable[[str], bool] | None = None,
        min_ping_interval_s: float = DEFAULT_MIN_PING_INTERVAL_S,
        idle_ping_interval_s: float = DEFAULT_IDLE_PING_INTERVAL_S,
        max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES,
        **kwargs: Any,
    ) -> None:
        """`max_request_messages`: how many messages a call's request may hold (None: any);
        the next one ends the call with INTERNAL (a unary method takes exactly one), except for
        the paths `streaming_request` says take a stream of messages: those take any number,
        each bounded by the message size limit and, while unread, by the stream's window. The
        limit is set when the request's headers arrive, before any of its DATA is read (a
        message in the same read as the headers would otherwise be judged by the wrong rule).
        The other budgets are the module's DEFAULT_* constants, under the same names in
        lowercase."""
        super().__init__(**kwargs)
        self._draining_last_stream_id: int | None = None
        self.max_request_messages = max_request_messages
        self._streaming_request = streaming_request
        self._refused: set[int] = set()  # streams refused at the stream limit, not yet reset
        self._min_ping_interval_s = min_ping_interval_s
        self._idle_ping_interval_s = idle_ping_interval_s
        self._max_ping_strikes = max_ping_strikes
        self._last_ping_at: float | None = None
        self._ping_strikes = 0
        # The client sent a graceful GOAWAY: it opens no more streams (RFC 9113 §6.8), and
        # leaves once its calls are answered.
        self.client_going_away = False

    def _refuse_stream(self, stream_id: int) -> None:
        """A stream over our MAX_CONCURRENT_STREAMS: refused alone (RFC 9113 §5.1.2), once h2
        has decoded its headers (the HPACK state must follow every block)."""
        self._spend_reset()
        self._refused.add(stream_id)

    def _refuse(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]] | None,
        error_code: int,
        message: str,
        events: list[Event],
    ) -> None:
        """Reset a request no handler will see, and tell the transport (RequestRefused) with the
        status the client reads from the reset."""
        if self._terminated:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except STREAM_GONE:
            return  # the peer reset it in the same read: it took the call back, nothing to tell
        status = status_from_h2_error(error_code)
        events.append(RequestRefused(stream_id, _path_of(headers), status, message))

    def _on_goaway(
        self,
        last_stream_id: int,
        error_code: int,
        debug: bytes,
        events: list[Event],
        before: memoryview,
    ) -> bool:
        """The client's GOAWAY, always taken out (see the note at the top). NO_ERROR: it will
        open no more streams; calls in flight go on and are answered. Any other code (unknown
        ones too, RFC 9113 §7): it is tearing the connection down; every stream fails and the
        connection is over (nothing after the GOAWAY is read). One ConnectionTerminated either
        way, for the transport to close once it has nothing left to send."""
        self._feed_h2(before, events)
        message = debug.decode("utf-8", "replace")
        if error_code == h2.errors.ErrorCodes.NO_ERROR:
            if not self.client_going_away:
                self.client_going_away = True
                events.append(ConnectionTerminated(error_code, last_stream_id, message))
            return True
        status = status_from_h2_error(error_code)
        for stream_id in self._streams:
            events.append(
                StreamFailed(stream_id, status, f"the client closed the connection ({status.name})")
            )
        events.append(ConnectionTerminated(error_code, last_stream_id, message))
        self._terminate()
        return True

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
                raise Refusal(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too_many_pings")

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
                self._fail_stream(event.stream_id, HeadersTooLarge(message), events)
            elif problem is not None and self._streams.get(event.stream_id) is not None:
                self._refuse_malformed(event.stream_id, f"malformed trailers: {problem}", events)
        else:
            super()._dispatch(event, events)

    # -- receiving --

    def _on_request(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        if (stream_id in self._refused) if self._refused else False:
            self._refused.discard(stream_id)
            limit = self.max_concurrent_streams
            why = f"refused stream: more than {limit} concurrent streams"
            self._refuse(stream_id, event.headers, _REFUSED_STREAM, why, events)
            return
        if self._draining_last_stream_id is not None and stream_id > self._draining_last_stream_id:
            why = "refused stream: opened after the server's final GOAWAY (shutting down)"
            self._refuse(stream_id, event.headers, _REFUSED_STREAM, why, events)
            return
        oversized = self._oversized(event.headers)
        if oversized:
            # Decoded whole, so HPACK is in sync: only this request is refused (as grpc-core
            # answers metadata over its limit: RESOURCE_EXHAUSTED).
            message = (
                f"header list of {oversized} bytes exceeds the limit of "
                f"{self.max_header_list_bytes} bytes"
            )
            self._answer_early(stream_id, event.headers, Status.RESOURCE_EXHAUSTED, message, events)
            return
        problem = block_problem(event.headers or (), Block.REQUEST)
        if problem is not None:
            self._spend_reset()
            message = f"malformed request headers: {problem}"  # §8.1.1: a stream error
            self._refuse(stream_id, event.headers, _PROTOCOL_ERROR, message, events)
            return
        headers = dict(event.headers or ())
        problem = _request_problem(headers)
        if problem is not None:
            http_status, status, message = problem
            self._answer_early(
                stream_id, event.headers, status, message, events, http_status=http_status
            )
            return
        encoding = headers.get(b"grpc-encoding", b"identity").decode("ascii", "replace").lower()
        if encoding not in SUPPORTED_ENCODINGS:
            message = f"grpc-encoding {encoding!r} is not supported"
            self._answer_early(stream_id, event.headers, Status.UNIMPLEMENTED, message, events)
            return
        timeout_s = None
        if b"grpc-timeout" in headers:
            try:
                timeout_s = parse_grpc_timeout(headers[b"grpc-timeout"])
            except ProtocolError as exc:
                self._answer_early(stream_id, event.headers, Status.INTERNAL, str(exc), events)
                return
        try:
            metadata = decode_metadata(event.headers or ())
        except ProtocolError as exc:
            self._answer_early(stream_id, event.headers, Status.INTERNAL, str(exc), events)
            return
        stream = Stream(self.max_message_bytes)
        path = headers[b":path"].decode("utf-8", "replace")
        streaming = self._streaming_request is not None and self._streaming_request(path)
        stream.messages_left = None if streaming else self.max_request_messages
        stream.encoding = encoding
        self._streams[stream_id] = stream
        events.append(
            RequestReceived(
                stream_id=stream_id,
                method=path,
                metadata=metadata,
                timeout_s=timeout_s,
                authority=headers.get(b":authority", b"").decode("utf-8", "replace"),
            )
        )

    def _on_input_ended(self, stream_id: int, stream: Stream, events: list[Event]) -> None:
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
        status, message = failure(exc)
        stream = self._streams.get(stream_id)
        answered = False
        if stream is not None and not stream.done:
            stream.drop_outbox()
            self.send_trailers(stream_id, status, message)
            answered = not stream.gone  # else h2 had closed the stream: the answer was dropped
        events.append(StreamFailed(stream_id, status, message, answered=answered))

    # -- sending --

    def _ensure_headers(self, stream_id: int, stream: Stream) -> None:
        if not stream.headers_sent:
            self.send_headers(stream_id)

    def send_headers(self, stream_id: int, metadata: Metadata = ()) -> None:
        """Send the response headers (initial metadata). Implied by the first message."""
        stream = self._open_stream(stream_id)
        if stream.headers_sent:
            raise ProtocolError(f"response headers already sent on stream {stream_id}")
        stream.headers_sent = True
        headers = [*_RESPONSE_HEADERS, *encode_metadata(metadata)]
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
            trailers = [*_RESPONSE_HEADERS, *trailers]
        stream.done = True
        stream.outbox.append(EndOfOutput(trailers))
        self._flush(stream_id, stream, [])

    def _answer_early(
        self,
        stream_id: int,
        request_headers: list[tuple[bytes, bytes]] | None,
        status: Status,
        message: str,
        events: list[Event],
        *,
        http_status: int = 200,
    ) -> None:
        """A trailers-only response to a request we will not hand to any handler, and the
        RequestRefused that tells the transport (unless the peer had reset the stream)."""
        if http_status == 200:
            headers = [*_RESPONSE_HEADERS]
        else:
            headers = [(b":status", str(http_status).encode())]
        headers += _status_headers(status, message)
        try:
            self._send_header_block(stream_id, headers, end_stream=True)
        except STREAM_GONE:
            return  # the peer reset it in the same read: nothing answered, nothing to tell
        try:
            # The client may still be sending; we will not read it.
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except STREAM_GONE:
            pass  # closed both ways by the answer: it was told all the same
        events.append(RequestRefused(stream_id, _path_of(request_headers), status, message))

    def start_graceful_shutdown(self) -> None:
        """First GOAWAY of a graceful shutdown: last stream 2^31-1 tells the client to stop
        opening streams without cutting any in flight (RFC 9113 §6.8), and a PING measures when
        it has seen it. Nothing once the connection is over."""
        if self._terminated:
            return
        self._send_graceful_goaway(2**31 - 1)
        self._h2.ping(SHUTDOWN_PING)

    def finish_graceful_shutdown(self) -> None:
        """Second GOAWAY: the real last stream. Streams opened after it are refused; those
        before it go on until they finish (the transport closes when none is left)."""
        if self._terminated:
            return
        last = highest_inbound_stream_id(self._h2)
        self._draining_last_stream_id = last
        self._send_graceful_goaway(last)

    def _send_graceful_goaway(self, last_stream_id: int) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._take_h2_output()
        self._out.append(frame.serialize())


def _request_problem(headers: dict[bytes, bytes]) -> tuple[int, Status, str] | None:
    """Why a request is not gRPC, as (HTTP status, gRPC status, message); None when it is."""
    if headers.get(b":method") != b"POST":
        return (
            405,
            Status.INTERNAL,
            f"method {headers.get(b':method', b'').decode(errors='replace')} not allowed",
        )
    content_type = headers.get(b"content-type", b"")
    if content_type != CONTENT_TYPE and not content_type.startswith(
        (CONTENT_TYPE + b"+", CONTENT_TYPE + b";")
    ):
        return (
            415,
            Status.INTERNAL,
            f"content-type {content_type.decode(errors='replace')!r} is not gRPC",
        )
    subtype = content_type.partition(b";")[0][len(CONTENT_TYPE) :].strip()
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


def _path_of(headers: list[tuple[bytes, bytes]] | None) -> str:
    for name, value in headers or ():
        if name == b":path":
            return value.decode("utf-8", "replace")
    return ""


def _status_headers(status: Status, message: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"grpc-status", str(int(status)).encode())]
    if message:
        headers.append((b"grpc-message", encode_grpc_message(message).encode("ascii")))
    return headers
