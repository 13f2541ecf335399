"""The client's side of a gRPC connection: calls started, answers and trailers read into a
status, and the server's graceful GOAWAY taken out of the byte stream before h2 sees it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import h2.errors
import h2.events

from .compression import accept_encoding_header
from .core import GrpcConnection
from .errors import ProtocolError, WireError
from .events import CallEnded, ConnectionTerminated, Event, ResponseReceived
from .fields import Block, block_problem
from .h2_internals import open_outbound_streams
from .metadata import Metadata, decode_metadata, encode_metadata
from .status import (
    Status,
    decode_grpc_message,
    parse_grpc_status,
    status_from_h2_error,
    status_from_http,
)
from .streams import CONTENT_TYPE, EndOfOutput, Stream, failure
from .timeout import encode_grpc_timeout

# A client's receive windows are larger than core's defaults (which a server's are): a server
# streaming to us keeps this much in flight, so its sends rarely wait for our WINDOW_UPDATE
# (each of which costs us a write), and the client is one process reading its own calls, not
# a server holding windows for many peers. Still bounded: what a consumer that stops reading
# can be sent is one stream window, and all its calls together one connection window.
CLIENT_STREAM_WINDOW_BYTES = 4 * 2**20
CLIENT_CONNECTION_WINDOW_BYTES = 16 * 2**20


class ClientConnection(GrpcConnection):
    """The client's side of one gRPC connection: starts calls and reads their answers."""

    client_side = True

    def __init__(self, *, authority: str, user_agent: str = "purgatory", **kwargs: Any) -> None:
        kwargs.setdefault("stream_window_bytes", CLIENT_STREAM_WINDOW_BYTES)
        kwargs.setdefault("connection_window_bytes", CLIENT_CONNECTION_WINDOW_BYTES)
        super().__init__(**kwargs)
        self._authority = authority.encode()
        self._user_agent = user_agent.encode()
        self.goaway_last_stream_id: int | None = None

    def _on_goaway(
        self,
        last_stream_id: int,
        error_code: int,
        debug: bytes,
        events: list[Event],
        before: memoryview,
    ) -> bool:
        """A graceful GOAWAY (NO_ERROR) is taken out of the byte stream before h2 sees it (see
        server_side's _send_graceful_goaway), after the frames before it; an error one goes
        through h2, which rightly tears the connection down."""
        if error_code != h2.errors.ErrorCodes.NO_ERROR:
            return False
        self._feed_h2(before, events)
        self._on_graceful_goaway(last_stream_id, debug, events)
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
            (b"content-type", CONTENT_TYPE),
            (b"user-agent", self._user_agent),
            (b"grpc-accept-encoding", accept_encoding_header().encode()),
        ]
        if timeout_s is not None:
            headers.append((b"grpc-timeout", encode_grpc_timeout(timeout_s).encode()))
        headers += encode_metadata(metadata)
        self._h2.send_headers(stream_id, headers)
        stream = Stream(self.max_message_bytes)
        stream.headers_sent = True
        self._streams[stream_id] = stream
        return stream_id

    @property
    def stream_available(self) -> bool:
        """True if the server's MAX_CONCURRENT_STREAMS allows one more call now."""
        limit = self._h2.remote_settings.max_concurrent_streams
        return open_outbound_streams(self._h2) < limit

    def end_input(self, stream_id: int) -> None:
        """No more messages from us (END_STREAM), queued behind pending ones."""
        stream = self._open_stream(stream_id)
        stream.done = True
        stream.outbox.append(EndOfOutput(None))
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
            # An error GOAWAY (graceful ones never reach h2): the server is tearing the
            # connection down and h2 takes no more frames, so no call can complete.
            last = self.goaway_last_stream_id = event.last_stream_id or 0
            code = _error_name(event.error_code)
            for stream_id in list(self._streams):
                if stream_id > last:
                    message = "the server went away before processing the call"
                else:
                    message = f"the server closed the connection ({code})"
                self._end(stream_id, Status.UNAVAILABLE, message, (), events)
            super()._dispatch(event, events)
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
        if not content_type.startswith(CONTENT_TYPE):
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
        if self._drop_stream(stream_id) is None:
            return
        events.append(CallEnded(stream_id, status, message, metadata))

    def _refuse_malformed(self, stream_id: int, message: str, events: list[Event]) -> None:
        self._end(stream_id, Status.INTERNAL, message, (), events)
        self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _refuse_oversized(self, stream_id: int, events: list[Event]) -> None:
        message = f"response headers exceed the limit of {self.max_header_list_bytes} bytes"
        self._end(stream_id, Status.RESOURCE_EXHAUSTED, message, (), events)
        self.reset(stream_id)

    def _fail_stream(self, stream_id: int, exc: WireError, events: list[Event]) -> None:
        status, message = failure(exc)
        self._end(stream_id, status, message, (), events)
        self.reset(stream_id)


def _error_name(error_code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(error_code or 0).name
    except ValueError:
        return f"error code {error_code}"
