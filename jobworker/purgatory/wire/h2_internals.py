"""Everything the wire relies on inside h2 that h2 does not promise: the one place to look when
h2 changes.

The connection drives h2 through its public API except where that was too slow (the DATA and
HEADERS fast paths serialize frames themselves, and inbound DATA frames are taken past h2's
parser, keeping h2's books either way), too strict (a looser
stream limit than the one announced, a frame size h2 would apply only after our SETTINGS are
acknowledged) or leaky (dispose() empties h2's objects so that their cycles go without the
collector). Each function below names the h2 behaviour it assumes; tests/purgatory/wire/
test_h2_assumptions.py checks each one against the installed h2, and pyproject.toml bounds h2
to the releases those checks have passed on.

Hot paths import these functions by name and call them in place of the code they replace, one
call for one call: no layer is added per frame.
"""

from __future__ import annotations

import h2.connection
import h2.settings
import h2.stream
import hyperframe.frame

from .fields import RepeatDecoder

H2Connection = h2.connection.H2Connection
H2Stream = h2.stream.H2Stream

# The states in which h2 itself would send DATA (H2Connection.send_data, H2Stream.send_data):
# anywhere else the frame goes through h2, which raises what it raises.
_DATA_CONNECTION_STATES = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
_DATA_STREAM_STATES = frozenset(
    {h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE}
)
_HALF_CLOSED_LOCAL = h2.stream.StreamState.HALF_CLOSED_LOCAL
# The states in which h2 receives DATA quietly (RECV_DATA leaves them as they are).
_RECEIVE_DATA_STREAM_STATES = frozenset({h2.stream.StreamState.OPEN, _HALF_CLOSED_LOCAL})
_SEND_HEADERS_CONNECTION = h2.connection.ConnectionInputs.SEND_HEADERS
_SEND_HEADERS = h2.stream.StreamInputs.SEND_HEADERS
_SEND_END_STREAM = h2.stream.StreamInputs.SEND_END_STREAM


# --- setting up ------------------------------------------------------------------------------


def install_decoder(connection: H2Connection, decoder: RepeatDecoder) -> None:
    """Replace h2's HPACK decoder (assumes: h2 decodes every header block through its
    `decoder` attribute, and only updates that object's limits on SETTINGS changes)."""
    connection.decoder = decoder


def replace_local_settings(connection: H2Connection, settings: h2.settings.Settings) -> None:
    """Make `settings` the ones h2 enforces (assumes: `local_settings` is a plain attribute
    read at each check, e.g. the stream limit when a stream opens, and initiate_connection()
    announces what it holds). Only swapped with no SETTINGS awaiting acknowledgement."""
    connection.local_settings = settings


def set_max_inbound_frame_size(connection: H2Connection, size: int) -> None:
    """The largest frame h2's parser accepts (assumes: receive_data() copies
    `max_inbound_frame_size` into its frame buffer on every call)."""
    connection.max_inbound_frame_size = size


def inbound_connection_window(connection: H2Connection) -> int:
    """The connection's receive window as h2 counts it (assumes: `inbound_flow_control_window`
    is what increment_flow_control_window() raises)."""
    return connection.inbound_flow_control_window


def unacknowledged_inbound_bytes(connection: H2Connection) -> int:
    """Flow-controlled bytes the peer sent on the connection that were never acknowledged, by
    us (acknowledge_received_data) or by h2 itself (DATA on a stream it had closed) (assumes:
    the connection's inbound window manager charges every DATA frame with window_consumed(),
    counts acknowledgements in `_bytes_processed` until it turns them into a WINDOW_UPDATE,
    which raises `current_window_size`, and `max_window_size` is the highest window it ever
    had: the window our own increment set)."""
    manager = connection._inbound_flow_control_window_manager
    return manager.max_window_size - manager.current_window_size - manager._bytes_processed


# --- reading state -----------------------------------------------------------------------------


def highest_inbound_stream_id(connection: H2Connection) -> int:
    """The highest stream the peer opened (assumes: h2's `highest_inbound_stream_id`, the value
    its own close_connection() puts in a GOAWAY)."""
    return connection.highest_inbound_stream_id


def open_outbound_streams(connection: H2Connection) -> int:
    """Streams we opened that still count against the peer's MAX_CONCURRENT_STREAMS (assumes:
    h2's `open_outbound_streams`, which forgets closed streams as it counts)."""
    return connection.open_outbound_streams


