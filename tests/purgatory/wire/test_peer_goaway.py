"""The client's GOAWAY on the server side, sans-IO.

h2 closes its whole connection on any GOAWAY it receives (python-hyper/h2#1181), after which
every command raised h2's own ProtocolError. The fuzzer found four ways in (the byte streams
below are its minimal reproducers, without the control word): a graceful GOAWAY after a
request, and an error GOAWAY in the same read as a request the server answers at once. The
server now takes every well-formed GOAWAY out before h2 sees it: a graceful one lets the calls
in flight finish; an error one ends every stream, and no command raises afterwards."""

from __future__ import annotations

import h2.errors
import h2.events
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, RstStreamFrame

from jobworker.purgatory.wire import (
    CallEnded,
    ConnectionBroken,
    ConnectionTerminated,
    InputEnded,
    MessageReceived,
    ProtocolError,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    Status,
    StreamFailed,
    encode_message,
)

from .peers import METHOD, Pair, connected, goaway, header_blocks, parse, raw_client

PREFACE_HEX = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a"

# A unary request (HEADERS, then an empty DATA with END_STREAM), then GOAWAY(NO_ERROR, last 1).
UNARY_THEN_GRACEFUL_GOAWAY = bytes.fromhex(
    PREFACE_HEX + "0000550104000000018387448d625b7dfb5f01273b1b9361474f4186a0e41d139d094082497f"
    "864d833505b11f5f8b1d75d0620d263d4c4d65647a87aedb261a4f67af408e9acac8b0c842d6958b510f21aa9b"
    "8a3485a9264fafa9bd9abf0000000001000000010000080700000000000000000100000000"
)
# An empty header block on stream 3 (malformed: RST_STREAM PROTOCOL_ERROR), then GOAWAY
# (REFUSED_STREAM), then a stray byte.
MALFORMED_THEN_ERROR_GOAWAY = bytes.fromhex(
    PREFACE_HEX + "0000000104000000030000080700000000000000013f00000007"
)
# A request without :method (answered at once, HTTP 405), then GOAWAY with an unknown code.
NOT_GRPC_THEN_ERROR_GOAWAY = bytes.fromhex(
    PREFACE_HEX + "00001e010400000003204200878441096c6f63616c686f73744002746508747261696c6572"
    "739f00000807000000000070696e67706f6e67"
)
# A unary request, SETTINGS, a message prefix with compressed flag 0xff (the call fails at
# once: trailers INTERNAL), then GOAWAY with an unknown code.
BROKEN_PREFIX_THEN_ERROR_GOAWAY = bytes.fromhex(
    PREFACE_HEX + "0000310104000000018387448d625b7dfb5f01273b1c2a1d9ebf4186a0e41d139d094082497f"
    "864d833505b11f5f8b1d75d0620d263d4c4d6564000012040000000000000400100000000100000000000500100"
    "000000005000000000001ff000000000000080700000000003837363534333231"
)


def _server() -> ServerConnection:
    server = ServerConnection()
    server.initiate()
    server.data_to_send()
    return server


def _goaway_frame(error_code: int, last_stream_id: int = 0, debug: bytes = b"") -> bytes:
    frame = GoAwayFrame(0)
    frame.error_code = error_code
    frame.last_stream_id = last_stream_id
    frame.additional_data = debug
    return frame.serialize()


def _assert_commands_do_not_raise(server: ServerConnection, stream_ids: list[int]) -> None:
    """After the connection ended: no stream is open, and commands do nothing or raise the
    wire's own ProtocolError ("not open for sending"), never h2's."""
    for stream_id in stream_ids:
        assert not server.stream_open(stream_id)
        server.reset(stream_id)
        server.acknowledge(stream_id, 10)
        assert server.outbound_pending(stream_id) == 0
        for command, args in (
            (server.send_headers, ()),
            (server.send_message, (b"late",)),
            (server.send_trailers, (Status.OK,)),
        ):
            with pytest.raises(ProtocolError, match="not open for sending"):
                command(stream_id, *args)
    server.ping(b"12345678")
    server.start_graceful_shutdown()
    server.finish_graceful_shutdown()
    server.close()


# --- a graceful GOAWAY: the calls in flight go on -----------------------------------------------


