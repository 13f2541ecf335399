"""The `grpc-timeout` header: TimeoutValue (at most 8 ASCII digits) + TimeoutUnit.

Spec: grpc/grpc doc/PROTOCOL-HTTP2.md ("Timeout"). The value is a relative timeout in seconds;
turning it into a deadline is the caller's job, on its own clock (no clocks here).
"""

from __future__ import annotations

import math
import re

from jobworker.purgatory.wire.errors import ProtocolError
from jobworker.purgatory.wire.metadata import header_bytes

# unit -> (numerator, denominator) seconds, so that parsing is one exact integer product followed
# by one correctly rounded division (1 / 1000 is not exact in binary; 1 // 1000 never happens).
_UNITS = {
    "n": (1, 1_000_000_000),
    "u": (1, 1_000_000),
    "m": (1, 1_000),
    "S": (1, 1),
    "M": (60, 1),
    "H": (3600, 1),
}
_MAX_DIGITS_VALUE = 99_999_999
_TIMEOUT_RE = re.compile(rb"([0-9]{1,8})([HMSmun])")

MAX_TIMEOUT_S = _MAX_DIGITS_VALUE * 3600
"""The longest timeout the header can express (about 11,400 years); longer ones are clamped."""


def parse_grpc_timeout(value: bytes | str) -> float:
    """Seconds from a `grpc-timeout` value; `ProtocolError` for anything off-grammar.

    Strict: no signs, spaces, decimal points, or more than 8 digits. "0S" is accepted (the spec
    says "positive", but a zero timeout is unambiguous: already expired).
    """
    raw = header_bytes(value)
    match = _TIMEOUT_RE.fullmatch(raw)
    if match is None:
        raise ProtocolError(f"invalid grpc-timeout {raw[:32]!r}")
    numerator, denominator = _UNITS[match[2].decode("ascii")]
    return int(match[1]) * numerator / denominator


def encode_grpc_timeout(seconds: float) -> str:
    """A `grpc-timeout` value for a timeout, in the finest unit that fits in 8 digits.

    Rounds up, so the peer never sees a shorter timeout than ours: `parse(encode(t)) >= t`, and
    larger by at most one unit of the chosen granularity. A timeout that is zero or negative
    (a deadline already past) is sent as "1n" rather than "0n": the grammar wants a positive
    integer, and one nanosecond expires the call on arrival just the same. Timeouts beyond
    `MAX_TIMEOUT_S` (infinity included) are clamped to it; NaN is a ValueError.
    """
    if math.isnan(seconds):
        raise ValueError("timeout is NaN")
    if seconds <= 0:
        return "1n"
    if seconds >= MAX_TIMEOUT_S:
        return f"{_MAX_DIGITS_VALUE}H"
    # The float's exact value as a ratio of integers, so that rounding up is integer
    # arithmetic (and no import of fractions, which costs every client's start-up).
    top, bottom = seconds.as_integer_ratio()
    for unit, (numerator, denominator) in _UNITS.items():
        count = -(-top * denominator // (bottom * numerator))  # ceil, exactly
        if count > _MAX_DIGITS_VALUE:
            continue
        # The float the peer parses may round up to `seconds` one step earlier than the exact
        # arithmetic says (0.001 is slightly above 1/1000); prefer that shorter rendering.
        if count > 1 and (count - 1) * numerator / denominator >= seconds:
            count -= 1
        return f"{count}{unit}"
    raise AssertionError("unreachable: MAX_TIMEOUT_S fits in hours")  # pragma: no cover
