"""RFC 9113 §8.2/§8.3 checks of received header blocks, against h2's own validator as oracle."""

from __future__ import annotations

import h2.errors
import h2.exceptions
import h2.utilities
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobworker.purgatory.wire.fields import (
    Block,
    RepeatDecoder,
    UndecodableBlock,
    block_problem,
    encode_block,
)

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/p.S/M"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.76 grpc-c/51.0.0 (linux; chttp2)"),
    (b"x-empty", b""),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]


def with_(headers, *extra):
    return [*headers, *extra]


def without(headers, name):
    return [(k, v) for k, v in headers if k != name]


@pytest.mark.parametrize(
    ("headers", "block"),
    [
        (REQUEST, Block.REQUEST),
        (RESPONSE, Block.RESPONSE),
        (TRAILERS, Block.TRAILERS),
        ([], Block.TRAILERS),
    ],
)
def test_well_formed_blocks_pass(headers, block) -> None:
    assert block_problem(headers, block) is None


@pytest.mark.parametrize(
    ("headers", "block", "problem"),
    [
        (with_(REQUEST, (b"X-Upper", b"1")), Block.REQUEST, "invalid header name"),
        (with_(REQUEST, (b"", b"1")), Block.REQUEST, "invalid header name"),
        (with_(REQUEST, (b"a b", b"1")), Block.REQUEST, "invalid header name"),
        (with_(REQUEST, (b"a:b", b"1")), Block.REQUEST, "invalid header name"),
        (with_(REQUEST, (b"caf\xc3\xa9", b"1")), Block.REQUEST, "invalid header name"),
        (with_(REQUEST, (b"x", b"a\r\nb")), Block.REQUEST, "invalid value"),
        (with_(REQUEST, (b"x", b"a\0b")), Block.REQUEST, "invalid value"),
        (with_(REQUEST, (b"x", b" padded")), Block.REQUEST, "invalid value"),
        (with_(REQUEST, (b"x", b"padded\t")), Block.REQUEST, "invalid value"),
        (with_(REQUEST, (b"connection", b"close")), Block.REQUEST, "connection-specific"),
        (with_(REQUEST, (b"transfer-encoding", b"chunked")), Block.REQUEST, "connection-specific"),
        (with_(without(REQUEST, b"te"), (b"te", b"gzip")), Block.REQUEST, "te may only be"),
        (with_(REQUEST, (b":method", b"GET")), Block.REQUEST, "after a regular header"),
        ([(b":method", b"POST"), *REQUEST], Block.REQUEST, "duplicate pseudo-header"),
        ([(b":status", b"200"), *REQUEST], Block.REQUEST, "':status' not allowed in REQUEST"),
        ([(b":protocol", b"ws"), *REQUEST], Block.REQUEST, "':protocol' not allowed"),
        (without(REQUEST, b":path"), Block.REQUEST, "REQUEST without :path"),
        (without(REQUEST, b":scheme"), Block.REQUEST, "REQUEST without :scheme"),
        (without(REQUEST, b":method"), Block.REQUEST, "REQUEST without :method"),
        (with_(REQUEST, (b"host", b"elsewhere")), Block.REQUEST, "host and :authority"),
        (
            with_(REQUEST, (b"host", b"localhost"), (b"host", b"localhost")),
            Block.REQUEST,
            "more than one host",
        ),
        (without(REQUEST, b":authority"), Block.REQUEST, "without :authority or host"),
        ([(b":path", b""), *without(REQUEST, b":path")], Block.REQUEST, "empty :path"),
        ([(b":path", b"/x"), *RESPONSE], Block.RESPONSE, "':path' not allowed in RESPONSE"),
        (RESPONSE[1:], Block.RESPONSE, "RESPONSE without :status"),
        ([(b":status", b"200"), *TRAILERS], Block.TRAILERS, "not allowed in TRAILERS"),
    ],
)
def test_malformed_blocks_name_their_problem(headers, block, problem) -> None:
    found = block_problem(headers, block)
    assert found is not None and problem in found