def test_a_graceful_goaway_after_a_request_lets_the_call_be_answered():
    server = _server()
    events = server.receive_data(UNARY_THEN_GRACEFUL_GOAWAY)
    assert events[0] == RequestReceived(1, "/fuzz.Echo/Stream", (), None, "localhost")
    assert events[1:] == [InputEnded(1), ConnectionTerminated(0, 1, "")]
    assert server.client_going_away
    assert server.stream_open(1)
    server.send_message(1, b"answer")
    server.send_trailers(1, Status.OK)
    frames = parse(server.data_to_send())
    assert [type(f).__name__ for f in frames] == ["HeadersFrame", "DataFrame", "HeadersFrame"]
    (_, response, _), (_, trailers, ended) = header_blocks(frames)
    assert response[b":status"] == b"200"
    assert frames[1].data == encode_message(b"answer")
    assert trailers[b"grpc-status"] == b"0" and ended
    # h2 did not close: it still answers the client (a PING here).
    ping = PingFrame(0)
    ping.opaque_data = b"stillopn"
    assert server.receive_data(ping.serialize()) == []
    (ack,) = parse(server.data_to_send())
    assert isinstance(ack, PingFrame) and "ACK" in ack.flags and ack.opaque_data == b"stillopn"


def test_a_graceful_goaway_mid_request_lets_the_rest_of_it_arrive():
    client, server = connected()
    client.send_headers(1, _request_headers())
    server.receive_data(client.data_to_send())
    # The GOAWAY sits between the request's headers and its message; the second is ignored.
    graceful = _goaway_frame(h2.errors.ErrorCodes.NO_ERROR, 0, b"bye")
    events = server.receive_data(graceful + graceful)
    assert events == [ConnectionTerminated(0, 0, "bye")]
    client.send_data(1, encode_message(b"ping"), end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [MessageReceived, InputEnded]
    server.acknowledge(1, events[0].flow_controlled_bytes)
    server.send_message(1, b"pong")
    server.send_trailers(1, Status.OK)
    client_events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in client_events)
    (trailers,) = [e for e in client_events if isinstance(e, h2.events.TrailersReceived)]
    assert dict(trailers.headers)[b"grpc-status"] == b"0"


def test_a_goaway_s_debug_data_is_not_read_beyond_its_start_nor_fed_to_h2():
    # Debug data longer than a read, delivered in pieces: the frames after it still parse.
    _client, server = connected()
    frame = _goaway_frame(h2.errors.ErrorCodes.NO_ERROR, 0, b"x" * 5000)
    ping = PingFrame(0)
    ping.opaque_data = b"afterwrd"
    data = frame + ping.serialize()
    events = []
    for start in range(0, len(data), 700):
        events += server.receive_data(data[start : start + 700])
    (terminated,) = events
    assert terminated.message == "x" * 256  # cut short: the debug data is not ours to keep
    assert server.buffered_input_bytes == 0
    (ack,) = parse(server.data_to_send())
    assert isinstance(ack, PingFrame) and ack.opaque_data == b"afterwrd"


# --- an error GOAWAY: the client tears down; every stream ends, nothing raises ------------------


def test_a_malformed_request_then_an_error_goaway():
    server = _server()
    events = server.receive_data(MALFORMED_THEN_ERROR_GOAWAY)
    refused, terminated = events  # the refusal went out before the GOAWAY was read
    assert refused == RequestRefused(
        3, "", Status.INTERNAL, "malformed request headers: REQUEST without :method"
    )
    assert terminated == ConnectionTerminated(h2.errors.ErrorCodes.REFUSED_STREAM, 319, "")
    (reset,) = parse(server.data_to_send())  # no GOAWAY of ours: the client is leaving
    assert isinstance(reset, RstStreamFrame) and reset.stream_id == 3
    assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    _assert_commands_do_not_raise(server, [3])
    assert server.receive_data(b"\0" * 9) == []
    assert server.data_to_send() == b""


def test_a_request_answered_at_once_then_an_error_goaway():
    server = _server()
    events = server.receive_data(NOT_GRPC_THEN_ERROR_GOAWAY)
    assert [type(e) for e in events] == [RequestRefused, ConnectionTerminated]
    assert (events[0].stream_id, events[0].status) == (3, Status.INTERNAL)
    assert events[1].error_code == int.from_bytes(b"pong", "big")  # unknown: still an error
    frames = parse(server.data_to_send())
    ((stream_id, answer, ended),) = header_blocks(frames)
    assert stream_id == 3 and ended
    assert answer[b":status"] == b"405" and answer[b"grpc-status"] == b"13"
    assert isinstance(frames[-1], RstStreamFrame)
    assert frames[-1].error_code == h2.errors.ErrorCodes.NO_ERROR
    _assert_commands_do_not_raise(server, [3])


