"""Custom metadata <-> HTTP/2 headers: validation on send, leniency (and echo-safety) on receipt."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.purgatory.wire.errors import ProtocolError
from jobworker.purgatory.wire.metadata import (
    RESERVED_KEYS,
    Metadata,
    decode_metadata,
    encode_metadata,
)


def test_round_trip_ascii_and_binary() -> None:
    md: Metadata = (
        ("x-request-id", "4f2a-1"),
        ("authorization", "Bearer y235.wef315yfh138vh31hv93hv8h3v"),
        ("trace-proto-bin", bytes(range(256))),
        ("empty-bin", b""),
        ("empty", ""),
        ("x-request-id", "second value, same key"),  # duplicates keep their order
        ("spaced", "inner  spaces are fine"),
    )
    headers = encode_metadata(md)
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in headers)
    assert decode_metadata(headers) == md


def test_keys_are_lowercased() -> None:
    assert encode_metadata([("X-Trace-ID", "a"), ("Blob-BIN", b"\x01")]) == [
        (b"x-trace-id", b"a"),
        (b"blob-bin", b"AQ"),
    ]


def test_binary_values_are_sent_unpadded() -> None:
    headers = dict(encode_metadata([("a-bin", b"\x00"), ("b-bin", b"\x00\x00"), ("c-bin", b"xyz")]))
    assert headers == {b"a-bin": b"AA", b"b-bin": b"AAA", b"c-bin": b"eHl6"}


def test_status_details_pass_through_both_ways() -> None:
    md: Metadata = (("grpc-status-details-bin", b"\x08\x05\x12\x03why"),)
    assert decode_metadata(encode_metadata(md)) == md


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "must match"),
        ("has space", "must match"),
        ("colon:inside", "must match"),
        ("slash/", "must match"),
        ("ключ", "ASCII"),
        ("\u212a-id", "ASCII"),  # KELVIN SIGN lowercases to an ASCII "k"; still refused
        (":path", "must match"),
        (":authority", "must match"),
        ("grpc-timeout", "reserved"),
        ("grpc-status", "reserved"),
        ("grpc-message", "reserved"),
        ("grpc-custom", "reserved"),  # the whole grpc- namespace is reserved
        ("GRPC-Encoding", "reserved"),  # after case folding
        *((k, "reserved") for k in sorted(RESERVED_KEYS)),
    ],
)
def test_bad_or_reserved_keys_are_refused(key: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        encode_metadata([(key, "value")])
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("token", "s3cret\n", "printable ASCII"),
        ("token", "s3cr\x7ft", "printable ASCII"),
        ("token", "sécret", "printable ASCII"),
        ("token", " s3cret", "whitespace"),
        ("token", "s3cret\t", "printable ASCII"),
        ("token", "s3cret ", "whitespace"),
        ("token", b"s3cret", "must be str"),
        ("token", 42, "must be str"),
        ("token-bin", "s3cret", "must be bytes"),
        ("token-bin", None, "must be bytes"),
    ],
)
def test_bad_values_are_refused_without_echoing_them(key: str, value: object, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        encode_metadata([(key, value)])  # type: ignore[list-item]
    assert repr(key) in str(info.value)
    assert "s3cr" not in str(info.value)  # values may be credentials


def test_decoding_accepts_padded_and_unpadded_base64() -> None:
    headers = [
        (b"a-bin", b"AA=="),
        (b"a-bin", b"AA"),
        (b"b-bin", b"AAA="),
        (b"b-bin", b"AAA"),
        (b"c-bin", b"eHl6"),
        (b"d-bin", b""),
    ]
    assert decode_metadata(headers) == (
        ("a-bin", b"\x00"),
        ("a-bin", b"\x00"),
        ("b-bin", b"\x00\x00"),
        ("b-bin", b"\x00\x00"),
        ("c-bin", b"xyz"),
        ("d-bin", b""),
    )


def test_decoding_splits_joined_binary_values() -> None:
    # Proxies may join duplicates with ","; the spec says to split -bin values before decoding.
    assert decode_metadata([(b"x-bin", b"AA,AAA=, eHl6")]) == (
        ("x-bin", b"\x00"),
        ("x-bin", b"\x00\x00"),
        ("x-bin", b"xyz"),
    )
    # ASCII values are not split: a comma is an ordinary character there.
    assert decode_metadata([(b"x", b"a,b")]) == (("x", "a,b"),)


@pytest.mark.parametrize(
    "value", [b"!!!!", b"A", b"AAAAA", b"A===", b"AA=A", b"AA==A", b"\xff\xfe"]
)
def test_invalid_base64_is_a_protocol_error(value: bytes) -> None:
    with pytest.raises(ProtocolError, match="'bad-bin'"):
        decode_metadata([(b"bad-bin", value)])


def test_transport_headers_are_dropped() -> None:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/jobworker.v1.JobService/Start"),
        (b":authority", b"localhost"),
        (b":status", b"200"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc+proto"),
        (b"user-agent", b"grpc-python/1.0"),
        (b"grpc-timeout", b"1S"),
        (b"grpc-encoding", b"gzip"),
        (b"grpc-accept-encoding", b"identity,gzip"),
        (b"grpc-status", b"0"),
        (b"grpc-message", b"ok"),
        (b"grpc-previous-rpc-attempts", b"1"),
        (b"x-kept", b"yes"),
        (b"grpc-status-details-bin", b"CAU"),
    ]
    assert decode_metadata(headers) == (("x-kept", "yes"), ("grpc-status-details-bin", b"\x08\x05"))


def test_unrepresentable_entries_are_dropped_not_fatal() -> None:
    # Valid HTTP, invalid gRPC: the spec says not to fail the call for these.
    headers = [
        (b"x-latin1", b"caf\xe9"),
        (b"x-ctl", b"a\x01b"),
        (b"x-weird!", b"token chars gRPC does not allow"),
        (b"x-ok", b"fine"),
    ]
    assert decode_metadata(headers) == (("x-ok", "fine"),)


def test_decoding_strips_surrounding_whitespace_and_folds_case() -> None:
    assert decode_metadata([(b"X-Padded", b"  v a l  \t")]) == (("x-padded", "v a l"),)


def test_decoding_accepts_str_headers() -> None:
    # h2 yields str when configured with a header_encoding.
    assert decode_metadata([(":path", "/a/b"), ("x", "y"), ("z-bin", "AQ")]) == (
        ("x", "y"),
        ("z-bin", b"\x01"),
    )


# --- properties -------------------------------------------------------------------------------

_key_chars = st.sampled_from("0123456789abcdefghijklmnopqrstuvwxyz_.-")
_names = st.text(_key_chars, min_size=1, max_size=20).filter(
    lambda k: not k.startswith("grpc-") and k not in RESERVED_KEYS and not k.endswith("-bin")
)
_ascii_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    lambda v: v.strip(" ")
)
_entries = st.one_of(
    st.tuples(_names, _ascii_values),
    st.tuples(_names.map(lambda k: k + "-bin"), st.binary(max_size=40)),
)


@given(st.lists(_entries, max_size=10).map(tuple))
def test_round_trip_property(md: Metadata) -> None:
    headers = encode_metadata(md)
    # The unpadded base64 decoder must also take what a padding sender emits.
    padded = [
        (
            k,
            base64.b64encode(base64.b64decode(v + b"=" * (-len(v) % 4)))
            if k.endswith(b"-bin")
            else v,
        )
        for k, v in headers
    ]
    assert decode_metadata(headers) == md
    assert decode_metadata(padded) == md


_received_keys = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b":path", b"te", b"grpc-status", b"grpc-status-details-bin", b"X-Up"]),
    _names.map(str.encode),
    _names.map(lambda k: (k + "-bin").encode()),
)
_received_values = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=30).map(lambda b: base64.b64encode(b).rstrip(b"=")),
    st.text(st.characters(min_codepoint=0x09, max_codepoint=0x7F), max_size=40).map(str.encode),
)


@given(st.lists(st.tuples(_received_keys, _received_values), max_size=10))
def test_received_metadata_can_always_be_echoed(headers: list[tuple[bytes, bytes]]) -> None:
    # PROTOCOL-HTTP2.md: an application echoing received metadata must not trigger an error.
    try:
        md = decode_metadata(headers)
    except ProtocolError:
        return
    assert decode_metadata(encode_metadata(md)) == md


def test_the_names_decoding_skips_at_once_are_all_reserved() -> None:
    # decode_metadata drops these before its general checks; that is only a shortcut while
    # every one of them is a name the general rule would drop too.
    from jobworker.purgatory.wire.metadata import _TRANSPORT_NAMES, is_reserved_key

    assert all(is_reserved_key(name.decode("ascii")) for name in _TRANSPORT_NAMES)
