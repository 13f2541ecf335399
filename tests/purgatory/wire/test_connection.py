"""The gRPC-over-h2 connection state, without an event loop: peers exchange bytes directly."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import DataFrame, RstStreamFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.purgatory.wire import (
    SHUTDOWN_PING,
    CallEnded,
    ClientConnection,
    ConnectionBroken,
    ConnectionTerminated,
    InputEnded,
    MessageReceived,
    OutboxDrained,
    PingAcknowledged,
    ProtocolError,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    ServerConnection,
    Status,
    StreamFailed,
    decode_metadata,
    encode_message,
)
from jobworker.purgatory.wire.client_side import CLIENT_STREAM_WINDOW_BYTES

from .peers import METHOD, Pair, goaway, parse, raw_client, raw_exchange

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def unary_request(pair: Pair, payload: bytes = b"ping", metadata=(), timeout_s=None) -> int:
    stream_id = pair.client.start_call(METHOD, metadata, timeout_s=timeout_s)
    pair.client.send_message(stream_id, payload)
    pair.client.end_input(stream_id)
    pair.exchange()
    return stream_id


def test_unary_call_round_trip_with_metadata_both_ways():
    pair = Pair()
    stream_id = unary_request(
        pair, metadata=(("x-user", "alice"), ("x-blob-bin", b"\x00\xff")), timeout_s=2.5
    )
    (request,) = pair.take("server", RequestReceived)
    assert (request.stream_id, request.method, request.authority) == (
        stream_id,
        METHOD,
        "localhost",
    )
    assert request.metadata == (("x-user", "alice"), ("x-blob-bin", b"\x00\xff"))
    assert request.timeout_s == pytest.approx(2.5)
    (message,) = pair.take("server", MessageReceived)
    assert message.payload == b"ping"
    assert pair.take("server", InputEnded) == [InputEnded(stream_id)]

    pair.server.send_headers(stream_id, (("x-initial", "yes"),))
    pair.server.send_message(stream_id, b"pong")
    pair.server.send_trailers(stream_id, Status.OK, metadata=(("x-trailing-bin", b"\x01"),))
    pair.exchange()
    assert pair.take("client", ResponseReceived) == [
        ResponseReceived(stream_id, (("x-initial", "yes"),))
    ]
    assert [m.payload for m in pair.take("client", MessageReceived)] == [b"pong"]
    assert pair.take("client", CallEnded) == [
        CallEnded(stream_id, Status.OK, "", (("x-trailing-bin", b"\x01"),))
    ]
    assert pair.server.open_streams == 0 and pair.client.open_streams == 0


def test_trailers_only_error_with_a_non_ascii_message():
    pair = Pair()
    stream_id = unary_request(pair)
    pair.server.send_trailers(stream_id, Status.NOT_FOUND, "job not found: café ☕")
    pair.exchange()
    assert pair.take("client", ResponseReceived) == []
    assert pair.take("client", CallEnded) == [
        CallEnded(stream_id, Status.NOT_FOUND, "job not found: café ☕", ())
    ]


def test_many_concurrent_streams_interleave():
    pair = Pair()
    ids = [unary_request(pair, payload=b"%d" % i) for i in range(50)]
    requests = pair.take("server", MessageReceived)
    assert sorted(m.payload for m in requests) == sorted(b"%d" % i for i in range(50))
    for stream_id in reversed(ids):
        pair.server.send_message(stream_id, str(stream_id).encode())
        pair.server.send_trailers(stream_id, Status.OK)
    pair.exchange()
    replies = {m.stream_id: m.payload for m in pair.take("client", MessageReceived)}
    assert replies == {i: str(i).encode() for i in ids}


def test_a_consumer_that_stops_reading_stops_the_sender_after_one_window():
    pair = Pair()
    stream_id = unary_request(pair)
    pair.take("server", MessageReceived)
    chunk = b"x" * 65536
    window = CLIENT_STREAM_WINDOW_BYTES
    messages = 4 * window // len(chunk)  # four times the client's stream window
    for _ in range(messages):
        pair.server.send_message(stream_id, chunk)
    pair.exchange()
    received = pair.take("client", MessageReceived)
    delivered = sum(len(m.payload) for m in received)
    assert delivered <= window  # one stream window, not more
    assert pair.server.outbound_pending(stream_id) >= 3 * window - messages * 5 - 65536
    # Consuming releases the next window, and so on until everything has arrived.
    while received:
        for m in received:
            pair.client.acknowledge(m.stream_id, m.flow_controlled_bytes)
        pair.exchange()
        received = pair.take("client", MessageReceived)
        delivered += sum(len(m.payload) for m in received)
    assert delivered == messages * 65536
    assert pair.server.outbound_pending(stream_id) == 0
    assert pair.take("server", OutboxDrained)


def test_a_message_larger_than_the_window_does_not_deadlock():
    pair = Pair()
    stream_id = unary_request(pair)
    big = bytes(range(256)) * (3 * 2**20 // 256)  # 3 MiB against a 1 MiB window, unacked
    pair.server.send_message(stream_id, big)
    pair.exchange()
    assert [m.payload for m in pair.take("client", MessageReceived)] == [big]


def test_oversize_message_is_refused_from_its_prefix():
    pair = Pair(max_message_bytes=1024)
    stream_id = pair.client.start_call(METHOD)
    pair.client.send_message(stream_id, b"y" * 5000)
    pair.exchange()
    (failed,) = pair.take("server", StreamFailed)
    assert failed.status is Status.RESOURCE_EXHAUSTED and "5000 vs. 1024" in failed.message
    (ended,) = pair.take("client", CallEnded)
    assert ended.status is Status.RESOURCE_EXHAUSTED


def test_client_reset_reaches_the_server_as_cancelled():
    pair = Pair()
    stream_id = pair.client.start_call(METHOD)
    pair.exchange()
    pair.client.reset(stream_id)
    pair.exchange()
    assert pair.take("server", StreamFailed) == [
        StreamFailed(stream_id, Status.CANCELLED, "stream reset by peer (CANCELLED)")
    ]


def test_trailers_wait_behind_pending_messages():
    pair = Pair()
    stream_id = unary_request(pair)
    for _ in range(CLIENT_STREAM_WINDOW_BYTES // 65536 + 8):  # more than a window
        pair.server.send_message(stream_id, b"z" * 65536)
    pair.server.send_trailers(stream_id, Status.OK)
    pair.exchange()
    assert pair.take("client", CallEnded) == []  # not before the data
    for _ in range(10):
        for m in pair.take("client", MessageReceived):
            pair.client.acknowledge(m.stream_id, m.flow_controlled_bytes)
        pair.exchange()
    assert [e.status for e in pair.take("client", CallEnded)] == [Status.OK]


def test_graceful_shutdown_refuses_new_streams_and_finishes_old_ones():
    pair = Pair()
    old = unary_request(pair)
    pair.server.start_graceful_shutdown()
    pair.exchange()
    (goaway,) = pair.take("client", ConnectionTerminated)
    assert goaway.last_stream_id == 2**31 - 1
    assert pair.take("server", PingAcknowledged) == [PingAcknowledged(SHUTDOWN_PING)]
    with pytest.raises(ProtocolError, match="going away"):
        pair.client.start_call(METHOD)
    pair.server.finish_graceful_shutdown()
    pair.server.send_trailers(old, Status.OK)
    pair.exchange()
    assert [e.status for e in pair.take("client", CallEnded)] == [Status.OK]
    assert pair.take("client", ConnectionTerminated)[0].last_stream_id == old


@pytest.mark.parametrize(
    "reads",
    [
        [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64],
        # A preface that goes wrong in its second read: the first part was right.
        [b"PRI * HTTP/2.0\r\n", b"\r\nXX\r\n\r\n" + b"\0" * 9],
    ],
)
def test_a_peer_not_speaking_http2_is_told_so_in_a_goaway(reads):
    # RFC 9113 §3.4: an invalid preface is a connection error PROTOCOL_ERROR; the GOAWAY may
    # be omitted, and we send it (see scanner.PREFACE), as ConnectionBroken promises.
    server = ServerConnection()
    server.initiate()
    server.data_to_send()
    for data in reads[:-1]:
        assert server.receive_data(data) == []
    with pytest.raises(ConnectionBroken, match="PROTOCOL_ERROR: invalid HTTP/2 preface"):
        server.receive_data(reads[-1])
    frame = goaway(parse(server.data_to_send()))
    assert frame.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert frame.last_stream_id == 0
    assert frame.additional_data == b"invalid HTTP/2 preface"
    assert server.receive_data(b"more") == []
    assert server.data_to_send() == b""


def test_garbage_after_the_preface_breaks_the_connection_with_a_goaway():
    raw, server = raw_client(), ServerConnection()
    server.initiate()
    raw_exchange(raw, server)
    # A DATA frame on stream 0: a connection error of type PROTOCOL_ERROR (RFC 9113 §6.1).
    with pytest.raises(ConnectionBroken):
        server.receive_data(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"\0" * 4)
    frame = goaway(parse(server.data_to_send()))
    assert frame.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert frame.last_stream_id == 0


# --- requests our own client would never send -------------------------------------------------


GOOD = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", METHOD.encode()),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def replace(headers, name, value):
    """The headers with `name` set to `value` in place (removed when value is None)."""
    return [(k, value if k == name else v) for k, v in headers if k != name or value is not None]


@pytest.mark.parametrize(
    ("headers", "http_status", "grpc_status", "message"),
    [
        (replace(GOOD, b":method", b"GET"), b"405", b"13", b"method GET not allowed"),
        (replace(GOOD, b"content-type", b"text/plain"), b"415", b"13", b"is not gRPC"),
        (replace(GOOD, b"te", None), b"200", b"13", b"te: trailers is required"),
        ([*GOOD, (b"grpc-encoding", b"br")], b"200", b"12", b"'br' is not supported"),
        ([*GOOD, (b"grpc-timeout", b"soon")], b"200", b"13", b"timeout"),
        (replace(GOOD, b":path", b"/nope"), b"200", b"13", b"malformed method path"),
    ],
)
def test_bad_requests_get_trailers_only_answers(headers, http_status, grpc_status, message):
    server = ServerConnection()
    server.initiate()
    raw = raw_client()
    raw.send_headers(1, headers, end_stream=True)
    server_events, raw_events = raw_exchange(raw, server)
    assert not [e for e in server_events if isinstance(e, RequestReceived)]
    (response,) = [e for e in raw_events if isinstance(e, h2.events.ResponseReceived)]
    fields = dict(response.headers)
    assert fields[b":status"] == http_status and fields[b"grpc-status"] == grpc_status
    assert message in fields[b"grpc-message"]
    if grpc_status == b"12":
        assert fields[b"grpc-accept-encoding"] == b"identity,gzip"


def raw_peer(*, client_side: bool) -> h2.connection.H2Connection:
    """A peer that sends whatever headers it is given, malformed ones included."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    return conn


