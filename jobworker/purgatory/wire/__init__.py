"""The sans-IO core of purgatory: bytes in, events out. No I/O, no clocks, no trio.

The rest of purgatory, the service and the tests import wire names from here; the submodules
are the wire's own rooms and may move. The names below are kept stable.
"""

from .client_side import ClientConnection
from .compression import SUPPORTED_ENCODINGS
from .core import (
    DEFAULT_CONNECTION_WINDOW_BYTES,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_STREAM_WINDOW_BYTES,
)
from .errors import ConnectionBroken, MessageTooLarge, ProtocolError, UnsupportedEncoding, WireError
from .events import (
    CallEnded,
    ConnectionTerminated,
    Event,
    InputEnded,
    MessageReceived,
    OutboxDrained,
    PingAcknowledged,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    StreamFailed,
)
from .framing import DEFAULT_MAX_MESSAGE_BYTES, PREFIX_BYTES, encode_message
from .metadata import RESERVED_KEYS, STATUS_DETAILS_KEY, Metadata, decode_metadata, encode_metadata
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
    header_budgets,
)
from .server_side import SHUTDOWN_PING, ServerConnection
from .status import (
    GrpcError,
    Status,
    decode_grpc_message,
    encode_grpc_message,
    parse_grpc_status,
    status_from_h2_error,
    status_from_http,
)
from .timeout import MAX_TIMEOUT_S, encode_grpc_timeout, parse_grpc_timeout

__all__ = [
    "DEFAULT_CONNECTION_WINDOW_BYTES",
    "DEFAULT_IDLE_PING_INTERVAL_S",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "DEFAULT_MAX_CONTINUATION_FRAMES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_HEADER_BLOCK_BYTES",
    "DEFAULT_MAX_HEADER_DECODE_BYTES",
    "DEFAULT_MAX_HEADER_LIST_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PENDING_ACKS",
    "DEFAULT_MAX_PING_STRIKES",
    "DEFAULT_MAX_RESET_BURST",
    "DEFAULT_MIN_PING_INTERVAL_S",
    "DEFAULT_RESET_REFILL_PER_S",
    "DEFAULT_STREAM_WINDOW_BYTES",
    "MAX_TIMEOUT_S",
    "PREFIX_BYTES",
    "RESERVED_KEYS",
    "SHUTDOWN_PING",
    "STATUS_DETAILS_KEY",
    "SUPPORTED_ENCODINGS",
    "CallEnded",
    "ClientConnection",
    "ConnectionBroken",
    "ConnectionTerminated",
    "Event",
    "GrpcError",
    "InputEnded",
    "MessageReceived",
    "MessageTooLarge",
    "Metadata",
    "OutboxDrained",
    "PingAcknowledged",
    "ProtocolError",
    "RequestReceived",
    "RequestRefused",
    "ResponseReceived",
    "ServerConnection",
    "Status",
    "StreamFailed",
    "UnsupportedEncoding",
    "WireError",
    "decode_grpc_message",
    "decode_metadata",
    "encode_grpc_message",
    "encode_grpc_timeout",
    "encode_message",
    "encode_metadata",
    "header_budgets",
    "parse_grpc_status",
    "parse_grpc_timeout",
    "status_from_h2_error",
    "status_from_http",
]
