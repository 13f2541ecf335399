"""The output log's times and what a reader selects: when each chunk was read (and across a
reopen, and in a log written before times were kept), ``since``, ``tail_lines``, a stream filter,
and drops reported as chunks."""

from __future__ import annotations

import os
import random
import struct
import tempfile
import tracemalloc
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jobworker.supervisor import output
from jobworker.supervisor.output import COALESCE_NS, OutputChunk, OutputLog, OutputStream

OUT, ERR = OutputStream.STDOUT, OutputStream.STDERR
KiB, MiB = 2**10, 2**20
T0 = 1_800_000_000 * 10**9  # 2027-01-15, in ns
MS = 1_000_000

DISK_AND_TAIL = pytest.mark.parametrize("tail_bytes", [0, 16 * MiB], ids=["disk", "tail"])


class Clock:
    """A clock a test sets: what the log stamps appends with."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def read_all(reader) -> list[OutputChunk]:
    return [chunk async for chunk in reader]


def summary(chunks: list[OutputChunk]) -> list[tuple]:
    return [(c.stream, c.offset, c.data, c.lost, c.dropped, c.time_ns) for c in chunks]


# -- times ------------------------------------------------------------------------------------


@DISK_AND_TAIL
async def test_each_chunk_carries_when_its_first_byte_was_read_also_after_reopening(
    tmp_path, tail_bytes
):
    clock = Clock()
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes, clock_ns=clock)
    log.append(OUT, b"one\n")
    clock.now += 1
    log.append(OUT, b"two\n")  # within the millisecond: joins the chunk
    clock.now += MS
    log.append(OUT, b"three\n")  # a millisecond later: a chunk of its own
    clock.now += 5 * MS
    log.append(ERR, b"err\n")
    log.close()
    expected = [
        (OUT, 0, b"one\ntwo\n", 0, 0, T0),
        (OUT, 8, b"three\n", 0, 0, T0 + 1 + MS),
        (ERR, 14, b"err\n", 0, 0, T0 + 1 + 6 * MS),
    ]
    assert summary(await read_all(log.reader())) == expected
    assert summary(await read_all(OutputLog.reopen(tmp_path / "log").reader())) == expected
    # From the middle of a record: that record's time.
    [chunk, *_] = await read_all(log.reader(10))
    assert (chunk.offset, chunk.data, chunk.time_ns) == (10, b"ree\n", T0 + 1 + MS)
    log.remove()


@DISK_AND_TAIL
async def test_no_chunk_spans_a_millisecond(tmp_path, tail_bytes):
    # One record every 100 µs: chunks of 10 records, each no wider than the rule allows.
    clock = Clock()
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes, clock_ns=clock)
    for _ in range(100):
        log.append(OUT, b"x" * 100)
        clock.now += MS // 10
    chunks = await read_all(log.reader())
    assert [len(c.data) for c in chunks] == [1000] * 10
    assert [c.time_ns for c in chunks] == [T0 + i * MS for i in range(10)]
    log.remove()


async def test_a_clock_stepped_back_repeats_the_last_time(tmp_path):
    clock = Clock()
    log = OutputLog(tmp_path / "log", clock_ns=clock)
    log.append(OUT, b"a")
    clock.now -= 3600 * 10**9
    log.append(ERR, b"b")
    clock.now += 3600 * 10**9 + 2 * MS
    log.append(OUT, b"c")
    assert [c.time_ns for c in await read_all(log.reader())] == [T0, T0, T0 + 2 * MS]
    log.remove()


async def test_a_gap_is_stamped_when_the_loss_began(tmp_path, monkeypatch):
    clock = Clock()
    log = OutputLog(tmp_path / "log", tail_bytes=0, clock_ns=clock)
    real_pwritev = os.pwritev

    def enospc(fd, buffers, pos):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", enospc)
    log.append(OUT, b"lost")
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    clock.now += 10 * MS
    log.append(OUT, b"kept")
    log.close()
    chunks = await read_all(OutputLog.reopen(tmp_path / "log").reader())
    assert summary(chunks) == [(OUT, 0, b"", 4, 0, T0), (OUT, 4, b"kept", 0, 0, T0 + 10 * MS)]
    log.remove()


def old_record(tag: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">BI", tag, len(data) if length is None else length) + data


async def test_a_log_written_before_times_were_kept_still_reads(tmp_path):
    # Tags 1-4 as the previous version wrote them: stdout, stderr, then a stdout gap.
    directory = tmp_path / "log"
    directory.mkdir()
    (directory / f"{0:020d}.seg").write_bytes(
        old_record(1, b"hello\n")
        + old_record(2, b"err\n")
        + old_record(3, length=7)
        + old_record(1, b"end")
    )
    log = OutputLog.reopen(directory)
    assert (log.start_offset, log.end_offset) == (0, 20)
    expected = [
        (OUT, 0, b"hello\n", 0, 0, None),
        (ERR, 6, b"err\n", 0, 0, None),
        (OUT, 10, b"", 7, 0, None),
        (OUT, 17, b"end", 0, 0, None),
    ]
    assert summary(await read_all(log.reader())) == expected
    # The last line ("end", no newline) begins after the stderr line's newline.
    assert summary(await read_all(log.reader().select(tail_lines=1))) == expected[2:]
    assert summary(await read_all(log.reader().select(tail_lines=2, streams=[OUT]))) == [
        expected[0],
        expected[2],
        expected[3],
    ]
    # Untimed output was read at no known time: never at or after any.
    assert await read_all(log.reader().select(since_ns=0)) == []


# -- since -------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [16, 64 * KiB], ids=["many-checkpoints", "few"])
async def test_since_begins_at_the_first_record_read_at_or_after_it(tmp_path, interval):
    clock = Clock()
    with mock.patch.object(output, "_CHECKPOINT_INTERVAL_BYTES", interval):
        log = OutputLog(
            tmp_path / "log", retention_bytes=64 * KiB, segment_bytes=4 * KiB, tail_bytes=0,
            clock_ns=clock,
        )  # fmt: skip
        offsets = []
        for i in range(100):  # 100 records of 300 bytes, 10 ms apart, over 8 segments
            offsets.append(log.end_offset)
            log.append(OUT if i % 3 else ERR, bytes([65 + i % 26]) * 300)
            clock.now += 10 * MS
        for i in (0, 1, 13, 14, 27, 50, 99):  # at segment starts (4 KiB / 300), and between
            for since in (T0 + i * 10 * MS, T0 + i * 10 * MS - 5 * MS):
                first = await log.reader().select(since_ns=since).__anext__()
                assert first.offset == offsets[i], (i, since)
        assert await read_all(log.reader().select(since_ns=T0 + 100 * 10 * MS)) == []
        # An offset beyond `since`'s start wins.
        first = await log.reader(offsets[60] + 7).select(since_ns=T0).__anext__()
        assert first.offset == offsets[60] + 7
    log.remove()


async def test_since_before_what_retention_kept_reports_the_drop(tmp_path):
    clock = Clock()
    log = OutputLog(
        tmp_path / "log", retention_bytes=64 * KiB, segment_bytes=16 * KiB, clock_ns=clock
    )
    for _ in range(10):
        log.append(OUT, b"z" * 16 * KiB)
        clock.now += 10 * MS
    start = log.start_offset
    assert start == 6 * 16 * KiB
    # Asked for everything since before what is kept: some of it is gone, and said so.
    first, second = (await read_all(log.reader().select(since_ns=T0)))[:2]
    assert first == OutputChunk(None, 0, b"", dropped=start)
    assert second.offset == start
    # Since a time within what is kept: the older, dropped output was not asked for.
    first = await log.reader().select(since_ns=T0 + 75 * MS).__anext__()
    assert (first.offset, first.dropped) == (8 * 16 * KiB, 0)
    log.remove()


async def test_a_follower_since_a_time_to_come_waits_for_it(tmp_path):
    clock = Clock()
    log = OutputLog(tmp_path / "log", clock_ns=clock)
    log.append(OUT, b"old\n")
    reader = log.reader(follow=True).select(since_ns=T0 + 10 * MS)
    got: list[OutputChunk] = []

    async def follow():
        got.extend([chunk async for chunk in reader])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        clock.now += 5 * MS
        log.append(ERR, b"still too early\n")
        await trio.testing.wait_all_tasks_blocked()
        clock.now += 5 * MS
        log.append(OUT, b"now\n")
        clock.now += 5 * MS
        log.append(ERR, b"later\n")
        log.close()
    assert summary(got) == [
        (OUT, 20, b"now\n", 0, 0, T0 + 10 * MS),
        (ERR, 24, b"later\n", 0, 0, T0 + 15 * MS),
    ]
    log.remove()


# -- tail_lines and the stream filter ----------------------------------------------------------


@DISK_AND_TAIL
async def test_tail_lines_counts_lines_as_tail_does(tmp_path, tail_bytes):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    log.append(OUT, b"a\nb\n")
    log.append(ERR, b"E1\n")
    log.append(OUT, b"c\nd")  # a last line with no newline counts

    async def text(**select) -> bytes:
        return b"".join(c.data for c in await read_all(log.reader().select(**select)))

    assert await text(tail_lines=1) == b"d"
    assert await text(tail_lines=2) == b"c\nd"
    assert await text(tail_lines=3) == b"E1\nc\nd"
    assert await text(tail_lines=99) == b"a\nb\nE1\nc\nd"  # fewer kept: all of them
    assert await text(tail_lines=2, streams=[OUT]) == b"c\nd"
    assert await text(tail_lines=3, streams=[OUT]) == b"b\nc\nd"
    assert await text(tail_lines=1, streams=[ERR]) == b"E1\n"
    log.append(OUT, b"\n")  # the newline ends the last line: it begins none
    assert await text(tail_lines=1) == b"d\n"
    log.remove()


async def test_tail_lines_beyond_what_retention_kept_reports_the_drop(tmp_path):
    log = OutputLog(tmp_path / "log", retention_bytes=64 * KiB, segment_bytes=16 * KiB)
    line = b"x" * 99 + b"\n"
    for _ in range(2000):  # 200 000 bytes, 2000 lines
        log.append(OUT, line)
    kept = log.end_offset - log.start_offset
    chunks = await read_all(log.reader().select(tail_lines=1000))
    assert chunks[0] == OutputChunk(None, 0, b"", dropped=log.start_offset)
    assert sum(len(c.data) for c in chunks[1:]) == kept
    chunks = await read_all(log.reader().select(tail_lines=100))
    assert chunks[0].offset == log.end_offset - 100 * 100 and not chunks[0].dropped
    log.remove()


@DISK_AND_TAIL
async def test_a_stream_filter_skips_the_other_stream_keeping_combined_offsets(
    tmp_path, tail_bytes
):
    log = OutputLog(
        tmp_path / "log", tail_bytes=tail_bytes, retention_bytes=256 * KiB, segment_bytes=4 * KiB
    )
    # Long runs of the other stream (more records than one step skips), then one of ours.
    expected = []
    for i in range(5):
        for _ in range(3000):
            log.append(OUT, b"o")
        expected.append((ERR, log.end_offset, f"e{i}".encode()))
        log.append(ERR, f"e{i}".encode())
    log.append(OUT, b"tail")
    chunks = await read_all(log.reader().select(streams=[ERR]))
    assert [(c.stream, c.offset, c.data) for c in chunks] == expected
    outs = await read_all(log.reader().select(streams=[OUT]))
    assert {c.stream for c in outs} == {OUT}
    assert sum(len(c.data) for c in outs) == 15_004
    both = await read_all(log.reader().select(streams=[OUT, ERR]))
    assert sum(len(c.data) for c in both) == log.end_offset
    log.remove()


async def test_select_validation(tmp_path):
    log = OutputLog(tmp_path / "log")
    with pytest.raises(ValueError):
        log.reader().select(streams=[])
    with pytest.raises(ValueError):
        log.reader().select(streams=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        log.reader().select(tail_lines=-1)
    log.remove()


# -- bounded work on a large log ---------------------------------------------------------------


async def test_tail_of_a_large_log_reads_backwards_in_bounded_memory_and_yields(tmp_path):
    # No newline at all: the one line is the whole log, and the scan must cross all of it.
    log = OutputLog(tmp_path / "log", retention_bytes=128 * MiB, tail_bytes=0)
    block = b"x" * (256 * KiB)
    for _ in range(256):
        log.append(OUT, block)
    log.append(OUT, b"\n")
    reader = log.reader().select(tail_lines=1)
    turns = 0

    async def other_task():
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    read = 0
    real_pread = os.pread

    def counting_pread(fd, n, pos):
        nonlocal read
        data = real_pread(fd, n, pos)
        read += len(data)
        return data

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            with mock.patch.object(os, "pread", counting_pread):
                first = await reader.__anext__()
            _, peak = tracemalloc.get_traced_memory()
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert (first.offset, len(first.data)) == (0, 64 * KiB)
    assert peak < 1 * MiB  # a block and an interval's headers, not the 64 MiB
    # The data once, the headers of each interval once, and the first chunk.
    assert read < 64 * MiB + 2 * MiB
    assert turns > 500  # other tasks ran between the scan's steps
    log.remove()


async def test_tail_of_a_few_lines_reads_only_the_end(tmp_path):
    log = OutputLog(tmp_path / "log", retention_bytes=64 * MiB, tail_bytes=0)
    lines = b"".join(b"line %06d\n" % i for i in range(20_000))  # 12 bytes each
    for _ in range(256):
        log.append(OUT, lines[: 240 * KiB])
        log.append(ERR, lines[: 16 * KiB])
    read = 0
    real_pread = os.pread

    def counting_pread(fd, n, pos):
        nonlocal read
        data = real_pread(fd, n, pos)
        read += len(data)
        return data

    reader = log.reader().select(tail_lines=10, streams=[OUT])
    with mock.patch.object(os, "pread", counting_pread):
        chunks = await read_all(reader)
    assert b"".join(c.data for c in chunks).count(b"\n") == 10
    assert read < 512 * KiB
    log.remove()


async def test_a_tail_scan_overtaken_by_retention_reports_the_drop(tmp_path):
    log = OutputLog(
        tmp_path / "log", retention_bytes=256 * KiB, segment_bytes=64 * KiB, tail_bytes=0
    )
    for _ in range(4):
        log.append(OUT, b"y" * 64 * KiB)
    reader = log.reader(follow=True).select(tail_lines=1)  # the whole log is one line
    with mock.patch.object(output, "_TAIL_BLOCK_BYTES", 4 * KiB):
        # A first step of the scan, from the end (driven by hand: no chunk comes out of a
        # step, so there is nothing to wait on from outside).
        next(reader._seek)
        log.append(OUT, b"\n" + b"y" * (64 * KiB - 1))  # the first segment goes meanwhile
        assert log.start_offset == 64 * KiB
        log.close()
        chunks = await read_all(reader)
    assert chunks[0] == OutputChunk(None, 0, b"", dropped=64 * KiB)
    assert sum(len(c.data) for c in chunks[1:]) == log.end_offset - 64 * KiB
    log.remove()


# -- everything at once, against a model -------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=st.lists(
        st.tuples(
            st.sampled_from([OUT, ERR]),
            st.lists(st.sampled_from([b"a", b"b", b"\n"]), min_size=1, max_size=30).map(b"".join),
            st.sampled_from([0, 1, MS // 2, MS - 1, MS, 3 * MS]),  # time since the last append
        ),
        max_size=30,
    ),
    segment_bytes=st.integers(1, 48),
    segments_retained=st.integers(1, 6),
    tail_bytes=st.integers(0, 100),
    max_chunk_bytes=st.integers(1, 50),
    streams=st.sampled_from([None, (OUT,), (ERR,), (OUT, ERR)]),
    tail_lines=st.integers(0, 12),
    since_step=st.none() | st.integers(0, 40),
    offset=st.integers(0, 400),
    tail_block_bytes=st.integers(1, 8),
)
@example(  # a drop, then lines spread over segments read through small blocks
    appends=[(OUT, b"ab\n" * 10, MS)] * 8,
    segment_bytes=16,
    segments_retained=3,
    tail_bytes=0,
    max_chunk_bytes=7,
    streams=None,
    tail_lines=5,
    since_step=None,
    offset=0,
    tail_block_bytes=2,
)
def test_any_selection_reads_what_the_model_says(
    appends,
    segment_bytes,
    segments_retained,
    tail_bytes,
    max_chunk_bytes,
    streams,
    tail_lines,
    since_step,
    offset,
    tail_block_bytes,
):
    clock = Clock()
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(output, "_CHECKPOINT_INTERVAL_BYTES", 16),
        mock.patch.object(output, "_TAIL_BLOCK_BYTES", tail_block_bytes),
    ):
        log = OutputLog(
            os.path.join(tmp, "log"),
            retention_bytes=segment_bytes * segments_retained,
            tail_bytes=tail_bytes,
            segment_bytes=segment_bytes,
            clock_ns=clock,
        )
        data, tags, times = bytearray(), [], []
        for stream, chunk, step in appends:
            clock.now += step
            log.append(stream, chunk)
            data += chunk
            tags += [stream] * len(chunk)
            times += [clock.now] * len(chunk)
        start, end = log.start_offset, log.end_offset
        chosen = set(streams or OutputStream)
        since_ns = None if since_step is None else T0 + since_step * MS // 4

        # What the documented rules say: the latest of the offset, the tail's start and
        # since's, a drop if that is before what is kept, then every selected byte.
        begin = offset
        if tail_lines:
            selected = [i for i in range(start, end) if tags[i] in chosen]
            if selected and data[selected[-1]] == ord("\n"):
                selected.pop()
            newlines = [i for i in selected if data[i] == ord("\n")]
            if len(newlines) >= tail_lines:
                begin = max(begin, newlines[-tail_lines] + 1)
            # else fewer lines are kept: from the beginning (a drop if it is not kept)
        if since_ns is not None:
            at = next((i for i in range(start, end) if times[i] >= since_ns), end)
            if at > start:
                begin = max(begin, at)
        expected_drop = (
            [OutputChunk(None, begin, b"", dropped=start - begin)] if begin < start else []
        )
        wanted = [i for i in range(max(begin, start), end) if tags[i] in chosen]

        async def check(log: OutputLog) -> None:
            reader = log.reader(offset, max_chunk_bytes=max_chunk_bytes)
            chunks = await read_all(
                reader.select(streams=streams, since_ns=since_ns, tail_lines=tail_lines)
            )
            drops = [c for c in chunks if c.dropped]
            assert drops == expected_drop
            got = []
            for chunk in chunks:
                if chunk.dropped:
                    continue
                assert 0 < len(chunk.data) <= max_chunk_bytes
                span = range(chunk.offset, chunk.end)
                assert chunk.data == data[chunk.offset : chunk.end]
                assert all(tags[i] is chunk.stream for i in span)
                assert chunk.time_ns == times[chunk.offset]
                assert all(times[i] - chunk.time_ns < COALESCE_NS for i in span)
                got += span
            assert got == wanted

        trio.run(check, log)
        log.close()
        trio.run(check, OutputLog.reopen(log.directory))
        log.remove()


def test_random_large_selection_matches_a_plain_read(tmp_path):
    # Larger than the property test's logs: real segment and block sizes.
    rng = random.Random(3)
    clock = Clock()
    log = OutputLog(tmp_path / "log", retention_bytes=4 * MiB, tail_bytes=0, clock_ns=clock)
    for _ in range(3000):
        clock.now += rng.choice([0, MS // 3, 2 * MS])
        words = [rng.choice([b"word", b"x" * 200, b"\n"]) for _ in range(rng.randrange(1, 60))]
        log.append(rng.choice([OUT, ERR]), b"".join(words))

    async def main():
        everything = await read_all(log.reader(log.start_offset))
        errs = b"".join(c.data for c in everything if c.stream is ERR)
        last = b"".join(
            c.data for c in await read_all(log.reader().select(streams=[ERR], tail_lines=500))
        )
        expected = errs.removesuffix(b"\n").split(b"\n")[-500:]
        assert last.removesuffix(b"\n").split(b"\n") == expected

    trio.run(main)
    log.remove()
