"""The old home of the connection, kept so that imports from `wire.connection` written before
the split still work. Import from `jobworker.purgatory.wire` instead; this module goes once
nothing imports it."""

from .client_side import ClientConnection
from .core import (
    DEFAULT_CONNECTION_WINDOW_BYTES,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_STREAM_WINDOW_BYTES,
)
from .errors import ConnectionBroken
from .events import (
    CallEnded,
    ConnectionTerminated,
    Event,
    InputEnded,
    MessageReceived,
    OutboxDrained,
    PingAcknowledged,
    RequestReceived,
    ResponseReceived,
    StreamFailed,
)
from .scanner import (
    DEFAULT_IDLE_PING_INTERVAL_S,
    DEFAULT_MAX_CONTINUATION_FRAMES,
    DEFAULT_MAX_HEADER_BLOCK_BYTES,
    DEFAULT_MAX_HEADER_DECODE_BYTES,
    DEFAULT_MAX_HEADER_LIST_BYTES,
    DEFAULT_MAX_PENDING_ACKS,
    DEFAULT_MAX_PING_STRIKES,
    DEFAULT_MAX_RESET_BURST,
    DEFAULT_MIN_PING_INTERVAL_S,
    DEFAULT_RESET_REFILL_PER_S,
    MAX_HEADER_LIST_BYTES,
)
from .server_side import SHUTDOWN_PING, ServerConnection

__all__ = [
    "DEFAULT_CONNECTION_WINDOW_BYTES",
    "DEFAULT_IDLE_PING_INTERVAL_S",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "DEFAULT_MAX_CONTINUATION_FRAMES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_HEADER_BLOCK_BYTES",
    "DEFAULT_MAX_HEADER_DECODE_BYTES",
    "DEFAULT_MAX_HEADER_LIST_BYTES",
    "DEFAULT_MAX_PENDING_ACKS",
    "DEFAULT_MAX_PING_STRIKES",
    "DEFAULT_MAX_RESET_BURST",
    "DEFAULT_MIN_PING_INTERVAL_S",
    "DEFAULT_RESET_REFILL_PER_S",
    "DEFAULT_STREAM_WINDOW_BYTES",
    "MAX_HEADER_LIST_BYTES",
    "SHUTDOWN_PING",
    "CallEnded",
    "ClientConnection",
    "ConnectionBroken",
    "ConnectionTerminated",
    "Event",
    "InputEnded",
    "MessageReceived",
    "OutboxDrained",
    "PingAcknowledged",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "StreamFailed",
]
