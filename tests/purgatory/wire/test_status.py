"""Status codes, GrpcError and the status-related header codecs, against the spec's tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.purgatory.wire.status import (
    GrpcError,
    Status,
    decode_grpc_message,
    encode_grpc_message,
    parse_grpc_status,
    status_from_h2_error,
    status_from_http,
)

# grpc/grpc doc/statuscodes.md, "Code | Number".
SPEC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

# grpc/grpc doc/http-grpc-status-mapping.md.
SPEC_HTTP_MAPPING = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    431: Status.INTERNAL,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}

# grpc/grpc doc/PROTOCOL-HTTP2.md, "Errors" (RST_STREAM code -> status, client side).
SPEC_H2_MAPPING = {
    0x0: Status.INTERNAL,  # NO_ERROR
    0x1: Status.INTERNAL,  # PROTOCOL_ERROR
    0x2: Status.INTERNAL,  # INTERNAL_ERROR
    0x3: Status.INTERNAL,  # FLOW_CONTROL_ERROR
    0x4: Status.INTERNAL,  # SETTINGS_TIMEOUT
    0x6: Status.INTERNAL,  # FRAME_SIZE_ERROR
    0x7: Status.UNAVAILABLE,  # REFUSED_STREAM
    0x8: Status.CANCELLED,  # CANCEL
    0x9: Status.INTERNAL,  # COMPRESSION_ERROR
    0xA: Status.INTERNAL,  # CONNECT_ERROR
    0xB: Status.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: Status.PERMISSION_DENIED,  # INADEQUATE_SECURITY
}


def test_status_codes_match_the_spec_table() -> None:
    assert {s.name: s.value for s in Status} == SPEC_CODES
    for name, value in SPEC_CODES.items():
        assert Status(value).name == name
        assert Status[name] == value  # an IntEnum: compares equal to the wire integer


def test_grpc_error_carries_status_message_and_trailers() -> None:
    trailers = (("grpc-status-details-bin", b"\x08\x05"), ("x-request-id", "abc"))
    err = GrpcError(Status.NOT_FOUND, "job not found", trailers=trailers)
    assert err.status is Status.NOT_FOUND
    assert err.message == "job not found"
    assert err.trailers == trailers
    assert str(err) == "NOT_FOUND: job not found"


def test_grpc_error_defaults_and_int_status() -> None:
    err = GrpcError(13)  # type: ignore[arg-type]
    assert err.status is Status.INTERNAL
    assert err.message == ""
    assert err.trailers == ()
    assert str(err) == "INTERNAL"
    with pytest.raises(ValueError):
        GrpcError(17)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("", ""),
        ("job not found", "job not found"),  # space and printable ASCII stay as they are
        ("100%", "100%25"),  # "%" itself is always escaped
        ("%zz", "%25zz"),
        ("café ☕ 日本", "caf%C3%A9 %E2%98%95 %E6%97%A5%E6%9C%AC"),
        ("line1\nline2\ttab\x00nul\x7fdel", "line1%0Aline2%09tab%00nul%7Fdel"),
        ("~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}", "~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}"),
    ],
)
def test_grpc_message_encoding(text: str, encoded: str) -> None:
    assert encode_grpc_message(text) == encoded
    assert decode_grpc_message(encoded) == text
    assert decode_grpc_message(encoded.encode("ascii")) == text


def test_grpc_message_encoding_survives_lone_surrogates() -> None:
    # No UTF-8 form exists; the error path must still produce a header value.
    assert encode_grpc_message("bad \udc80 char") == "bad ? char"


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("%zz", "%zz"),  # not hex: kept
        ("%4", "%4"),  # one digit: kept
        ("trailing %", "trailing %"),
        ("%", "%"),
        ("%%41", "%A"),  # the first "%" is malformed, the second escape is fine
        ("%c3%a9", "é"),  # lowercase hex is accepted
        ("%FF", "%FF"),  # a valid escape that is not UTF-8: kept visible, not dropped
        ("%C3", "%C3"),  # a truncated UTF-8 sequence
        ("caf%C3%A9%", "café%"),
        (b"raw \xff byte", "raw %FF byte"),  # raw non-ASCII (off-spec) does not raise either
        (b"caf\xc3\xa9", "café"),  # raw UTF-8 (off-spec) is taken at face value
    ],
)
def test_grpc_message_decoding_is_lenient(value: str | bytes, decoded: str) -> None:
    assert decode_grpc_message(value) == decoded


@given(st.text())
def test_grpc_message_round_trip(text: str) -> None:
    encoded = encode_grpc_message(text)
    # Always a valid header value: space and printable ASCII only.
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert decode_grpc_message(encoded) == text


@given(st.one_of(st.binary(), st.text()))
def test_grpc_message_decoding_never_raises(value: str | bytes) -> None:
    assert isinstance(decode_grpc_message(value), str)


def test_status_from_http_follows_the_spec_table() -> None:
    for http_status, status in SPEC_HTTP_MAPPING.items():
        assert status_from_http(http_status) is status
    # "All other codes", 200 included (a real OK response carries grpc-status: 0).
    for http_status in (100, 200, 204, 301, 402, 405, 415, 418, 500, 501, 505, 599):
        assert status_from_http(http_status) is Status.UNKNOWN


def test_status_from_h2_error_follows_the_spec_table() -> None:
    for code, status in SPEC_H2_MAPPING.items():
        assert status_from_h2_error(code) is status
    assert status_from_h2_error(0xFF) is Status.INTERNAL  # unknown error codes too


@pytest.mark.parametrize("value", [str(v) for v in SPEC_CODES.values()])
def test_parse_grpc_status_valid(value: str) -> None:
    assert parse_grpc_status(value) == int(value)
    assert parse_grpc_status(value.encode()) == int(value)


@pytest.mark.parametrize(
    "value", ["", "17", "99", "-1", "+1", " 5", "5 ", "abc", "1.0", "\u0663", "0x1"]
)
def test_parse_grpc_status_invalid_is_unknown(value: str) -> None:
    # statuscodes.md: "Error parsing returned status -> UNKNOWN".
    assert parse_grpc_status(value) is Status.UNKNOWN
