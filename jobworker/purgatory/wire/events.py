"""What a gRPC connection tells its transport: events, frozen, named in the past tense.

`receive_data()` returns them (and the commands that flush an outbox add `OutboxDrained`);
h2's own events never leave the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metadata import Metadata
from .status import Status


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: a valid call started. Invalid ones never get here: they are answered at once."""

    stream_id: int
    method: str  # the :path, e.g. "/jobworker.v1.JobService/StartJob"
    metadata: Metadata
    timeout_s: float | None
    authority: str


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """Server: a request the wire answered or refused itself, for no handler to see (metadata
    over the limit, an unsupported encoding, a bad grpc-timeout or content-type, malformed
    headers, a stream over the stream limit or opened while draining). Told once, and only
    when the refusal went out: a stream the peer reset first was never a call. `status` and
    `message` are what the client was told, or reads from the reset (REFUSED_STREAM:
    UNAVAILABLE)."""

    stream_id: int
    path: str  # the :path asked for, as sent ("" when there was none)
    status: Status
    message: str


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
    connection has already said what needs saying to the peer; the handler should be cancelled.
    `answered`: the wire itself sent the peer this status and message (trailers), rather than
    a reset or nothing at all."""

    stream_id: int
    status: Status
    message: str
    answered: bool = False


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
    | RequestRefused
    | ResponseReceived
    | MessageReceived
    | InputEnded
    | CallEnded
    | StreamFailed
    | OutboxDrained
    | ConnectionTerminated
)
