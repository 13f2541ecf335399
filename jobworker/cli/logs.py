"""How `jobctl logs` and `run` show a job's output, beyond copying its bytes: what --since and
--tail accept, the time --timestamps puts before each line, and the words for output the
server no longer has. Pure functions and one small stateful stamper; jobctl.py writes."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

from jobworker.v1 import jobworker_pb2 as pb

from .parsing import parse_duration

__all__ = ["Stamper", "dropped_notice", "parse_since", "parse_tail"]

# A moment as people and docker write it: a date, maybe a time (T or a space, seconds and a
# fraction of up to 9 digits optional), maybe a zone (Z or an offset; none: local time).
_MOMENT = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r" ?([Zz]|[+-]\d{2}:?\d{2})?"
)
_EXAMPLES = "examples: 10m, 1h30m, 2026-12-06T01:02:03Z, '2026-12-06 01:02:03' (local time)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_since(text: str, *, now_ns: int) -> int:
    """The moment ``text`` names, in ns since the epoch: a duration ago (``10m``, ``1h30m``,
    as parse_duration), or a date and time (RFC 3339, or ``YYYY-MM-DD[ HH:MM[:SS[.frac]]]``
    in local time). ValueError with the examples otherwise."""
    spelled = text.strip()
    try:
        return now_ns - round(parse_duration(spelled) * 1e9)
    except ValueError:
        pass
    match = _MOMENT.fullmatch(spelled)
    if match is None:
        raise ValueError(f"not a time: {text!r} ({_EXAMPLES})")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0)
        )
        if zone is None:
            moment = moment.astimezone()  # a naive time is the local one
        elif zone in "Zz":
            moment = moment.replace(tzinfo=UTC)
        else:
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            moment = moment.replace(tzinfo=timezone(-offset if zone[0] == "-" else offset))
    except ValueError as exc:  # February 30th, an offset of 25 hours
        raise ValueError(f"not a time: {text!r} ({exc})") from None
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    return seconds * 10**9 + int((fraction or "0").ljust(9, "0"))


def parse_tail(text: str) -> int | None:
    """``--tail``: a number of lines, or ``all`` (None)."""
    spelled = text.strip().lower()
    if spelled == "all":
        return None
    if not spelled.isdigit():
        raise ValueError(f"expected a number of lines or 'all', got {text!r}")
    return int(spelled)


def format_time(stamp) -> bytes:
    """A Timestamp as docker's --timestamps shows it: RFC 3339 in UTC with nanoseconds."""
    return b"%s.%09dZ" % (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp.seconds)).encode(),
        stamp.nanos,
    )


class Stamper:
    """Puts the time a line was read before each line of a stream, as ``docker logs -t`` does.

    A line goes on across chunks: it is stamped once, with the time of the chunk it begins in.
    Output with no time (kept by a server that did not record times) is not stamped.
    """

    def __init__(self) -> None:
        self._at_line_start = {pb.LOG_STREAM_STDOUT: True, pb.LOG_STREAM_STDERR: True}

    def stamp(self, chunk: pb.GetJobLogsResponse) -> bytes:
        data = chunk.data
        at_start = self._at_line_start.get(chunk.stream, True)
        self._at_line_start[chunk.stream] = data.endswith(b"\n")
        if not chunk.HasField("read_time"):
            return data
        prefix = format_time(chunk.read_time) + b" "
        # Every line that begins in this chunk: after each newline but a final one.
        body = data[:-1].replace(b"\n", b"\n" + prefix) + data[-1:]
        return prefix + body if at_start else body

    def resume(self) -> None:
        """After a gap in the output (a drop): what comes next begins a line."""
        for stream in self._at_line_start:
            self._at_line_start[stream] = True


def dropped_notice(chunk: pb.GetJobLogsResponse) -> str:
    """The line on stderr for output the server's retention removed before we read it."""
    return (
        f"{approximate_bytes(chunk.dropped)} of output dropped by the server's retention;"
        f" resuming at offset {chunk.offset + chunk.dropped}"
    )


def approximate_bytes(count: int) -> str:
    """``512 bytes``, ``1.5 KiB``, ``4.4 GiB``."""
    if count < 1024:
        return f"{count} byte{'' if count == 1 else 's'}"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
