"""Per-message compression: identity, gzip, and decompression bounded by the message limit."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.purgatory.wire.compression import (
    SUPPORTED_ENCODINGS,
    accept_encoding_header,
    decode_message,
    decode_payload,
    encode_payload,
)
from jobworker.purgatory.wire.errors import (
    MessageTooLarge,
    ProtocolError,
    UnsupportedEncoding,
    WireError,
)
from jobworker.purgatory.wire.framing import Message

MiB = 2**20


def _zeros_bomb(mebibytes: int) -> bytes:
    """A gzip member inflating to `mebibytes` MiB of zeros, built without touching that much.

    After a full flush a deflate stream restarts with an empty window, so the compressed form of
    one MiB of zeros is the same byte string every time: repeat it, then add the final block
    and the trailer (CRC-32 and length mod 2**32) by hand.
    """
    mib_of_zeros = bytes(MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = deflate.compress(mib_of_zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(mib_of_zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = crc.to_bytes(4, "little") + (mebibytes * MiB % 2**32).to_bytes(4, "little")
    return header + segment * mebibytes + final + trailer


def test_the_bomb_builder_makes_valid_gzip() -> None:
    assert gzip.decompress(_zeros_bomb(3)) == bytes(3 * MiB)


def test_zip_bomb_stops_at_the_limit() -> None:
    bomb = _zeros_bomb(1024)  # 1 GiB of zeros in about 1 MiB
    assert len(bomb) < 4 * MiB  # passes the framing limit: only decompression can catch it
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLarge) as info:
            decode_payload("gzip", bomb, max_bytes=4 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.max_bytes == 4 * MiB
    assert info.value.declared_bytes > 4 * MiB
    assert peak < 16 * MiB


@given(st.binary(max_size=5000))
def test_gzip_round_trip(payload: bytes) -> None:
    assert decode_payload("gzip", encode_payload("gzip", payload), max_bytes=5000) == payload


def test_interoperates_with_stdlib_gzip() -> None:
    payload = b"hello gzip " * 100
    assert decode_payload("gzip", gzip.compress(payload), max_bytes=MiB) == payload
    assert gzip.decompress(encode_payload("gzip", payload)) == payload


def test_limit_is_on_the_decompressed_size_and_inclusive() -> None:
    compressed = gzip.compress(b"a" * 1000)
    assert decode_payload("gzip", compressed, max_bytes=1000) == b"a" * 1000
    with pytest.raises(MessageTooLarge) as info:
        decode_payload("gzip", compressed, max_bytes=999)
    assert info.value.declared_bytes == 1000  # a lower bound: we stop one byte past the limit


def test_concatenated_gzip_members_are_one_message() -> None:
    payload = gzip.compress(b"abc") + gzip.compress(b"def")
    assert decode_payload("gzip", payload, max_bytes=6) == b"abcdef"
    with pytest.raises(MessageTooLarge):
        decode_payload("gzip", payload, max_bytes=5)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not gzip at all",
        gzip.compress(b"truncated" * 10)[:-5],
        gzip.compress(b"body")[:10],
        gzip.compress(b"trailing") + b"garbage",
        zlib.compress(b"zlib, not gzip"),
    ],
)
def test_corrupt_gzip_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_payload("gzip", payload, max_bytes=MiB)


# Random bytes almost never start with gzip's magic; damaged real gzip streams reach the
# decompressor itself: cut short, bytes flipped, garbage appended.
_DAMAGED_GZIP = st.builds(
    lambda body, cut, flips, tail: _damage(gzip.compress(body), cut, flips) + tail,
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=400),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), max_size=3),
    st.binary(max_size=8),
)


def _damage(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    damaged = bytearray(data[: max(len(data) - cut, 0)])
    for position, mask in flips:
        if damaged:
            damaged[position % len(damaged)] ^= mask
    return bytes(damaged)


@given(st.binary(max_size=200) | _DAMAGED_GZIP)
def test_arbitrary_gzip_input_raises_only_wire_errors(payload: bytes) -> None:
    try:
        decode_payload("gzip", payload, max_bytes=100)
    except WireError:
        pass


@pytest.mark.parametrize("encoding", [None, "identity", "IDENTITY"])
def test_identity_is_a_passthrough(encoding: str | None) -> None:
    payload = b"as is"
    assert decode_payload(encoding, payload, max_bytes=5) is payload
    assert encode_payload(encoding, payload) is payload
    with pytest.raises(MessageTooLarge):
        decode_payload(encoding, payload, max_bytes=4)


def test_encoding_names_are_case_insensitive() -> None:
    assert decode_payload("GZip", gzip.compress(b"x"), max_bytes=1) == b"x"


@pytest.mark.parametrize("encoding", ["deflate", "snappy", "br", "zstd", ""])
def test_unsupported_encodings(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding) as info:
        decode_payload(encoding, b"data", max_bytes=MiB)
    assert info.value.encoding == encoding
    with pytest.raises(UnsupportedEncoding):
        encode_payload(encoding, b"data")


def test_accept_encoding_header_lists_what_we_decode() -> None:
    assert SUPPORTED_ENCODINGS == ("identity", "gzip")
    assert accept_encoding_header() == "identity,gzip"


def test_decode_message_honours_the_compressed_flag() -> None:
    plain = Message(b"plain", compressed=False)
    assert decode_message(plain, "gzip", max_bytes=MiB) == b"plain"
    assert decode_message(plain, None, max_bytes=MiB) == b"plain"
    packed = Message(gzip.compress(b"packed"), compressed=True)
    assert decode_message(packed, "gzip", max_bytes=MiB) == b"packed"
    # Spec: without a Message-Encoding the Compressed-Flag must be 0.
    for encoding in (None, "identity"):
        with pytest.raises(ProtocolError):
            decode_message(packed, encoding, max_bytes=MiB)
    with pytest.raises(UnsupportedEncoding):
        decode_message(packed, "snappy", max_bytes=MiB)
