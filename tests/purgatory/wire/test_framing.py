"""Length-Prefixed-Message framing: round trips over arbitrary chunkings, limits, corruption."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobworker.purgatory.wire.errors import MessageTooLarge, ProtocolError, WireError
from jobworker.purgatory.wire.framing import (
    PREFIX_BYTES,
    Message,
    MessageDecoder,
    encode_message,
    encode_message_parts,
    encode_message_prefix,
)

MiB = 2**20


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _check_bounded(decoder: MessageDecoder) -> None:
    assert 0 <= decoder.pending_bytes < max(PREFIX_BYTES, decoder.max_message_bytes)


# --- encoding ---------------------------------------------------------------------------------


def test_encode_message_layout() -> None:
    assert encode_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert encode_message(b"", compressed=True) == b"\x01\x00\x00\x00\x00"
    assert encode_message(b"x" * 256) == b"\x00\x00\x00\x01\x00" + b"x" * 256


def test_encode_message_parts_is_the_same_bytes_without_copying() -> None:
    payload = b"p" * 1000
    prefix, body = encode_message_parts(payload, compressed=True)
    assert body is payload
    assert prefix + body == encode_message(payload, compressed=True)


@pytest.mark.parametrize("payload_bytes", [-1, 2**32])
def test_prefix_rejects_lengths_the_wire_cannot_carry(payload_bytes: int) -> None:
    with pytest.raises(ValueError):
        encode_message_prefix(payload_bytes)
    assert encode_message_prefix(2**32 - 1) == b"\x00\xff\xff\xff\xff"


# --- decoding ---------------------------------------------------------------------------------


def test_round_trip_many_messages_in_one_chunk_and_byte_by_byte() -> None:
    expected = [Message(bytes([i % 251]) * i, compressed=i % 3 == 0) for i in range(300)]
    stream = b"".join(encode_message(m.payload, compressed=m.compressed) for m in expected)

    assert MessageDecoder().feed(stream) == expected

    decoder = MessageDecoder()
    received: list[Message] = []
    for i in range(len(stream)):
        received += decoder.feed(stream[i : i + 1])
        _check_bounded(decoder)
    assert received == expected
    assert decoder.at_message_boundary


def test_message_is_a_frozen_value() -> None:
    message = Message(b"x", compressed=False)
    with pytest.raises(FrozenInstanceError):
        message.payload = b"y"  # type: ignore[misc]
    assert not hasattr(message, "__dict__")


@settings(deadline=None)
@given(
    payloads=st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_round_trip_over_arbitrary_splits(
    payloads: list[tuple[bytes, bool]], cuts: list[int], kind: type
) -> None:
    stream = b"".join(encode_message(p, compressed=c) for p, c in payloads)
    decoder = MessageDecoder(max_message_bytes=300)
    received: list[Message] = []
    for chunk in _split(stream, cuts):
        received += decoder.feed(kind(chunk))
        _check_bounded(decoder)
    assert received == [Message(p, c) for p, c in payloads]
    assert decoder.at_message_boundary
    assert decoder.pending_bytes == 0


def test_limit_is_enforced_from_the_prefix_alone() -> None:
    decoder = MessageDecoder(max_message_bytes=4 * MiB)
    prefix = encode_message_prefix(10 * MiB)
    with pytest.raises(MessageTooLarge) as info:
        decoder.feed(prefix)  # not one body byte sent
    assert (info.value.declared_bytes, info.value.max_bytes) == (10 * MiB, 4 * MiB)
    assert decoder.pending_bytes == 0
    # The stream's framing is gone for good.
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00" * 100)
    assert decoder.pending_bytes == 0


def test_limit_is_enforced_when_the_prefix_itself_is_split() -> None:
    decoder = MessageDecoder(max_message_bytes=1000)
    prefix = encode_message_prefix(1001)
    assert decoder.feed(prefix[:2]) == []
    assert decoder.pending_bytes == 2
    with pytest.raises(MessageTooLarge):
        decoder.feed(prefix[2:])
    assert decoder.pending_bytes == 0


def test_limit_is_inclusive() -> None:
    decoder = MessageDecoder(max_message_bytes=10)
    assert decoder.feed(encode_message(b"x" * 10)) == [Message(b"x" * 10, False)]
    with pytest.raises(MessageTooLarge):
        decoder.feed(encode_message(b"x" * 11))


def test_zero_limit_still_allows_empty_messages() -> None:
    decoder = MessageDecoder(max_message_bytes=0)
    assert decoder.feed(encode_message(b"") * 3) == [Message(b"", False)] * 3
    with pytest.raises(MessageTooLarge):
        decoder.feed(encode_message(b"x"))


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        MessageDecoder(max_message_bytes=-1)


@pytest.mark.parametrize("flag", [2, 0x80, 0xFF])
def test_unknown_compressed_flag_is_a_protocol_error(flag: int) -> None:
    decoder = MessageDecoder()
    good = encode_message(b"first")
    with pytest.raises(ProtocolError, match="compressed flag"):
        decoder.feed(good + struct.pack(">BI", flag, 1) + b"x")
    with pytest.raises(ProtocolError):
        decoder.feed(good)


def test_at_message_boundary_and_pending_bytes() -> None:
    decoder = MessageDecoder()
    assert decoder.at_message_boundary and decoder.pending_bytes == 0
    assert decoder.feed(b"") == []
    assert decoder.at_message_boundary

    framed = encode_message(b"0123456789")
    assert decoder.feed(framed[:3]) == []  # part of the prefix
    assert not decoder.at_message_boundary and decoder.pending_bytes == 3
    assert decoder.feed(framed[3:5]) == []  # prefix complete, body not started
    assert not decoder.at_message_boundary and decoder.pending_bytes == 0
    assert decoder.feed(framed[5:9]) == []  # part of the body
    assert not decoder.at_message_boundary and decoder.pending_bytes == 4
    assert decoder.feed(framed[9:]) == [Message(b"0123456789", False)]
    assert decoder.at_message_boundary and decoder.pending_bytes == 0

    # A zero-length message completes with its prefix.
    assert decoder.feed(encode_message(b"")) == [Message(b"", False)]
    assert decoder.at_message_boundary


def test_mutable_input_may_be_reused_after_feed() -> None:
    decoder = MessageDecoder()
    framed = encode_message(b"abcdef")
    buffer = bytearray(framed[:8])
    assert decoder.feed(memoryview(buffer)) == []
    buffer[:] = b"\xee" * len(buffer)  # the caller recycles its read buffer
    assert decoder.feed(framed[8:]) == [Message(b"abcdef", False)]


def test_many_tiny_messages_in_one_chunk() -> None:
    # Linear, not quadratic: a quadratic decoder would copy ~15 GB here and never finish.
    count = 100_000
    stream = b"".join(encode_message(bytes([i % 256])) for i in range(count))
    messages = MessageDecoder().feed(stream)
    assert len(messages) == count
    assert messages[-1] == Message(bytes([(count - 1) % 256]), False)
    assert MessageDecoder().feed(encode_message(b"") * count) == [Message(b"", False)] * count


def _peak_bytes_while(fn) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    del result
    return peak


@pytest.mark.parametrize("chunk_bytes", [None, 64 * 1024, 16 * 1024 + 3])
def test_a_message_is_copied_once(chunk_bytes: int | None) -> None:
    # Whether the message arrives whole or over many DATA frames (h2 hands us bytes), the
    # decoder holds views into them and makes exactly one copy: the payload it returns.
    size = 8 * MiB
    framed = encode_message(b"m" * size)
    chunks = (
        [framed]
        if chunk_bytes is None
        else _split(framed, list(range(0, len(framed), chunk_bytes)))
    )
    decoder = MessageDecoder(max_message_bytes=size)

    def feed_all() -> list[Message]:
        out: list[Message] = []
        for chunk in chunks:
            out += decoder.feed(chunk)
        return out

    peak = _peak_bytes_while(feed_all)
    assert size <= peak < size * 1.25


# --- corruption -------------------------------------------------------------------------------

_edits = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(1, 255)),
        st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(0, 255)),
        st.tuples(st.just("delete"), st.integers(min_value=0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


def _corrupt(stream: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(stream)
    for op, where, value in edits:
        if op == "insert":
            data.insert(where % (len(data) + 1), value)
        elif data:
            i = where % len(data)
            if op == "flip":
                data[i] ^= value
            else:
                del data[i]
    return bytes(data)


@settings(deadline=None)
@given(
    payloads=st.lists(st.tuples(st.binary(max_size=64), st.booleans()), min_size=1, max_size=8),
    edits=_edits,
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    max_message_bytes=st.sampled_from([0, 16, 64, 4 * MiB]),
)
def test_corrupted_streams_raise_only_wire_errors(
    payloads: list[tuple[bytes, bool]],
    edits: list[tuple[str, int, int]],
    cuts: list[int],
    max_message_bytes: int,
) -> None:
    stream = _corrupt(b"".join(encode_message(p, compressed=c) for p, c in payloads), edits)
    decoder = MessageDecoder(max_message_bytes=max_message_bytes)
    try:
        for chunk in _split(stream, cuts):
            for message in decoder.feed(chunk):
                assert isinstance(message.payload, bytes)
                assert len(message.payload) <= max_message_bytes
            _check_bounded(decoder)
    except WireError:
        with pytest.raises(WireError):
            decoder.feed(b"\x00" * 5)
