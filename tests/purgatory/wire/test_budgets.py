"""What one peer can make a server connection hold or do (issue 13): each budget, attacked.

Sans-IO: a raw h2 client (or hand-built frames) talks to a ServerConnection, and the tests read
the server's answer back frame by frame. Each attack test checks that the attack ran (the
frames went in) and what it got: the exact frames and codes of the answer, and how much input
the connection held meanwhile.
"""

from __future__ import annotations

import gc
import struct
import weakref

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest
from h2.connection import H2Connection
from h2.stream import H2Stream
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from jobworker.purgatory.wire import (
    DEFAULT_MAX_HEADER_BLOCK_BYTES,
    DEFAULT_MAX_HEADER_LIST_BYTES,
    ClientConnection,
    ConnectionBroken,
    InputEnded,
    MessageReceived,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    Status,
    StreamFailed,
    encode_message,
)

from .peers import connected, goaway, live, parse

E = h2.errors.ErrorCodes
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/test.Echo/Unary"),
    (b":authority", b"localhost"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
]


def answer(server: ServerConnection) -> list[Frame]:
    return parse(server.data_to_send())


def headers_frame(stream_id: int, block: bytes, *, end_headers: bool, end_stream=False) -> bytes:
    frame = HeadersFrame(stream_id, data=block)
    if end_headers:
        frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def continuation(stream_id: int, block: bytes, *, end_headers: bool = False) -> bytes:
    frame = ContinuationFrame(stream_id, data=block)
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame.serialize()


def request(client, stream_id: int, payload: bytes | None = b"hi", headers=REQUEST) -> bytes:
    if payload is None:  # by hand: h2 would keep to our stream limit, an attacker does not
        block = client.encoder.encode(headers)
        return headers_frame(stream_id, block, end_headers=True, end_stream=True)
    client.send_headers(stream_id, headers)
    client.send_data(stream_id, encode_message(payload), end_stream=True)
    return client.data_to_send()


def trailers_status(frames: list[Frame], stream_id: int) -> int:
    """The grpc-status of a trailers-only answer on the stream."""
    (block,) = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == stream_id]
    assert "END_STREAM" in block.flags
    fields = dict(hpack.Decoder().decode(block.data, raw=True))
    return int(fields[b"grpc-status"])


# --- rows 1 and 7: header blocks ---------------------------------------------------------------


def test_a_continuation_flood_is_refused_on_the_frame_headers_before_any_decoding():
    _client, server = connected()
    # One Huffman-coded value that never ends: the block of row 1, in 4 KiB fragments.
    start = b"\x00\x81\x9f" + b"\xff" * 100
    sent = headers_frame(1, start, end_headers=False)
    assert server.receive_data(sent) == []
    with pytest.raises(ConnectionBroken, match="COMPRESSION_ERROR"):
        for _ in range(1000):  # 4 MiB if it were all taken
            fragment = continuation(1, b"\xff" * 4096)
            sent += fragment
            server.receive_data(fragment)
            # Never more than the block budget held: the flood cannot grow past it.
            assert server.buffered_input_bytes <= DEFAULT_MAX_HEADER_BLOCK_BYTES + 9 * 10
    # Refused at the first frame header that takes the block past the budget.
    assert len(sent) - 4105 <= DEFAULT_MAX_HEADER_BLOCK_BYTES + 9 * 10 < len(sent)
    frames = answer(server)
    assert goaway(frames).error_code == E.COMPRESSION_ERROR
    assert goaway(frames).last_stream_id == 0  # stream 1 was never processed
    assert server.receive_data(continuation(1, b"\xff" * 4096)) == []  # nothing more is read


def test_a_block_cut_into_many_continuation_frames_is_refused():
    _client, server = connected(max_continuation_frames=16)
    server.receive_data(headers_frame(1, b"\x82", end_headers=False))
    for _ in range(16):
        server.receive_data(continuation(1, b"\x86"))
    with pytest.raises(ConnectionBroken, match="ENHANCE_YOUR_CALM"):
        server.receive_data(continuation(1, b"\x86"))
    assert goaway(answer(server)).error_code == E.ENHANCE_YOUR_CALM


