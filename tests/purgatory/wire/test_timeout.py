"""grpc-timeout: the grammar (1-8 digits + one of H M S m u n) and the encoder's rounding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.purgatory.wire.errors import ProtocolError
from jobworker.purgatory.wire.timeout import MAX_TIMEOUT_S, encode_grpc_timeout, parse_grpc_timeout

UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
FINER_UNIT = {"u": "n", "m": "u", "S": "m", "M": "S", "H": "M"}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1S", 1.0),  # the spec's example request
        ("2H", 7200.0),
        ("5M", 300.0),
        ("100m", 0.1),
        ("250u", 0.00025),
        ("7n", 7e-9),
        ("99999999H", 99999999 * 3600.0),
        ("99999999n", 0.099999999),
        ("00000001S", 1.0),  # leading zeros still count toward the 8 digits
        ("0S", 0.0),  # not "positive", but unambiguous: already expired
    ],
)
def test_parse_examples(value: str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == seconds
    assert parse_grpc_timeout(value.encode("ascii")) == seconds


@pytest.mark.parametrize("unit", list(UNIT_SECONDS))
def test_parse_every_unit(unit: str) -> None:
    assert parse_grpc_timeout(f"3{unit}") == pytest.approx(3 * UNIT_SECONDS[unit], rel=1e-15)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "S",  # no digits
        "10",  # no unit
        "123456789S",  # 9 digits
        "1s",  # units are case-sensitive: "s" is not one
        "1h",
        "1x",
        "1SS",
        "-1S",
        "+1S",
        "1.5S",
        " 1S",
        "1S ",
        "1 S",
        "1S\n",  # a regex "$" would accept this one
        "\u0661S",  # ARABIC-INDIC DIGIT ONE: a Unicode digit, not an ASCII one
        b"\xff1S",
    ],
)
def test_parse_invalid(value: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_grpc_timeout(value)


@pytest.mark.parametrize(
    ("seconds", "encoded"),
    [
        (1e-9, "1n"),
        (1.5e-9, "2n"),  # rounds up, never down
        (0.001, "1000000n"),  # not "1000001n": 1000000n parses back to exactly 0.001
        (0.1, "100000u"),
        (1, "1000000u"),
        (30, "30000000u"),
        (100, "100000m"),
        (3600, "3600000m"),
        (86400 * 30, "2592000S"),
        (86400 * 365 * 10, "5256000M"),
        (MAX_TIMEOUT_S, "99999999H"),
    ],
)
def test_encode_examples(seconds: float, encoded: str) -> None:
    assert encode_grpc_timeout(seconds) == encoded


@pytest.mark.parametrize("seconds", [0, 0.0, -0.0, -1e-12, -5, -math.inf])
def test_encode_non_positive_is_one_nanosecond(seconds: float) -> None:
    # Expired already: say so with the smallest positive value the grammar allows.
    assert encode_grpc_timeout(seconds) == "1n"


@pytest.mark.parametrize("seconds", [MAX_TIMEOUT_S * 2, 1e300, math.inf])
def test_encode_clamps_huge(seconds: float) -> None:
    assert encode_grpc_timeout(seconds) == "99999999H"


def test_encode_nan_is_an_error() -> None:
    with pytest.raises(ValueError):
        encode_grpc_timeout(math.nan)


@given(st.floats(min_value=0, max_value=MAX_TIMEOUT_S, exclude_min=True, exclude_max=True))
def test_encode_parse_round_trip(seconds: float) -> None:
    encoded = encode_grpc_timeout(seconds)
    digits, unit = encoded[:-1], encoded[-1]
    assert 1 <= len(digits) <= 8 and digits.isdigit()
    parsed = parse_grpc_timeout(encoded)
    # Never shorter than asked, and longer by less than one step of the chosen unit.
    assert parsed >= seconds
    assert parsed - seconds <= UNIT_SECONDS[unit] * (1 + 1e-9)
    # The finest unit that fits: the next finer one would need more than 8 digits.
    if unit in FINER_UNIT:
        assert seconds / UNIT_SECONDS[FINER_UNIT[unit]] > 99_999_999 * (1 - 1e-9)