def forgotten(connection: H2Connection, stream_id: int) -> bool:
    """True when h2 no longer holds a stream the peer opened: h2 closed it (ended both ways, or
    reset, perhaps by itself for a frame after END_STREAM) and dropped it the next time it
    counted open streams, as a new stream makes it do, possibly in the read whose events are
    still being dispatched (assumes: `streams` holds every stream h2 has not dropped). For such
    an id, h2's send_headers would open a new stream of ours, not answer the old one."""
    return stream_id not in connection.streams


def half_closed_local(connection: H2Connection, stream_id: int) -> bool:
    """True when we have ended the stream and the peer has not (assumes: `streams` maps open
    stream ids to H2Stream, whose `state_machine.state` is a StreamState)."""
    h2_stream = connection.streams.get(stream_id)
    return h2_stream is not None and h2_stream.state_machine.state is _HALF_CLOSED_LOCAL


# --- the DATA fast path ------------------------------------------------------------------------


def data_stream(connection: H2Connection, stream_id: int) -> H2Stream | None:
    """The stream if h2 itself would send DATA on it now, else None (assumes: `streams`;
    both state machines' `state`; h2 sends DATA only in the states listed above)."""
    h2_stream = connection.streams.get(stream_id)
    if (
        h2_stream is None
        or h2_stream.state_machine.state not in _DATA_STREAM_STATES
        or connection.state_machine.state not in _DATA_CONNECTION_STATES
    ):
        return None
    return h2_stream


def whole_data_stream(connection: H2Connection, stream_id: int, size: int) -> H2Stream | None:
    """As data_stream(), and only if both send windows hold `size` bytes (assumes: the
    `outbound_flow_control_window` attributes of the connection and the stream are the windows
    local_flow_control_window() takes the smaller of)."""
    h2_stream = connection.streams.get(stream_id)
    if (
        h2_stream is None
        or size > h2_stream.outbound_flow_control_window
        or size > connection.outbound_flow_control_window
        or h2_stream.state_machine.state not in _DATA_STREAM_STATES
        or connection.state_machine.state not in _DATA_CONNECTION_STATES
    ):
        return None
    return h2_stream


def emit_data(
    connection: H2Connection,
    h2_stream: H2Stream,
    out: list[bytes | memoryview],
    pieces: list[bytes | memoryview],
    size: int,
) -> None:
    """DATA frames serialized by the caller (`pieces`, carrying `size` bytes of payload, no
    END_STREAM, no padding) go to `out` behind h2's pending output, and both send windows are
    charged as h2's send_data() would charge them (assumes: send_data() only subtracts the
    payload from the two `outbound_flow_control_window` attributes, and DATA without END_STREAM
    leaves both state machines where they are), so h2's windows stay true for every frame it
    still sends and every WINDOW_UPDATE it receives."""
    pending = connection.data_to_send()
    if pending:
        out.append(pending)
    out += pieces
    connection.outbound_flow_control_window -= size
    h2_stream.outbound_flow_control_window -= size


# --- the inbound DATA fast path ----------------------------------------------------------------


def take_inbound_data(connection: H2Connection, stream_id: int, length: int) -> bool:
    """Receive a DATA frame of `length` bytes (unpadded, without END_STREAM) past h2's parser:
    if h2 would take it quietly, keep h2's books as its receive_data() would and return True;
    else change nothing and return False, and the frame must go through h2 (which raises or
    answers what it does: a closed or unknown stream, a frame over a receive window, DATA
    before the stream's headers or in a state that cannot take it, a body h2 checks against a
    content-length) (assumes: for such a frame h2's _receive_data_frame() feeds RECV_DATA to
    both state machines, which leave OPEN / HALF_CLOSED_LOCAL and CLIENT_OPEN / SERVER_OPEN
    as they are and need `headers_received`; charges the connection's and the stream's
    inbound window managers through window_consumed(), which fails below 0; and adds the
    length to the stream's `_actual_content_length`, checked only against
    `_expected_content_length`)."""
    h2_stream = connection.streams.get(stream_id)
    if h2_stream is None or connection.state_machine.state not in _DATA_CONNECTION_STATES:
        return False
    machine = h2_stream.state_machine
    if (
        machine.state not in _RECEIVE_DATA_STREAM_STATES
        or not machine.headers_received
        or h2_stream._expected_content_length is not None
    ):
        return False
    connection_window = connection._inbound_flow_control_window_manager
    stream_window = h2_stream._inbound_window_manager
    if length > connection_window.current_window_size or length > stream_window.current_window_size:
        return False
    connection_window.current_window_size -= length
    stream_window.current_window_size -= length
    h2_stream._actual_content_length += length
    return True