def test_the_same_fields_are_judged_afresh_for_each_kind_of_block() -> None:
    """Verdicts are kept per block and kind: a request's fields are fine as a request and
    still malformed as trailers, in either order."""
    assert block_problem(REQUEST, Block.REQUEST) is None
    assert (
        block_problem(REQUEST, Block.TRAILERS) == "pseudo-header ':method' not allowed in TRAILERS"
    )
    assert block_problem(list(REQUEST), Block.REQUEST) is None
    assert block_problem(TRAILERS, Block.TRAILERS) is None
    assert block_problem(TRAILERS, Block.REQUEST) == "REQUEST without :method"


def test_a_host_header_may_stand_for_or_match_the_authority() -> None:
    assert block_problem(with_(REQUEST, (b"host", b"localhost")), Block.REQUEST) is None
    host_only = with_(without(REQUEST, b":authority"), (b"host", b"localhost"))
    assert block_problem(host_only, Block.REQUEST) is None


def _h2_accepts(headers, block: Block) -> bool:
    flags = h2.utilities.HeaderValidationFlags(
        is_client=block is not Block.REQUEST,
        is_trailer=block is Block.TRAILERS,
        is_response_header=block is Block.RESPONSE,
        is_push_promise=False,
    )
    try:
        list(h2.utilities.validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


_NAMES = st.one_of(
    st.sampled_from([b":method", b":scheme", b":path", b":authority", b":status", b"te", b"host"]),
    st.sampled_from([b"connection", b"content-type", b"x-a", b"grpc-status", b"Upper", b""]),
    st.binary(max_size=6),
)
_VALUES = st.one_of(
    st.sampled_from([b"POST", b"https", b"/p.S/M", b"trailers", b"gzip", b"200", b""]),
    st.binary(max_size=6),
)
_FIELDS = st.tuples(_NAMES, _VALUES)


@st.composite
def _near_miss(draw, base):
    """A valid block with a few fields dropped, added, replaced or given another value."""
    headers = list(base)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(headers)))
        action = draw(st.sampled_from(["drop", "add", "replace", "revalue"]))
        if action == "add" or not headers:
            headers.insert(at, draw(_FIELDS))
        elif action == "drop":
            del headers[at % len(headers)]
        elif action == "replace":
            headers[at % len(headers)] = draw(_FIELDS)
        else:
            name, _ = headers[at % len(headers)]
            headers[at % len(headers)] = (name, draw(_VALUES))
    return headers


_BLOCKS = st.one_of(
    st.lists(_FIELDS, max_size=8), _near_miss(REQUEST), _near_miss(RESPONSE), _near_miss(TRAILERS)
)


@settings(max_examples=500)
@given(_BLOCKS, st.sampled_from(Block))
def test_what_we_accept_h2_accepts_too(headers, block) -> None:
    # Our checks may be stricter than h2's (CONNECT without :path is not a gRPC request), never
    # looser: nothing h2's full validation refuses gets through.
    if block_problem(headers, block) is None:
        assert _h2_accepts(headers, block)


@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.binary(max_size=20_000)), max_size=6)
)
def test_encoded_blocks_decode_to_the_same_fields_and_leave_the_table_alone(headers) -> None:
    decoder = hpack.Decoder(max_header_list_size=2**20)
    assert decoder.decode(encode_block(headers), raw=True) == headers
    assert len(decoder.header_table.dynamic_entries) == 0


# --- RepeatDecoder: remembering blocks of references must never outlive the tables they read


def test_a_repeated_block_of_references_decodes_like_the_first_time() -> None:
    encoder, decoder = hpack.Encoder(), RepeatDecoder(max_header_list_size=2**16)
    assert decoder.decode(encoder.encode(REQUEST), raw=True) == REQUEST  # literals: indexed now
    again = encoder.encode(REQUEST)
    assert all(byte & 0x80 for byte in again)  # references only: the case remembered
    assert decoder.decode(again, raw=True) == REQUEST
    assert decoder.decode(again, raw=True) == REQUEST