@pytest.mark.parametrize(
    "bad",
    [
        [*GOOD, (b"X-Upper", b"1")],
        [*GOOD, (b"connection", b"keep-alive")],
        [*GOOD, (b":method", b"POST")],  # a pseudo-header after regular ones, and twice
        replace(GOOD, b":scheme", None),
        [*GOOD, (b"x-smuggled", b"a\r\nb")],
    ],
)
def test_a_malformed_request_is_a_stream_error_and_the_connection_serves_on(bad):
    server = ServerConnection()
    server.initiate()
    raw = raw_peer(client_side=True)
    raw.send_headers(1, bad, end_stream=True)
    raw.send_headers(3, GOOD)
    raw.send_data(3, encode_message(b"fine"), end_stream=True)
    server_events, raw_events = raw_exchange(raw, server)
    (reset,) = [e for e in raw_events if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not [e for e in raw_events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [e.stream_id for e in server_events if isinstance(e, RequestReceived)] == [3]
    assert [e.payload for e in server_events if isinstance(e, MessageReceived)] == [b"fine"]


def test_malformed_client_trailers_end_the_call_with_a_reset():
    server = ServerConnection()
    server.initiate()
    raw = raw_peer(client_side=True)
    raw.send_headers(1, GOOD)
    raw.send_data(1, encode_message(b"x"))
    raw.send_headers(1, [(b":path", b"/late")], end_stream=True)
    server_events, raw_events = raw_exchange(raw, server)
    (failed,) = [e for e in server_events if isinstance(e, StreamFailed)]
    assert failed.stream_id == 1 and "malformed trailers" in failed.message
    (reset,) = [e for e in raw_events if isinstance(e, h2.events.StreamReset)]
    assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert server.open_streams == 0


@pytest.mark.parametrize(
    ("response", "trailers", "problem"),
    [
        ([(b"content-type", b"application/grpc")], None, "without :status"),
        ([(b":status", b"200"), (b"Content-Type", b"application/grpc")], None, "header name"),
        (
            [(b":status", b"200"), (b"content-type", b"application/grpc")],
            [(b":status", b"200"), (b"grpc-status", b"0")],
            "':status' not allowed in TRAILERS",
        ),
    ],
)
def test_a_malformed_response_fails_only_its_call(response, trailers, problem):
    client = ClientConnection(authority="localhost")
    client.initiate()
    raw = raw_peer(client_side=False)
    first, second = client.start_call(METHOD), client.start_call(METHOD)
    for stream_id in (first, second):
        client.send_message(stream_id, b"ping")
        client.end_input(stream_id)
    raw.receive_data(client.data_to_send())
    raw.send_headers(first, response)  # the stream stays open: refusing it takes an RST_STREAM
    if trailers is not None:
        raw.send_headers(first, trailers, end_stream=True)
    raw.send_headers(second, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    raw.send_headers(second, [(b"grpc-status", b"0")], end_stream=True)
    events = client.receive_data(raw.data_to_send())
    ended = {e.stream_id: e for e in events if isinstance(e, CallEnded)}
    assert ended[first].status == Status.INTERNAL and problem in ended[first].message
    assert ended[second].status == Status.OK
    resets = [
        e for e in raw.receive_data(client.data_to_send()) if isinstance(e, h2.events.StreamReset)
    ]
    expected = [(first, h2.errors.ErrorCodes.PROTOCOL_ERROR)] if trailers is None else []
    assert [(r.stream_id, r.error_code) for r in resets] == expected


def _answer_from_server(raw, server, stream_id, metadata=()) -> list:
    raw.send_headers(stream_id, GOOD)
    raw.send_data(stream_id, encode_message(b"q"), end_stream=True)
    raw_exchange(raw, server)
    server.send_headers(stream_id, (("x-head", "h"),))
    server.send_message(stream_id, b"answer")
    server.send_trailers(stream_id, Status.OK, "done", metadata)
    return raw_exchange(raw, server)[1]


def test_response_blocks_decode_the_same_across_an_hpack_table_resize():
    # Our response blocks are HPACK literals that leave the dynamic table alone; h2's encoder
    # must still announce a table resize in the first block after it, so that one goes through
    # h2. The peer's decoder sees every block right, before, across and after the resize.
    server = ServerConnection()
    server.initiate()
    raw = raw_peer(client_side=True)
    seen = []
    for stream_id in (1, 3, 5, 7):
        if stream_id == 5:
            raw.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        events = _answer_from_server(raw, server, stream_id)
        (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        (trailers,) = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        seen.append((dict(response.headers), dict(trailers.headers)))
    for headers, trailers in seen:
        assert headers[b":status"] == b"200" and headers[b"x-head"] == b"h"
        assert headers[b"content-type"] == b"application/grpc"
        assert trailers == {b"grpc-status": b"0", b"grpc-message": b"done"}
    assert raw.decoder.header_table_size == 0  # the resize was announced


def test_trailers_larger_than_a_frame_go_out_as_continuations():
    server = ServerConnection()
    server.initiate()
    raw = raw_peer(client_side=True)
    big = b"\xa5" * 20_000  # 26,667 bytes of base64: past the 16 KiB frame size
    events = _answer_from_server(raw, server, 1, (("x-big-bin", big),))
    (trailers,) = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert decode_metadata(trailers.headers) == (("x-big-bin", big),)


def test_gzip_compressed_messages_are_accepted():
    import gzip

    server = ServerConnection()
    server.initiate()
    raw = raw_client()
    raw.send_headers(1, [*GOOD, (b"grpc-encoding", b"gzip")])
    raw.send_data(
        1, encode_message(gzip.compress(b"hello" * 100), compressed=True), end_stream=True
    )
    server_events, _ = raw_exchange(raw, server)
    assert [e.payload for e in server_events if isinstance(e, MessageReceived)] == [b"hello" * 100]


def test_requests_after_the_final_goaway_are_refused():
    server = ServerConnection()
    server.initiate()
    raw = raw_client()
    raw.send_headers(1, GOOD)
    raw_exchange(raw, server)
    server.start_graceful_shutdown()
    server.finish_graceful_shutdown()
    server.data_to_send()  # never delivered: a client that ignores (or has not seen) GOAWAY
    raw.send_headers(3, GOOD, end_stream=True)
    server_events, raw_events = raw_exchange(raw, server)
    assert not [e for e in server_events if isinstance(e, RequestReceived)]
    (reset,) = [e for e in raw_events if isinstance(e, h2.events.StreamReset)]
    assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    (refused,) = [e for e in server_events if isinstance(e, RequestRefused)]
    assert (refused.stream_id, refused.path, refused.status) == (3, METHOD, Status.UNAVAILABLE)


# --- arbitrary splits and corruptions ---------------------------------------------------------


def client_bytes(payload_sizes: list[int]) -> bytes:
    client = ClientConnection(authority="localhost")
    client.initiate()
    for i, size in enumerate(payload_sizes):
        stream_id = client.start_call(METHOD, (("x-i", str(i)),))
        client.send_message(stream_id, bytes([i % 256]) * size)
        client.end_input(stream_id)
    return client.data_to_send()


def feed(server: ServerConnection, data: bytes, cuts: list[int]) -> list:
    events, last = [], 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        events += server.receive_data(data[last:cut])
        last = cut
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # A client that never heard the server's SETTINGS may send only HTTP/2's default window.
    sizes=st.lists(st.integers(0, 13_000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
)
def test_arbitrary_splits_give_the_same_calls_and_every_byte_is_acknowledged(sizes, cuts):
    data = client_bytes(sizes)
    server = ServerConnection()
    server.initiate()
    events = feed(server, data, cuts)
    messages = [e for e in events if isinstance(e, MessageReceived)]
    assert [len(m.payload) for m in messages] == sizes
    assert len([e for e in events if isinstance(e, InputEnded)]) == len(sizes)
    for m in messages:
        server.acknowledge(m.stream_id, m.flow_controlled_bytes)
    # Flow-control accounting is exact: every byte received is handed back exactly once.
    assert server.acknowledged_bytes == sum(5 + s for s in sizes)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 10**5), max_size=10),
    edits=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corrupted_streams_raise_only_the_protocols_own_errors(sizes, cuts, edits):
    data = bytearray(client_bytes(sizes))
    for position, value in edits:
        data[position % len(data)] = value
    server = ServerConnection()
    server.initiate()
    try:
        feed(server, bytes(data), cuts)
    except ConnectionBroken:
        pass


def test_a_sender_slicing_messages_across_frames_still_gets_only_one_window():
    # Acknowledging partial messages on arrival would let such a sender push without limit.
    client, raw, stream_id = streaming_client()
    message = encode_message(b"m" * 60_000)
    delivered = 0
    for _ in range(400):  # 24 MB offered
        for part in (message[:59_000], message[59_000:]):
            if raw.local_flow_control_window(stream_id) < len(part):
                break
            raw.send_data(stream_id, part)
        events = client.receive_data(raw.data_to_send())
        delivered += sum(len(e.payload) for e in events if isinstance(e, MessageReceived))
        raw.receive_data(client.data_to_send())  # whatever WINDOW_UPDATEs the client grants
    # Nothing consumed: at most one stream window of messages, plus one message in progress.
    assert 0 < delivered <= CLIENT_STREAM_WINDOW_BYTES + 60_000


def test_a_message_that_fits_the_windows_is_one_data_frame_and_the_windows_stay_exact():
    raw, server = raw_client(), ServerConnection()
    server.initiate()
    # Windows and frames as large as our own client's: each message fits one frame.
    raw.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 2**20,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**20,
        }
    )
    raw.increment_flow_control_window(2**20)
    stream_id = raw.get_next_available_stream_id()
    raw.send_headers(stream_id, GOOD)
    raw.send_data(stream_id, encode_message(b"ping"), end_stream=True)
    raw_exchange(raw, server)
    window_before = server.send_window(stream_id)
    assert window_before == raw.remote_flow_control_window(stream_id)
    messages = [b"", b"a", bytes(range(256)) * 256]  # empty, tiny, 64 KiB
    for message in messages:
        server.send_message(stream_id, message)
    wire = server.data_to_send()
    data_frames = [f for f in parse(wire) if isinstance(f, DataFrame)]
    assert [bytes(f.data) for f in data_frames] == [encode_message(m) for m in messages]
    assert all(f.stream_id == stream_id and not f.flags for f in data_frames)
    sent = sum(len(encode_message(m)) for m in messages)
    assert server.send_window(stream_id) == window_before - sent
    # And the peer, which counted what it received, agrees.
    raw.receive_data(wire)
    assert raw.remote_flow_control_window(stream_id) == window_before - sent


def test_a_message_larger_than_the_peers_frames_fills_whole_frames_and_the_windows_stay_exact():
    # A peer keeping HTTP/2's default 16 KiB frames (Go's gRPC, h2 itself): the message is
    # sliced into full frames, in order, and each byte is counted once against the windows.
    raw, server = raw_client(), ServerConnection()
    server.initiate()
    stream_id = raw.get_next_available_stream_id()
    raw.send_headers(stream_id, GOOD)
    raw.send_data(stream_id, encode_message(b"ping"), end_stream=True)
    raw_exchange(raw, server)
    assert raw.local_settings.max_frame_size == 2**14
    message = bytes(range(256)) * 160  # 40,960 bytes: three frames, the last one short
    window_before = server.send_window(stream_id)
    server.send_message(stream_id, message)
    wire = server.data_to_send()
    data_frames = [f for f in parse(wire) if isinstance(f, DataFrame)]
    assert [len(f.data) for f in data_frames] == [2**14, 2**14, len(message) + 5 - 2**15]
    assert all(f.stream_id == stream_id and not f.flags for f in data_frames)
    assert b"".join(bytes(f.data) for f in data_frames) == encode_message(message)
    assert server.send_window(stream_id) == window_before - len(message) - 5
    raw.receive_data(wire)
    assert raw.remote_flow_control_window(stream_id) == window_before - len(message) - 5


# The fuzzer's minimal reproducer (without its control word): SETTINGS with
# MAX_CONCURRENT_STREAMS 0, a request on stream 1, DATA with END_STREAM ending inside a message,
# another DATA on stream 1 (after END_STREAM: h2 resets the stream itself, STREAM_CLOSED), and
# an empty header block opening stream 3 (h2 counts open streams, and drops stream 1).
FORGOTTEN_STREAM = PREFACE + bytes.fromhex(
    "0000120400000000000002000000000003000000000004004000000000e001040000000140053a7061746811"
    "2f66757a7a2e4563686f2f53747265616d400a3a617574686f726974790f3132372e302e302e313a34353332"
    "358386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c"
    "6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c"
    "20677a6970400c677270632d74696d656f757403313053400a757365722d6167656e7430677270632d707974"
    "686f6e2f312e38352e3320677270632d632f35382e302e3020286c696e75783b206368747470322900001800"
    "0100000001010000002b1f8b0800000000000003edc1310100000803a0000000000100000001000000010400"
    "000003"
)


# The same with a request answered at once (grpc-timeout "10R") and an empty DATA with
# END_STREAM: the answer goes out while the read's events are dispatched, too.
FORGOTTEN_STREAM_ANSWERED_EARLY = PREFACE + bytes.fromhex(
    "0000120400000000000002000000000003000000000004004000000000e001040000000140053a7061746811"
    "2f66757a7a2e4563686f2f53747265616d400a3a617574686f726974790f3132372e302e302e313a34353332"
    "b58386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c"
    "6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465e66c6174652c"
    "20677a6970400c677270632d74696d656f757403313052400a757365722d6167656e7430677270632d707974"
    "686f6e2f312e38352e3320677270632d632f35382e302e3020386c696e75783b206368747470322900000000"
    "0100000001000000000100000001000000010400000003"
)


@pytest.mark.parametrize("client_stream_limit", [0, None])
@pytest.mark.parametrize("early", [False, True])
def test_an_answer_on_a_stream_h2_has_already_forgotten_is_dropped(client_stream_limit, early):
    # Dispatching the read's events, the server fails stream 1 (its request ended inside a
    # message) and answers with trailers; but h2 already reset and dropped that stream, and
    # its send_headers took the id for a new stream of ours: TooManyStreamsError under the
    # client's limit of 0 (StreamIDTooLowError otherwise), raised out of receive_data.
    data = FORGOTTEN_STREAM_ANSWERED_EARLY if early else FORGOTTEN_STREAM
    if client_stream_limit is None:  # the same without the client's stream limit
        settings = bytes.fromhex("000012040000000000000200000000000300000000000400400000")
        assert data.count(settings) == 1
        data = data.replace(settings, bytes.fromhex("000000040000000000"))
    server = ServerConnection()
    server.initiate()
    server.data_to_send()
    events = server.receive_data(data)
    # Stream 3's refusal is told; stream 1's early answer, dropped with the stream, is not.
    refused = RequestRefused(
        3, "", Status.INTERNAL, "malformed request headers: REQUEST without :method"
    )
    if early:
        assert events == [refused]  # stream 1 answered at once, never handed to a handler
    else:
        assert [type(e) for e in events] == [RequestReceived, StreamFailed, RequestRefused]
        assert events[1] == StreamFailed(1, Status.INTERNAL, "request ended inside a message")
        assert events[2] == refused
    assert not server.stream_open(1)
    frames = [f for f in parse(server.data_to_send()) if not isinstance(f, SettingsFrame)]
    # h2's own reset of stream 1, the malformed stream 3 reset; no answer on a stream h2 dropped.
    assert [(type(f), f.stream_id, f.error_code) for f in frames] == [
        (RstStreamFrame, 1, h2.errors.ErrorCodes.STREAM_CLOSED),
        (RstStreamFrame, 3, h2.errors.ErrorCodes.PROTOCOL_ERROR),
    ]


# --- inbound DATA taken past h2 -----------------------------------------------------------------


def streaming_client() -> tuple[ClientConnection, h2.connection.H2Connection, int]:
    """Our client with one call open and a plain h2 server that has answered its headers."""
    client = ClientConnection(authority="localhost")
    client.initiate()
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    raw.initiate_connection()
    raw.receive_data(client.data_to_send())
    stream_id = client.start_call(METHOD)
    client.end_input(stream_id)
    raw.receive_data(client.data_to_send())
    client.receive_data(raw.data_to_send())
    raw.receive_data(client.data_to_send())
    raw.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    client.receive_data(raw.data_to_send())
    return client, raw, stream_id


def test_messages_of_a_data_frame_arrive_as_its_pieces_do():
    # One DATA frame carrying two messages, read in three pieces: the first message is
    # delivered with the piece that completes it, not when the whole frame is in (as h2's
    # own frame buffer would have it), and every byte is counted once.
    client, raw, stream_id = streaming_client()
    first, second = encode_message(b"a" * 20_000), encode_message(b"b" * 30_000)
    raw.send_data(stream_id, first + second)
    wire = raw.data_to_send()
    cut = len(wire) - len(second) + 1000  # the first message and a bit of the second
    got = [client.receive_data(piece) for piece in (wire[:100], wire[100:cut], wire[cut:])]
    payloads = [[e.payload for e in events if isinstance(e, MessageReceived)] for events in got]
    assert payloads == [[], [b"a" * 20_000], [b"b" * 30_000]]
    for events in got:
        for m in events:
            if isinstance(m, MessageReceived):
                client.acknowledge(m.stream_id, m.flow_controlled_bytes)
    assert client.acknowledged_bytes == len(first) + len(second)


def test_data_beyond_the_window_is_still_a_flow_control_error():
    # A peer ignoring our window: the frame that overflows it ends the connection (GOAWAY
    # FLOW_CONTROL_ERROR), whether the DATA before it was taken past h2 or not.
    client, raw, stream_id = streaming_client()
    window = raw.local_flow_control_window(stream_id)
    frame = 2**14
    sent = 0
    with pytest.raises(ConnectionBroken, match=r"[Ff]low control"):
        while True:
            header = (frame << 8).to_bytes(4, "big") + b"\0" + stream_id.to_bytes(4, "big")
            client.receive_data(header + bytes(frame))
            sent += frame
            assert sent <= window + frame  # it never takes more than the window
    assert sent == window  # the frame past it was the one refused
    (away,) = [f for f in parse(client.data_to_send()) if f.__class__.__name__ == "GoAwayFrame"]
    assert away.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
