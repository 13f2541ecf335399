"""jobctl's output helpers (cli/logs.py): --since and --tail as typed, the --timestamps
stamper, and the drop notice's words."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from jobworker.cli.logs import (
    Stamper,
    approximate_bytes,
    dropped_notice,
    format_time,
    parse_since,
    parse_tail,
)
from jobworker.v1 import jobworker_pb2 as pb

NOW = 1_800_000_000 * 10**9 + 123  # 2027-01-15T08:00:00.000000123Z
OUT, ERR = pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR


@pytest.fixture
def in_paris() -> Iterator[None]:
    # Local time is the process's TZ: a zone with an offset, so local is not UTC by chance.
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Paris"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - 600 * 10**9),
        ("1h30m", NOW - 5400 * 10**9),
        ("500ms", NOW - 500 * 10**6),
        ("0s", NOW),
        ("2027-01-15T08:00:00Z", 1_800_000_000 * 10**9),
        ("2027-01-15T08:00:00.123456789Z", 1_800_000_000 * 10**9 + 123_456_789),
        ("2027-01-15t08:00:00.5z", 1_800_000_000 * 10**9 + 500_000_000),
        ("2027-01-15T09:30:00+01:30", 1_800_000_000 * 10**9),
        ("2027-01-15T07:00:00-0100", 1_800_000_000 * 10**9),
        ("2027-01-15 09:00:00", 1_800_000_000 * 10**9),  # local: Paris, UTC+1 in January
        ("2027-01-15 09:00", 1_800_000_000 * 10**9),
        ("2027-01-15", 1_800_000_000 * 10**9 - 9 * 3600 * 10**9),  # local midnight
        ("2027-07-15 10:00:00", 1_800_000_000 * 10**9 + 181 * 86400 * 10**9),  # summer: UTC+2
    ],
)
def test_since_is_a_duration_ago_or_a_moment(in_paris, text: str, expected: int) -> None:
    assert parse_since(text, now_ns=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2027-13-01", "2027-02-30 10:00", "10 minutes", ""])
def test_since_that_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_since(text, now_ns=NOW)


def test_tail_is_a_count_or_all() -> None:
    assert (parse_tail("10"), parse_tail("0"), parse_tail("ALL")) == (10, 0, None)
    for bad in ("-1", "ten", "1.5", ""):
        with pytest.raises(ValueError):
            parse_tail(bad)


def chunk(stream, data: bytes, ns: int | None) -> pb.GetJobLogsResponse:
    message = pb.GetJobLogsResponse(stream=stream, data=data)
    if ns is not None:
        message.read_time.FromNanoseconds(ns)
    return message


def test_the_stamper_stamps_each_line_once_per_stream() -> None:
    stamper = Stamper()
    t1, t2, t3 = (format_time(chunk(OUT, b"", NOW + i).read_time) for i in range(3))
    assert t1 == b"2027-01-15T08:00:00.000000123Z"
    assert stamper.stamp(chunk(OUT, b"a\nb", NOW)) == t1 + b" a\n" + t1 + b" b"
    # stderr has lines of its own, and stdout's "b" goes on unstamped in a later chunk.
    assert stamper.stamp(chunk(ERR, b"e\n", NOW + 1)) == t2 + b" e\n"
    assert stamper.stamp(chunk(OUT, b"c\n\nd\n", NOW + 2)) == b"c\n" + t3 + b" \n" + t3 + b" d\n"
    assert stamper.stamp(chunk(OUT, b"x", None)) == b"x"  # no time known: as it is
    assert stamper.stamp(chunk(OUT, b"y\n", NOW)) == b"y\n"  # the line began unstamped
    stamper.stamp(chunk(OUT, b"half", NOW))
    stamper.resume()  # after a drop, what comes begins a line
    assert stamper.stamp(chunk(OUT, b"z\n", NOW)) == t1 + b" z\n"


def test_the_drop_notice_says_how_much_and_where_output_resumes() -> None:
    drop = pb.GetJobLogsResponse(offset=235_270_656, dropped=4_764_729_344)
    assert dropped_notice(drop) == (
        "4.4 GiB of output dropped by the server's retention; resuming at offset 5000000000"
    )
    assert [approximate_bytes(n) for n in (0, 1, 1023, 1536, 5 * 2**20, 3 * 2**40)] == [
        "0 bytes",
        "1 byte",
        "1023 bytes",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