def test_a_remembered_block_is_forgotten_once_the_dynamic_table_changes() -> None:
    encoder, decoder = hpack.Encoder(), RepeatDecoder(max_header_list_size=2**16)
    decoder.decode(encoder.encode([(b"x-a", b"1")]), raw=True)
    reference = encoder.encode([(b"x-a", b"1")])  # index 62: the newest dynamic entry
    assert decoder.decode(reference, raw=True) == [(b"x-a", b"1")]
    decoder.decode(encoder.encode([(b"x-b", b"2")]), raw=True)  # now index 62 is x-b
    assert decoder.decode(reference, raw=True) == [(b"x-b", b"2")]


def test_a_remembered_block_is_checked_again_under_a_smaller_header_list_limit() -> None:
    encoder, decoder = hpack.Encoder(), RepeatDecoder(max_header_list_size=2**16)
    decoder.decode(encoder.encode(REQUEST), raw=True)
    again = encoder.encode(REQUEST)
    decoder.decode(again, raw=True)
    decoder.max_header_list_size = 100
    with pytest.raises(UndecodableBlock) as caught:
        decoder.decode(again, raw=True)
    assert caught.value.error_code == h2.errors.ErrorCodes.COMPRESSION_ERROR


def test_the_remembered_blocks_are_bounded() -> None:
    decoder = RepeatDecoder(max_header_list_size=2**16)
    for index in range(1, 62):  # every static entry alone: 61 distinct blocks of a reference
        name, value = hpack.table.HeaderTable.STATIC_TABLE[index - 1]
        assert decoder.decode(bytes([0x80 | index]), raw=True) == [(name, value)]
    assert 0 < decoder.remembered_blocks <= 8


def test_only_short_lists_are_remembered() -> None:
    # A block of 40 references to one entry: short on the wire, long once decoded.
    decoder = RepeatDecoder(max_header_list_size=2**16)
    block = bytes([0x80 | 2]) * 40  # :method GET, forty times
    assert decoder.decode(block, raw=True) == [(b":method", b"GET")] * 40
    assert decoder.remembered_blocks == 0


_POOL = st.sampled_from(
    [
        [(b"x-a", b"1")],
        [(b"x-b", b"2"), (b"x-a", b"1")],
        [(b"x-c", b"3" * 40)],
        [(b"x-d", b"4" * 300)],  # a long value: an index past 127 soon follows
        [(b":method", b"POST"), (b"x-a", b"1")],
    ]
)


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("encode"), _POOL),
            st.tuples(st.just("replay"), st.integers(min_value=0)),  # an earlier block's bytes
            st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096])),
        ),
        max_size=40,
    )
)
def test_remembering_never_changes_what_a_block_decodes_to(steps) -> None:
    """Against plain hpack as oracle: the same blocks, in the same order, give the same lists
    or the same kind of error, whatever the tables went through meanwhile."""
    encoder = hpack.Encoder()
    ours, oracle = RepeatDecoder(max_header_list_size=2**16), hpack.Decoder(2**16)
    sent: list[bytes] = []
    for step, arg in steps:
        if step == "encode":
            block = encoder.encode(arg)
        elif step == "replay":
            if not sent:
                continue
            block = sent[arg % len(sent)]
        else:
            encoder.header_table_size = arg
            block = encoder.encode([(b"x-a", b"1")])  # carries the size update
        sent.append(block)
        try:
            expected = oracle.decode(block, raw=True)
        except hpack.HPACKError:
            with pytest.raises(UndecodableBlock):  # h2 answers it with COMPRESSION_ERROR
                ours.decode(block, raw=True)
            return  # a decoding error ends the connection: nothing follows it
        assert ours.decode(block, raw=True) == expected