def test_a_header_list_over_the_announced_limit_costs_only_its_stream():
    client, server = connected()
    big = [*REQUEST, (b"x-big", b"a" * DEFAULT_MAX_HEADER_LIST_BYTES)]  # 16,385+ decoded
    events = server.receive_data(request(client, 1, headers=big))
    assert [e for e in events if isinstance(e, RequestReceived)] == []
    frames = answer(server)
    assert trailers_status(frames, 1) == Status.RESOURCE_EXHAUSTED
    assert not [f for f in frames if isinstance(f, GoAwayFrame)]
    # HPACK stayed in sync: the next request on the connection is served.
    events = server.receive_data(request(client, 3))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [3]


def test_a_list_at_the_announced_limit_is_accepted():
    client, server = connected()
    fields = [*REQUEST, (b"x-pad", b"")]
    size = sum(len(n) + len(v) + 32 for n, v in fields)
    fields[-1] = (b"x-pad", b"p" * (DEFAULT_MAX_HEADER_LIST_BYTES - size))
    events = server.receive_data(request(client, 1, headers=fields))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1]


def padded_request(list_bytes: int) -> list[tuple[bytes, bytes]]:
    """A request whose header list is `list_bytes` long, as SETTINGS_MAX_HEADER_LIST_SIZE
    counts it."""
    fields = [*REQUEST, (b"x-pad", b"")]
    size = sum(len(n) + len(v) + 32 for n, v in fields)
    return [*REQUEST, (b"x-pad", b"p" * (list_bytes - size))]


def test_a_larger_announced_list_brings_its_block_and_decoding_budgets_along():
    # Configured alone, a list limit above the default block and decoding budgets used to
    # leave them behind: lists it announced broke the connection. Now they follow it.
    limit = 8 * DEFAULT_MAX_HEADER_LIST_BYTES
    client, server = connected(max_header_list_bytes=limit)

    def plain_request(stream_id: int, list_bytes: int) -> bytes:
        # Without Huffman coding (hpack's encoder takes seconds for this much): the block
        # is as large as the list, above the old fixed budgets.
        block = client.encoder.encode(padded_request(list_bytes), huffman=False)
        assert len(block) > DEFAULT_MAX_HEADER_BLOCK_BYTES
        return headers_frame(stream_id, block, end_headers=True, end_stream=True)

    events = server.receive_data(plain_request(1, limit))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1]
    # Just over it: refused alone, as announced, and the next request is served.
    events = server.receive_data(plain_request(3, limit + 1))
    assert [e for e in events if isinstance(e, RequestReceived)] == []
    assert trailers_status(answer(server), 3) == Status.RESOURCE_EXHAUSTED
    events = server.receive_data(request(client, 5))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [5]