# --- the HEADERS fast path ---------------------------------------------------------------------


def literal_headers_stream(
    connection: H2Connection, stream_id: int, block_bytes: int
) -> H2Stream | None:
    """The stream if a block of HPACK literals, which leaves the dynamic table alone, can go
    out in one HEADERS frame past h2's encoder, else None (assumes: `streams`; the encoder's
    `header_table.resized` is set while h2 owes the peer a table size update, which only its
    own encoder can announce)."""
    h2_stream = connection.streams.get(stream_id)
    if (
        h2_stream is None
        or block_bytes > connection.max_outbound_frame_size
        or connection.encoder.header_table.resized
    ):
        return None
    return h2_stream


def emit_headers(
    connection: H2Connection,
    h2_stream: H2Stream,
    out: list[bytes | memoryview],
    frame: bytes,
    *,
    end_stream: bool,
) -> None:
    """One serialized HEADERS frame goes to `out` behind h2's pending output, after the state
    transitions h2's send_headers() makes, which raise what h2 would raise (assumes: those
    transitions are SEND_HEADERS on both state machines, then SEND_END_STREAM on the stream)."""
    connection.state_machine.process_input(_SEND_HEADERS_CONNECTION)
    h2_stream.state_machine.process_input(_SEND_HEADERS)
    if end_stream:
        h2_stream.state_machine.process_input(_SEND_END_STREAM)
    pending = connection.data_to_send()
    if pending:
        out.append(pending)
    out.append(frame)


# --- tearing down ------------------------------------------------------------------------------


def break_cycles(connection: H2Connection) -> None:
    """Empty h2's objects, so that nothing it built refers back to itself: the connection's
    dispatch tables hold its bound methods, each stream's state machine and callbacks refer
    to the stream, the frame buffer holds frames (assumes: h2 keeps its state in instance
    dicts, `streams` holds every stream, `incoming_buffer` the frame buffer)."""
    for h2_stream in list(connection.streams.values()):
        for part in (h2_stream.state_machine, h2_stream):
            vars(part).clear()
    for part in (connection.state_machine, connection.incoming_buffer, connection):
        vars(part).clear()


# --- frame repr --------------------------------------------------------------------------------


def _cheap_repr(self: hyperframe.frame.Frame) -> str:
    return f"{type(self).__name__}(stream_id={self.stream_id})"


def _make_frame_repr_cheap() -> None:
    """h2 formats repr(frame) for every frame it receives, logging on or off (assumes:
    H2Connection._receive_frame calls repr() eagerly). hyperframe's repr formats flags and
    body, and a DATA frame's serializes and hexlifies the whole payload: over a CPU-second per
    GiB received. The repr is for debugging only, so it is made cheap for every frame type.

    This is process-wide, and the only such change the wire makes. Per connection was weighed
    and refused: frames are built from hyperframe's module-wide FRAMES table inside h2's
    FrameBuffer and dispatched on their exact class, so a per-connection repr needs either a
    copy of FrameBuffer.__next__ or a wrapper around every frame (a layer per frame); swapping
    the repr in and out around each read invalidates the type caches of every frame class on
    every read. Another patch of Frame.__repr__ (a debugging aid) is left alone."""
    if hyperframe.frame.Frame.__dict__["__repr__"].__module__ == "hyperframe.frame":
        hyperframe.frame.Frame.__repr__ = _cheap_repr  # type: ignore[method-assign]


_make_frame_repr_cheap()

__all__ = [
    "H2Connection",
    "H2Stream",
    "break_cycles",
    "data_stream",
    "emit_data",
    "emit_headers",
    "forgotten",
    "half_closed_local",
    "highest_inbound_stream_id",
    "inbound_connection_window",
    "install_decoder",
    "literal_headers_stream",
    "open_outbound_streams",
    "replace_local_settings",
    "set_max_inbound_frame_size",
    "take_inbound_data",
    "whole_data_stream",
]
