"""The API's well-known types (google.protobuf Duration, Timestamp) to and from Python values.

Neutral ground, like jobworker.units: the server's conversions (service/convert.py) and jobctl
both use these, and this module imports only protobuf, so a client can without loading the
server's modules.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["duration_to_proto", "timestamp_from_proto", "timestamp_to_proto"]


def duration_to_proto(seconds: float) -> Duration:
    """A Duration from seconds (finite, >= 0); ValueError otherwise."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {seconds}")
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def timestamp_to_proto(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)  # an aware datetime: converted to UTC
    return stamp


def timestamp_from_proto(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)