@pytest.mark.parametrize("budget", ["max_header_block_bytes", "max_header_decode_bytes"])
def test_a_budget_below_the_announced_list_is_refused_at_construction(budget):
    limit = 64 * 2**10
    with pytest.raises(ValueError, match=rf"{budget} \(32768\) is below max_header_list_bytes"):
        ServerConnection(max_header_list_bytes=limit, **{budget: limit // 2})
    with pytest.raises(ValueError, match=budget):
        ClientConnection(authority="x", max_header_list_bytes=limit, **{budget: limit - 1})
    ServerConnection(max_header_list_bytes=limit, **{budget: limit})  # equal is consistent


def test_a_list_that_only_references_grows_past_the_decoding_budget_and_is_cut():
    _client, server = connected()
    encoder = hpack.Encoder()
    value = b"v" * 4000
    first = encoder.encode([*REQUEST, (b"x-v", value)])  # indexes x-v in the dynamic table
    server.receive_data(headers_frame(1, first, end_headers=True, end_stream=True))
    answer(server)
    # Twenty references: a few dozen bytes on the wire, 80 KB decoded.
    block = encoder.encode([(b"x-v", value)] * 20)
    assert len(block) < 100
    with pytest.raises(ConnectionBroken, match="protocol error"):
        server.receive_data(headers_frame(3, block, end_headers=True, end_stream=True))
    assert goaway(answer(server)).error_code == E.COMPRESSION_ERROR


def test_an_undecodable_block_is_a_compression_error():
    _client, server = connected()
    with pytest.raises(ConnectionBroken):
        server.receive_data(headers_frame(1, b"\xff\xff\xff\xff\x0f", end_headers=True))
    assert goaway(answer(server)).error_code == E.COMPRESSION_ERROR


def test_the_client_refuses_oversized_response_headers_alone():
    client = ClientConnection(authority="localhost")
    client.initiate()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    raw.initiate_connection()
    raw.receive_data(client.data_to_send())
    client.receive_data(raw.data_to_send())
    stream_id = client.start_call("/test.Echo/Unary")
    raw.receive_data(client.data_to_send())
    raw.send_headers(
        stream_id,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x", b"y" * 20000)],
    )
    events = client.receive_data(raw.data_to_send())
    (ended,) = events
    assert ended.status is Status.RESOURCE_EXHAUSTED
    rst = [f for f in parse(client.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(stream_id, E.CANCEL)]


# --- row 8: frame size -------------------------------------------------------------------------


def test_an_oversized_frame_is_refused_on_its_header_with_nothing_buffered():
    _client, server = connected()
    header = struct.pack(">IBI", (16 * 2**20 - 1) << 8 | 0x0, 0, 1)  # DATA announcing 16 MiB
    with pytest.raises(ConnectionBroken, match="FRAME_SIZE_ERROR"):
        server.receive_data(header)
    assert goaway(answer(server)).error_code == E.FRAME_SIZE_ERROR
    assert server.buffered_input_bytes == 0
    assert server.receive_data(b"\0" * 65536) == []  # the body is never taken


def test_a_frame_split_across_reads_is_held_only_as_far_as_it_came():
    client, server = connected()
    data = request(client, 1, payload=b"x" * 100_000)
    events = []
    for cut in range(0, len(data), 7):
        events += server.receive_data(data[cut : cut + 7])
        assert server.buffered_input_bytes <= 9 + 100_005 + 9
    assert [type(e) for e in events] == [RequestReceived, MessageReceived, InputEnded]


# --- row 4: acknowledgements owed --------------------------------------------------------------


def ping(n: int) -> bytes:
    return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()


def test_a_ping_flood_from_a_peer_that_never_reads_is_cut_off():
    _client, server = connected(max_pending_acks=100)
    server.receive_data(b"".join(ping(n) for n in range(100)))
    with pytest.raises(ConnectionBroken, match="ENHANCE_YOUR_CALM"):
        server.receive_data(ping(100) + SettingsFrame(0).serialize())
    frames = answer(server)
    acks = [f for f in frames if isinstance(f, PingFrame)]
    assert len(acks) == 100 and all("ACK" in f.flags for f in acks)
    assert goaway(frames).error_code == E.ENHANCE_YOUR_CALM


def test_acknowledgements_taken_by_the_transport_no_longer_count():
    _client, server = connected(max_pending_acks=100)
    for _ in range(10):
        server.receive_data(b"".join(ping(n) for n in range(60)))
        server.receive_data(SettingsFrame(0).serialize() * 40)
        frames = answer(server)  # the transport wrote them
        assert len(frames) == 100 and not any(isinstance(f, GoAwayFrame) for f in frames)


def _reset_stream_under_flood(max_pending_acks: int):
    """A raw client's request on stream 1, reset by the server (a handler cancelled), and
    one DATA frame on it, as a client that does not read would keep sending."""
    client, server = connected(max_pending_acks=max_pending_acks)
    client.send_headers(1, REQUEST)
    (started,) = server.receive_data(client.data_to_send())
    assert started.stream_id == 1
    server.reset(1)
    return server, DataFrame(1, data=b"x").serialize()


def test_h2_s_answers_to_frames_on_a_reset_stream_count_against_the_budget():
    # h2 answers each frame on a stream already reset with RST_STREAM(STREAM_CLOSED); a peer
    # that never reads made those pile up without bound before they were counted.
    server, data = _reset_stream_under_flood(100)
    for _ in range(3):
        assert server.receive_data(data * 30) == []  # 90 answers queued: within the budget
    with pytest.raises(ConnectionBroken, match="ENHANCE_YOUR_CALM"):
        server.receive_data(data * 30)
    frames = answer(server)
    resets = [f for f in frames if isinstance(f, RstStreamFrame)]
    assert resets[0].error_code == E.CANCEL  # ours
    answers = resets[1:]
    assert all(f.stream_id == 1 and f.error_code == E.STREAM_CLOSED for f in answers)
    # Counted as h2 queues them, read by read: at most the budget and the last read's frames.
    assert 100 < len(answers) <= 100 + 30
    assert goaway(frames).error_code == E.ENHANCE_YOUR_CALM
    assert frames[-1] is goaway(frames)


def test_answers_taken_by_the_transport_no_longer_count():
    server, data = _reset_stream_under_flood(100)
    for _ in range(10):
        assert server.receive_data(data * 60) == []
        frames = answer(server)  # the transport wrote them
        assert len([f for f in frames if isinstance(f, RstStreamFrame)]) >= 60
        assert not any(isinstance(f, GoAwayFrame) for f in frames)


def test_pings_faster_than_the_policy_allows_end_in_too_many_pings():
    _client, server = connected()
    now = 1000.0
    server.receive_data(ping(0), now=now)
    server.receive_data(ping(1), now=now + 1)  # strike 1 (no call open: 2 h expected)
    server.receive_data(ping(2), now=now + 2)  # strike 2
    with pytest.raises(ConnectionBroken, match="too_many_pings"):
        server.receive_data(ping(3), now=now + 3)
    frames = answer(server)
    assert goaway(frames).error_code == E.ENHANCE_YOUR_CALM
    assert goaway(frames).additional_data == b"too_many_pings"


def test_pings_after_the_server_sent_data_are_forgiven():
    client, server = connected()
    now = 0.0
    for n in range(20):
        events = server.receive_data(request(client, 2 * n + 1) + ping(n), now=now + n)
        (started,) = [e for e in events if isinstance(e, RequestReceived)]
        server.send_trailers(started.stream_id, Status.OK)  # HEADERS sent: strikes forgiven
        client.receive_data(server.data_to_send())


# --- row 3: rapid reset ------------------------------------------------------------------------


def rapid_reset(client, first: int, count: int) -> bytes:
    out = b""
    for stream_id in range(first, first + 2 * count, 2):
        client.send_headers(stream_id, REQUEST)
        client.reset_stream(stream_id)
        out += client.data_to_send()
    return out


def test_rapid_reset_is_cut_off_once_the_burst_is_spent():
    client, server = connected(max_reset_burst=50)
    events = server.receive_data(rapid_reset(client, 1, 50))
    assert len([e for e in events if isinstance(e, StreamFailed)]) == 50
    with pytest.raises(ConnectionBroken, match="ENHANCE_YOUR_CALM"):
        server.receive_data(rapid_reset(client, 101, 1))
    frames = answer(server)
    assert goaway(frames).error_code == E.ENHANCE_YOUR_CALM
    assert goaway(frames).last_stream_id == 99


def test_resets_spread_over_time_refill_the_bucket():
    client, server = connected(max_reset_burst=10, reset_refill_per_s=1.0)
    for second in range(100):  # one reset a second, 100 in all: never more than the refill
        server.receive_data(rapid_reset(client, 2 * second + 1, 1), now=float(second))
    assert not any(isinstance(f, GoAwayFrame) for f in answer(server))


# --- row 6: the stream limit -------------------------------------------------------------------


def test_the_stream_over_the_limit_is_refused_alone():
    client, server = connected()
    data = b"".join(request(client, 2 * n + 1, payload=None) for n in range(101))
    events = server.receive_data(data)  # 101 requests in one read
    started = [e.stream_id for e in events if isinstance(e, RequestReceived)]
    assert started == [2 * n + 1 for n in range(100)]
    frames = answer(server)
    assert not any(isinstance(f, GoAwayFrame) for f in frames)
    refused = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
    assert refused == [(201, E.REFUSED_STREAM)]
    # ...and told, once: the server's observer counts it as a call.
    told = [(e.stream_id, e.status) for e in events if isinstance(e, RequestRefused)]
    assert told == [(201, Status.UNAVAILABLE)]
    # Once a call ends, a new stream is accepted again.
    server.send_trailers(1, Status.OK)
    answer(server)
    events = server.receive_data(request(client, 203, payload=None))
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [203]


def test_refused_streams_draw_on_the_reset_budget():
    client, server = connected(max_concurrent_streams=1, max_reset_burst=5)
    server.receive_data(request(client, 1, payload=None))
    for n in range(5):
        server.receive_data(request(client, 3 + 2 * n, payload=None))
    with pytest.raises(ConnectionBroken, match="ENHANCE_YOUR_CALM"):
        server.receive_data(request(client, 13, payload=None))
    frames = answer(server)
    assert [f.error_code for f in frames if isinstance(f, RstStreamFrame)] == [E.REFUSED_STREAM] * 5
    assert goaway(frames).error_code == E.ENHANCE_YOUR_CALM


# --- row 11: extra messages on a unary call ----------------------------------------------------


def test_a_flood_of_extra_messages_ends_the_call_with_internal():
    client, server = connected(max_request_messages=1)
    client.send_headers(1, REQUEST)
    client.send_data(1, encode_message(b"one") + encode_message(b"") * 10_000)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, StreamFailed]
    (failed,) = [e for e in events if isinstance(e, StreamFailed)]
    assert failed.status is Status.INTERNAL
    frames = answer(server)
    assert trailers_status(frames, 1) == Status.INTERNAL
    rst = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
    assert rst == [(1, E.NO_ERROR)]  # stop sending (RFC 9113 §8.1)
    # What still comes is dropped without events, and its window is given back.
    more = DataFrame(1, data=encode_message(b"") * 1000).serialize()
    assert server.receive_data(more) == []


def test_one_message_is_delivered_when_one_is_allowed():
    client, server = connected(max_request_messages=1)
    events = server.receive_data(request(client, 1))
    assert [type(e) for e in events] == [RequestReceived, MessageReceived, InputEnded]


def test_a_streaming_path_takes_many_messages_even_in_the_read_that_opened_it():
    # The rule is the path's, fixed when the headers arrive: the messages in the same read are
    # judged by it, not by the unary limit.
    path = dict(REQUEST)[b":path"].decode()
    streaming = {path}
    client, server = connected(max_request_messages=1, streaming_request=streaming.__contains__)
    client.send_headers(1, REQUEST)
    client.send_data(1, encode_message(b"one") + encode_message(b"two") + encode_message(b"3"))
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, *[MessageReceived] * 3]
    assert [e.payload for e in events if isinstance(e, MessageReceived)] == [b"one", b"two", b"3"]
    # Another path on the same connection keeps the unary rule.
    streaming.discard(path)
    client.send_headers(3, REQUEST)
    client.send_data(3, encode_message(b"one") + encode_message(b"two"))
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, StreamFailed]