def test_a_broken_message_prefix_then_an_error_goaway():
    server = _server()
    events = server.receive_data(BROKEN_PREFIX_THEN_ERROR_GOAWAY)
    assert [type(e) for e in events] == [RequestReceived, StreamFailed, ConnectionTerminated]
    assert events[1].status == Status.INTERNAL
    frames = parse(server.data_to_send())
    ((stream_id, trailers, ended),) = header_blocks(frames)
    assert stream_id == 1 and ended and trailers[b"grpc-status"] == b"13"
    assert b"compressed flag" in trailers[b"grpc-message"]
    assert not [f for f in frames if isinstance(f, GoAwayFrame)]
    _assert_commands_do_not_raise(server, [1])


def test_an_error_goaway_fails_every_open_stream_and_ends_the_read():
    client, server = connected()
    for stream_id in (1, 3):
        client.send_headers(stream_id, _request_headers())
    client.send_data(3, encode_message(b"half"))
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived,
        RequestReceived,
        MessageReceived,
    ]
    server.send_headers(1)
    # What follows the GOAWAY in the same read (a new request here) is not read.
    client.send_headers(5, _request_headers(), end_stream=True)
    late = client.data_to_send()
    events = server.receive_data(_goaway_frame(h2.errors.ErrorCodes.CANCEL, 0, b"bye") + late)
    assert events == [
        StreamFailed(1, Status.CANCELLED, "the client closed the connection (CANCELLED)"),
        StreamFailed(3, Status.CANCELLED, "the client closed the connection (CANCELLED)"),
        ConnectionTerminated(h2.errors.ErrorCodes.CANCEL, 0, "bye"),
    ]
    assert server.open_streams == 0
    # The response headers queued before are still written; nothing is added after them.
    ((stream_id, _, _),) = header_blocks(parse(server.data_to_send()))
    assert stream_id == 1
    _assert_commands_do_not_raise(server, [1, 3, 5])
    assert server.receive_data(late) == []
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        # GOAWAY on a stream: PROTOCOL_ERROR (RFC 9113 §6.8), h2's to say.
        (bytes.fromhex("000008070000000001") + bytes(8), "PROTOCOL_ERROR"),
        # Shorter than its fixed part: FRAME_SIZE_ERROR.
        (bytes.fromhex("000004070000000000") + bytes(4), "FRAME_SIZE_ERROR"),
        # Inside a header block (HEADERS without END_HEADERS): only CONTINUATION may follow.
        (
            bytes.fromhex("000001010000000001") + b"\x82" + _goaway_frame(0),
            "PROTOCOL_ERROR",
        ),
    ],
)
def test_a_malformed_goaway_is_left_to_h2_and_breaks_the_connection(frame, why):
    _, server = connected()
    with pytest.raises(ConnectionBroken):
        server.receive_data(frame)
    closing = goaway(parse(server.data_to_send()))
    assert h2.errors.ErrorCodes(closing.error_code).name == why
    assert server.receive_data(_goaway_frame(0)) == []


def _request_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", METHOD.encode()),
        (b":authority", b"localhost"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ]


def test_a_client_closing_gracefully_through_h2_still_gets_its_answer():
    # h2's own close_connection() sends GOAWAY(NO_ERROR) after the request: the server answers.
    client = raw_client()
    server = _server()
    client.send_headers(1, _request_headers(), end_stream=True)
    client.close_connection()
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, InputEnded, ConnectionTerminated]
    server.send_trailers(1, Status.OK)
    frames = parse(server.data_to_send())
    assert header_blocks(frames)[-1][1][b"grpc-status"] == b"0"
    assert not [f for f in frames if isinstance(f, DataFrame | GoAwayFrame)]


def test_the_client_ends_every_call_on_the_server_s_error_goaway():
    # The other direction: the server's error GOAWAY goes through the client's h2, which then
    # takes no more frames, so no call can complete; none is left waiting, nothing raises.
    pair = Pair()
    first = pair.client.start_call(METHOD)
    pair.exchange()
    second = pair.client.start_call(METHOD)  # not yet seen by the server
    pair.server.close(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    pair.client_events += pair.client.receive_data(pair.server.data_to_send())
    ended = {e.stream_id: e for e in pair.take("client", CallEnded)}
    assert ended[first].status == ended[second].status == Status.UNAVAILABLE
    assert ended[first].message == "the server closed the connection (ENHANCE_YOUR_CALM)"
    assert ended[second].message == "the server went away before processing the call"
    (terminated,) = pair.take("client", ConnectionTerminated)
    assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    for stream_id in (first, second):
        assert not pair.client.stream_open(stream_id)
        pair.client.reset(stream_id)
        with pytest.raises(ProtocolError, match="not open for sending"):
            pair.client.end_input(stream_id)