# --- row 12: content-subtype -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "status"),
    [(b"application/grpc+json", Status.UNIMPLEMENTED), (b"application/grpc+proto", None)],
)
def test_only_the_protobuf_content_subtype_is_served(content_type, status):
    client, server = connected()
    headers = [(n, content_type if n == b"content-type" else v) for n, v in REQUEST]
    events = server.receive_data(request(client, 1, headers=headers))
    started = [e for e in events if isinstance(e, RequestReceived)]
    if status is None:
        assert len(started) == 1
    else:
        assert started == []
        assert trailers_status(answer(server), 1) == status


# --- row 10: memory without the cyclic GC ------------------------------------------------------


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_disposed_connection_is_freed_by_reference_counting_alone(no_gc):
    client, server = connected()
    for stream_id in (1, 3, 5):
        server.receive_data(request(client, stream_id))
        server.send_message(stream_id, b"reply")
    server.send_trailers(1, Status.OK)
    server.receive_data(headers_frame(7, b"\x82", end_headers=False))
    for _ in range(5):
        server.receive_data(continuation(7, b"\x86" * 1000))
    connections = live(H2Connection)
    connection = weakref.ref(server)
    server.dispose()
    assert server.data_to_send() == b"" and server.receive_data(ping(1)) == []
    del server
    assert connection() is None
    # The server's h2 connection and streams are gone; the raw client's are all that is left.
    assert live(H2Connection) == connections - 1
    assert live(H2Stream) == len(client.streams)


def test_a_disposed_connection_after_a_refusal_is_freed_too(no_gc):
    _client, server = connected()
    with pytest.raises(ConnectionBroken):
        server.receive_data(headers_frame(1, b"\xff\xff\xff\xff\x0f", end_headers=True))
    connections = live(H2Connection)
    server.dispose()
    del server
    assert live(H2Connection) == connections - 1


def test_without_dispose_h2_holds_cycles(no_gc):
    """The premise: otherwise dispose() would be pointless, and the test above proves nothing."""
    _client, server = connected()
    connections = live(H2Connection)
    del server
    assert live(H2Connection) == connections
    gc.collect()
    assert live(H2Connection) == connections - 1
