"""Tests of the per-job output log: ordering, followers, retention, boundedness, removal.
(Times, selection and the old format: test_output_select.py.)"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import stat
import tempfile
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jobworker.supervisor import output
from jobworker.supervisor.output import OutputChunk, OutputLog, OutputStream

OUT, ERR = OutputStream.STDOUT, OutputStream.STDERR
KiB, MiB = 2**10, 2**20

# tail_bytes that make readers read from disk only, or from memory as much as possible.
DISK_AND_TAIL = pytest.mark.parametrize("tail_bytes", [0, 16 * MiB], ids=["disk", "tail"])


@pytest.fixture(autouse=True, scope="module")
def _one_moment():
    # Every append at the same time: chunking here depends on sizes and streams alone, not on
    # how fast the machine appends (records a millisecond apart never join one chunk).
    with mock.patch.object(output, "_wall_clock_ns", lambda: 1_800_000_000 * 10**9):
        yield


def dropped(offset: int, count: int) -> OutputChunk:
    return OutputChunk(None, offset, b"", dropped=count)


async def read_all(reader) -> list[OutputChunk]:
    return [chunk async for chunk in reader]


def check_chunks(chunks: list[OutputChunk], start: int, max_chunk_bytes: int) -> None:
    """Offsets contiguous from ``start``; every chunk non-empty and within the limit."""
    offset = start
    for chunk in chunks:
        assert chunk.offset == offset
        assert 0 < len(chunk.data) <= max_chunk_bytes
        offset += len(chunk.data)


def tags_of(chunks: list[OutputChunk]) -> list[OutputStream]:
    return [chunk.stream for chunk in chunks for _ in chunk.data]


class Model:
    """What the log should hold: every byte and the stream it came from."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.tags: list[OutputStream] = []

    def append(self, log: OutputLog, stream: OutputStream, data: bytes) -> None:
        log.append(stream, data)
        self.data += data
        self.tags += [stream] * len(data)


# -- ordering, offsets, chunking ------------------------------------------------------------


@DISK_AND_TAIL
async def test_interleaved_streams_keep_order_tags_and_offsets(tmp_path, tail_bytes):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    model = Model()
    for i in range(200):
        model.append(log, OUT if i % 3 else ERR, f"line {i}\n".encode())
    assert log.end_offset == len(model.data)

    chunks = await read_all(log.reader())

    check_chunks(chunks, 0, 64 * KiB)
    assert b"".join(c.data for c in chunks) == model.data
    assert tags_of(chunks) == model.tags
    # Never mixing streams means a chunk boundary at every stream change.
    assert all(a.stream is not b.stream for a, b in itertools.pairwise(chunks))


@DISK_AND_TAIL
async def test_same_stream_records_coalesce_up_to_max_chunk_bytes_never_across_streams(
    tmp_path, tail_bytes
):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    for _ in range(10):
        log.append(OUT, b"o" * 10)
    log.append(ERR, b"e" * 7)
    log.append(OUT, b"o" * 30)

    chunks = await read_all(log.reader(max_chunk_bytes=25))

    assert [(c.stream, len(c.data)) for c in chunks] == [
        (OUT, 25),
        (OUT, 25),
        (OUT, 25),
        (OUT, 25),
        (ERR, 7),
        (OUT, 25),
        (OUT, 5),
    ]
    check_chunks(chunks, 0, 25)


@DISK_AND_TAIL
@pytest.mark.parametrize("max_chunk_bytes", [1, 7, 4096, 64 * KiB])
async def test_max_chunk_bytes_is_respected_for_large_records(
    tmp_path, tail_bytes, max_chunk_bytes
):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    data = random.Random(1).randbytes(100 * KiB + 3)
    log.append(OUT, data)
    if max_chunk_bytes == 1:
        data = data[-5000:]  # a 1-byte reader of 100 KiB is just slow
    start = log.end_offset - len(data)

    chunks = await read_all(log.reader(start, max_chunk_bytes=max_chunk_bytes))

    check_chunks(chunks, start, max_chunk_bytes)
    assert b"".join(c.data for c in chunks) == data


@DISK_AND_TAIL
async def test_reader_from_a_middle_offset_gets_the_suffix_of_the_record(tmp_path, tail_bytes):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    log.append(OUT, b"hello ")
    log.append(ERR, b"world")
    log.append(OUT, b"!")

    chunks = await read_all(log.reader(8))

    assert chunks == [OutputChunk(ERR, 8, b"rld"), OutputChunk(OUT, 11, b"!")]


@DISK_AND_TAIL
async def test_binary_safe_with_all_byte_values(tmp_path, tail_bytes):
    log = OutputLog(tmp_path / "log", tail_bytes=tail_bytes)
    data = bytes(range(256)) * 300
    # Include lengths that look like headers and stream tags inside the data.
    model = Model()
    for i in range(0, len(data), 1000):
        model.append(log, ERR if i % 3000 else OUT, data[i : i + 1000])

    chunks = await read_all(log.reader(max_chunk_bytes=999))

    assert b"".join(c.data for c in chunks) == data
    assert tags_of(chunks) == model.tags


async def test_random_offsets_within_many_records_on_disk(tmp_path):
    # Tiny and large records over several segments and many checkpoints: seeking from a
    # checkpoint must land on the right byte of the right record, wherever it is.
    rng = random.Random(7)
    log = OutputLog(
        tmp_path / "log", tail_bytes=0, segment_bytes=256 * KiB, retention_bytes=8 * MiB
    )
    model = Model()
    while len(model.data) < 2 * MiB:
        size = rng.choice([1, 2, 3, 100, 5000, 70 * KiB])
        model.append(log, rng.choice([OUT, ERR]), rng.randbytes(size))
    assert log.footprint().checkpoints > log.footprint().segments  # checkpoints in use

    for offset in [0, 1, len(model.data) - 1, *rng.sample(range(len(model.data)), 40)]:
        chunks = []
        async for chunk in log.reader(offset, max_chunk_bytes=3000):
            chunks.append(chunk)
            if len(chunks) == 20:
                break
        got = b"".join(c.data for c in chunks)
        check_chunks(chunks, offset, 3000)
        assert got == model.data[offset : offset + len(got)]
        assert tags_of(chunks) == model.tags[offset : offset + len(got)]


# -- ending, following -----------------------------------------------------------------------


async def test_reader_argument_validation(tmp_path):
    log = OutputLog(tmp_path / "log")
    with pytest.raises(ValueError):
        log.reader(-1)
    with pytest.raises(ValueError):
        log.reader(0, max_chunk_bytes=0)


async def test_not_follow_ends_at_the_current_end(tmp_path):
    log = OutputLog(tmp_path / "log")
    assert await read_all(log.reader()) == []
    log.append(OUT, b"abc")

    assert await read_all(log.reader()) == [OutputChunk(OUT, 0, b"abc")]
    assert await read_all(log.reader(3)) == []
    assert await read_all(log.reader(100)) == []  # beyond the end: ends at once


async def test_an_ended_reader_stays_ended(tmp_path):
    log = OutputLog(tmp_path / "log")
    reader = log.reader()
    assert await read_all(reader) == []
    log.append(OUT, b"later")
    with pytest.raises(StopAsyncIteration):
        await reader.__anext__()


async def test_follow_waits_for_appends_and_ends_after_close_once_drained(tmp_path):
    log = OutputLog(tmp_path / "log")
    log.append(OUT, b"history")
    got: list[OutputChunk] = []
    ended = trio.Event()

    async def follow():
        async for chunk in log.reader(follow=True):
            got.append(chunk)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [OutputChunk(OUT, 0, b"history")]

        log.append(ERR, b"live")
        await trio.testing.wait_all_tasks_blocked()
        assert got[-1] == OutputChunk(ERR, 7, b"live")
        assert not ended.is_set()

        log.append(OUT, b"last")
        log.close()
        log.close()  # idempotent
        await trio.testing.wait_all_tasks_blocked()
        assert ended.is_set()
    assert got[-1] == OutputChunk(OUT, 11, b"last")


async def test_follow_from_beyond_the_end_waits_for_output_to_reach_it(tmp_path):
    log = OutputLog(tmp_path / "log")
    got: list[OutputChunk] = []

    async def follow():
        async for chunk in log.reader(5, follow=True):
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        log.append(OUT, b"abc")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        log.append(ERR, b"defgh")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [OutputChunk(ERR, 5, b"fgh")]
        log.close()


async def test_follower_can_be_cancelled_while_waiting(tmp_path):
    log = OutputLog(tmp_path / "log")
    with trio.move_on_after(10) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, log.reader(follow=True))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught


async def test_many_followers_get_byte_identical_output(tmp_path):
    log = OutputLog(
        tmp_path / "log", tail_bytes=64 * KiB, segment_bytes=1 * MiB, retention_bytes=64 * MiB
    )
    rng = random.Random(3)
    expected = hashlib.sha256()
    digests: list[tuple[str, list[OutputStream]]] = []
    expected_tags: list[tuple[int, OutputStream]] = []

    async def follow(offset_seen: trio.Event):
        digest, tags = hashlib.sha256(), []
        reader = log.reader(follow=True, max_chunk_bytes=rng.choice([1000, 64 * KiB]))
        offset_seen.set()
        async for chunk in reader:
            digest.update(chunk.data)
            if not tags or tags[-1][1] is not chunk.stream:
                tags.append((chunk.offset, chunk.stream))
        digests.append((digest.hexdigest(), tags))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            started = trio.Event()
            nursery.start_soon(follow, started)
            await started.wait()
        for i in range(400):
            stream = ERR if i % 7 == 0 else OUT
            data = rng.randbytes(rng.choice([1, 10, 4000, 100 * KiB]))
            if not expected_tags or expected_tags[-1][1] is not stream:
                expected_tags.append((log.end_offset, stream))
            log.append(stream, data)
            expected.update(data)
            if i % 10 == 0:
                # Let the followers catch up now and then (so some read live from the
                # tail, some from disk), but not always.
                await trio.testing.wait_all_tasks_blocked()
        log.close()

    assert len(digests) == 20
    assert all(d == (expected.hexdigest(), expected_tags) for d in digests)


async def test_a_stalled_reader_blocks_neither_append_nor_other_readers(tmp_path):
    log = OutputLog(tmp_path / "log", tail_bytes=4 * KiB)
    stalled = log.reader(follow=True)
    log.append(OUT, b"first")
    assert await stalled.__anext__() == OutputChunk(OUT, 0, b"first")
    # `stalled` is never iterated again.
    received = bytearray()

    async def follow():
        async for chunk in log.reader(follow=True):
            received.extend(chunk.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        for _ in range(100):
            log.append(ERR, b"x" * 10 * KiB)
            await trio.testing.wait_all_tasks_blocked()
            assert len(received) == log.end_offset
        log.close()
    # The stalled reader still has everything from where it stopped.
    assert stalled.offset == 5
    assert len(b"".join([c.data async for c in stalled])) == log.end_offset - 5


# -- retention ---------------------------------------------------------------------------------


async def test_retention_drops_the_oldest_segments(tmp_path):
    log = OutputLog(
        tmp_path / "log", retention_bytes=256 * KiB, segment_bytes=64 * KiB, tail_bytes=16 * KiB
    )
    data = random.Random(5).randbytes(1 * MiB)
    for i in range(0, len(data), 10_000):
        log.append(OUT if i % 20_000 else ERR, data[i : i + 10_000])

    assert log.end_offset == len(data)
    assert 256 * KiB - 64 * KiB < log.retained_bytes <= 256 * KiB
    assert log.start_offset > 0
    assert log.start_offset % (64 * KiB) == 0  # whole segments
    assert len(os.listdir(tmp_path / "log")) == log.footprint().segments <= 5

    # A reader from before what is kept is told how much is gone, then gets the rest.
    first, *chunks = await read_all(log.reader(0))
    assert first == dropped(0, log.start_offset)
    check_chunks(chunks, log.start_offset, 64 * KiB)
    assert b"".join(c.data for c in chunks) == data[log.start_offset :]
    assert await log.reader(log.start_offset - 1).__anext__() == dropped(log.start_offset - 1, 1)


async def test_default_segment_keeps_at_least_seven_eighths_of_the_cap(tmp_path):
    log = OutputLog(tmp_path / "log", retention_bytes=8 * MiB)
    block = b"z" * 100_000
    for _ in range(300):
        log.append(OUT, block)
        assert log.retained_bytes <= 8 * MiB
    assert log.retained_bytes > 8 * MiB * 7 // 8
    assert log.footprint().segments <= 9


@DISK_AND_TAIL
async def test_follower_overtaken_by_retention_is_told_and_goes_on(tmp_path, tail_bytes):
    log = OutputLog(
        tmp_path / "log", retention_bytes=256 * KiB, segment_bytes=64 * KiB, tail_bytes=tail_bytes
    )
    log.append(OUT, b"a" * 100 * KiB)
    reader = log.reader(follow=True, max_chunk_bytes=1000)
    first = await reader.__anext__()
    assert first == OutputChunk(OUT, 0, b"a" * 1000)

    log.append(ERR, b"b" * 200 * KiB)  # 300 KiB > 256 KiB: the first segment goes
    assert log.start_offset == 64 * KiB

    assert await reader.__anext__() == dropped(1000, 64 * KiB - 1000)
    log.close()
    chunks = await read_all(reader)  # the same reader goes on from the retained start
    check_chunks(chunks, 64 * KiB, 1000)
    assert b"".join(c.data for c in chunks) == b"a" * 36 * KiB + b"b" * 200 * KiB


async def test_reader_positioned_on_disk_survives_later_segments_being_dropped(tmp_path):
    # The reader's remembered disk position refers to a segment that stays: dropping older
    # segments must not disturb it.
    log = OutputLog(
        tmp_path / "log", retention_bytes=256 * KiB, segment_bytes=64 * KiB, tail_bytes=0
    )
    data = random.Random(9).randbytes(256 * KiB)
    log.append(OUT, data)
    reader = log.reader(200 * KiB, max_chunk_bytes=1000)
    got = bytearray((await reader.__anext__()).data)
    log.append(OUT, b"q" * 64 * KiB)  # drops [0, 64 KiB)
    assert log.start_offset == 64 * KiB
    got += b"".join([c.data async for c in reader])
    assert bytes(got) == data[200 * KiB :] + b"q" * 64 * KiB


# -- resources ----------------------------------------------------------------------------------


async def test_memory_stays_bounded_whatever_the_volume(tmp_path):
    log = OutputLog(tmp_path / "log", retention_bytes=16 * MiB, tail_bytes=256 * KiB)
    block = random.Random(1).randbytes(64 * KiB)
    for i in range(1024):  # 64 MiB
        log.append(OUT if i % 2 else ERR, block)
        fp = log.footprint()
        assert fp.tail_data_bytes <= 256 * KiB
    assert log.end_offset == 64 * MiB
    assert fp.segments <= 9
    # One checkpoint per 64 KiB of file at most, plus the one opening each segment.
    assert fp.checkpoints <= 16 * MiB // (64 * KiB) + fp.segments

    # Many tiny appends: the tail is bounded in records too, and the index does not grow
    # with the number of records.
    log = OutputLog(tmp_path / "tiny", retention_bytes=16 * MiB)
    for i in range(100_000):
        log.append(OUT if i % 2 else ERR, b"x")
    fp = log.footprint()
    assert fp.tail_records <= 4096
    assert fp.checkpoints <= 100_000 * (13 + 1) // (64 * KiB) + 2  # 13-byte headers
    chunks = await read_all(log.reader(50_000))
    assert len(chunks) == 50_000 and tags_of(chunks)[:2] == [ERR, OUT]


async def test_remove_deletes_files_and_directory_and_readers_see_a_drop_or_the_end(tmp_path):
    directory = tmp_path / "log"
    log = OutputLog(directory, segment_bytes=64 * KiB, retention_bytes=1 * MiB)
    log.append(OUT, b"x" * 200 * KiB)
    assert len(os.listdir(directory)) == 4
    behind = log.reader(follow=True)
    await behind.__anext__()
    at_end = log.reader(log.end_offset, follow=True)
    outcomes: list[str] = []

    async def follow(reader):
        outcomes.extend([chunk async for chunk in reader])
        outcomes.append("ended")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, at_end)
        await trio.testing.wait_all_tasks_blocked()
        log.remove()
    assert outcomes == ["ended"]
    assert not directory.exists()
    assert await read_all(behind) == [dropped(64 * KiB, 136 * KiB)]
    assert (log.closed, log.retained_bytes, log.start_offset) == (True, 0, 200 * KiB)
    with pytest.raises(RuntimeError):
        log.append(OUT, b"more")
    log.remove()  # idempotent


async def test_append_rules(tmp_path):
    log = OutputLog(tmp_path / "log")
    log.append(OUT, b"")
    assert log.end_offset == 0
    log.append(ERR, bytearray(b"ab"))  # bytes-like is snapshotted
    with pytest.raises(TypeError):
        log.append(1, b"x")  # type: ignore[arg-type]
    log.close()
    with pytest.raises(RuntimeError):
        log.append(OUT, b"x")
    assert await read_all(log.reader()) == [OutputChunk(ERR, 0, b"ab")]
    log.remove()


async def test_output_the_disk_refuses_is_an_explicit_gap_never_a_silent_hole(
    tmp_path, monkeypatch
):
    log = OutputLog(tmp_path / "log", tail_bytes=0)
    log.append(OUT, b"before")
    real_pwritev = os.pwritev

    def header_then_enospc(fd, buffers, pos):
        real_pwritev(fd, buffers[:1], pos)  # a partial record reaches the file...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", header_then_enospc)
    assert log.append(ERR, b"lost") is False
    assert log.append(OUT, b"also lost") is False  # nothing lands after an unrecorded loss
    assert (log.end_offset, log.lost_bytes, log.loss_error.errno) == (6, 13, errno.ENOSPC)
    # The file is still a sequence of whole records: header (13 bytes) + b"before".
    assert [p.stat().st_size for p in (tmp_path / "log").iterdir()] == [13 + 6]
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert log.append(ERR, b"after") is True  # the gaps go first, then this
    log.close()
    expected = [
        OutputChunk(OUT, 0, b"before"),
        OutputChunk(OUT, 6, b"", lost=9),
        OutputChunk(ERR, 15, b"", lost=4),
        OutputChunk(ERR, 19, b"after"),
    ]
    assert await read_all(log.reader()) == expected
    # ...on disk as well: a reader of the reopened log is told the same.
    assert await read_all(OutputLog.reopen(tmp_path / "log").reader()) == expected
    # A reader that resumes inside a gap gets the rest of it.
    assert (await read_all(log.reader(10)))[0] == OutputChunk(OUT, 10, b"", lost=5)
    log.remove()


async def test_a_loss_the_disk_never_takes_is_kept_in_memory_and_the_files_end_before_it(
    tmp_path, monkeypatch
):
    log = OutputLog(tmp_path / "log")
    log.append(OUT, b"kept")

    def enospc(fd, buffers, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", enospc)
    assert log.append(OUT, b"x" * 100) is False
    log.close()  # the gap cannot be written either
    assert await read_all(log.reader()) == [
        OutputChunk(OUT, 0, b"kept"),
        OutputChunk(OUT, 4, b"", lost=100),
    ]
    monkeypatch.undo()
    reopened = OutputLog.reopen(tmp_path / "log")
    assert reopened.end_offset == 4  # no hole in the middle: the files just end
    assert await read_all(reopened.reader()) == [OutputChunk(OUT, 0, b"kept")]
    log.remove()


@DISK_AND_TAIL
async def test_a_reopened_log_is_byte_exact_with_its_offsets_and_retention(tmp_path, tail_bytes):
    log = OutputLog(
        tmp_path / "log", retention_bytes=256 * KiB, segment_bytes=64 * KiB, tail_bytes=tail_bytes
    )
    model = Model()
    rng = random.Random(7)
    for _ in range(300):
        model.append(log, rng.choice([OUT, ERR]), rng.randbytes(rng.randrange(1, 3000)))
    log.close()
    reopened = OutputLog.reopen(tmp_path / "log")
    assert (reopened.start_offset, reopened.end_offset, reopened.closed) == (
        log.start_offset,
        log.end_offset,
        True,
    )
    # The same bytes of the same streams at the same offsets (chunk boundaries may differ:
    # the live log serves its newest records from memory).
    again = await read_all(reopened.reader(log.start_offset))
    check_chunks(again, log.start_offset, 64 * KiB)
    retained = log.end_offset - log.start_offset
    assert b"".join(c.data for c in again) == bytes(model.data[-retained:])
    assert tags_of(again) == model.tags[-retained:]
    # retention's drops survive too
    assert await reopened.reader(0).__anext__() == dropped(0, log.start_offset)
    assert reopened.footprint().segments == log.footprint().segments
    log.remove()


@pytest.mark.parametrize(
    "torn",
    [
        b"\x02\x00\x00\x01\x00par",  # a header for 256 bytes, and 3 of them
        b"\x02\x00",  # half a header
    ],
    ids=["data", "header"],
)
async def test_a_reopened_log_ignores_a_record_cut_short_by_a_crash(tmp_path, torn):
    log = OutputLog(tmp_path / "log")
    log.append(OUT, b"whole")
    log.close()
    [segment] = (tmp_path / "log").iterdir()
    with open(segment, "ab") as f:
        f.write(torn)
    reopened = OutputLog.reopen(tmp_path / "log")
    assert reopened.end_offset == 5
    assert await read_all(reopened.reader()) == [OutputChunk(OUT, 0, b"whole")]


async def test_trim_drops_the_oldest_segments_as_retention_does(tmp_path):
    log = OutputLog(tmp_path / "log", retention_bytes=1 * MiB, segment_bytes=64 * KiB)
    for _ in range(8):
        log.append(OUT, b"z" * (64 * KiB))
    behind = log.reader(0)
    assert log.trim(100 * KiB) == 128 * KiB  # whole segments only
    assert (log.start_offset, log.stored_bytes) == (128 * KiB, 6 * 64 * KiB)
    assert await behind.__anext__() == dropped(0, 128 * KiB)
    assert log.trim(10 * MiB) == 5 * 64 * KiB  # never the active segment
    log.remove()


def test_directory_is_created_private_and_stale_logs_are_not_clobbered(tmp_path):
    directory = tmp_path / "a" / "log"
    log = OutputLog(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        OutputLog(directory)
    log.remove()


def test_constructor_validation(tmp_path):
    for kwargs in [
        {"retention_bytes": 0},
        {"tail_bytes": -1},
        {"retention_bytes": 1 * MiB, "segment_bytes": 2 * MiB},
        {"retention_bytes": 1 * MiB, "segment_bytes": 1 * KiB},  # too many files
    ]:
        with pytest.raises(ValueError):
            OutputLog(tmp_path / "log", **kwargs)
    # A cap below the default minimum segment size: one segment of the whole cap.
    log = OutputLog(tmp_path / "small", retention_bytes=1000)
    log.append(OUT, b"x" * 2500)
    assert log.retained_bytes == 500  # segments of 1000: [2000, 2500) is held


# -- properties ---------------------------------------------------------------------------------

appends = st.lists(
    st.tuples(st.sampled_from(OutputStream), st.binary(min_size=0, max_size=40)), max_size=30
)


def expected_start(end: int, retention_bytes: int, segment_bytes: int) -> int:
    """The documented rule: the smallest segment boundary leaving <= retention_bytes."""
    over = end - retention_bytes
    return max(0, -(-over // segment_bytes) * segment_bytes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=appends,
    segment_bytes=st.integers(1, 48),
    segments_retained=st.integers(1, 6),
    tail_bytes=st.integers(0, 100),
    max_chunk_bytes=st.integers(1, 50),
    data=st.data(),
)
def test_any_appends_read_back_from_any_offset(
    appends, segment_bytes, segments_retained, tail_bytes, max_chunk_bytes, data
):
    retention_bytes = segment_bytes * segments_retained + data.draw(st.integers(0, 5))
    retention_bytes = max(retention_bytes, segment_bytes)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(output, "_CHECKPOINT_INTERVAL_BYTES", 16),
    ):
        log = OutputLog(
            os.path.join(tmp, "log"),
            retention_bytes=retention_bytes,
            tail_bytes=tail_bytes,
            segment_bytes=segment_bytes,
        )
        model = Model()
        for stream, chunk in appends:
            model.append(log, stream, chunk)
        end = len(model.data)
        start = expected_start(end, retention_bytes, segment_bytes)
        assert (log.end_offset, log.start_offset) == (end, start)
        offset = data.draw(st.integers(0, end + 2), label="offset")

        async def main():
            chunks = await read_all(log.reader(offset, max_chunk_bytes=max_chunk_bytes))
            if offset < start:
                assert chunks.pop(0) == OutputChunk(None, offset, b"", dropped=start - offset)
            check_chunks(chunks, max(offset, start), max_chunk_bytes)
            assert b"".join(c.data for c in chunks) == model.data[max(offset, start) :]
            assert tags_of(chunks) == model.tags[max(offset, start) :]

        trio.run(main)
        log.remove()


@settings(max_examples=200, deadline=None)
@given(
    appends=appends,
    segment_bytes=st.integers(1, 48),
    tail_bytes=st.integers(0, 100),
    max_chunk_bytes=st.integers(1, 50),
    steps=st.lists(st.integers(0, 3), min_size=30, max_size=30),
)
def test_a_follower_interleaved_with_appends_sees_everything_or_a_drop(
    appends, segment_bytes, tail_bytes, max_chunk_bytes, steps
):
    # A follower takes 0-3 chunks after each append: its remembered disk position is
    # carried across appends, segment rolls and drops. A drop is a chunk saying how much, then
    # the reader goes on from the retained start; what it delivered must match the model byte
    # for byte.
    retention_bytes = segment_bytes * 3
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(output, "_CHECKPOINT_INTERVAL_BYTES", 16),
    ):
        log = OutputLog(
            os.path.join(tmp, "log"),
            retention_bytes=retention_bytes,
            tail_bytes=tail_bytes,
            segment_bytes=segment_bytes,
        )
        model = Model()

        async def main():
            reader = log.reader(follow=True, max_chunk_bytes=max_chunk_bytes)

            async def take(n: int) -> None:
                for _ in range(n):
                    if reader.offset >= log.end_offset and not log.closed:
                        return  # would wait
                    before = reader.offset
                    try:
                        chunk = await reader.__anext__()
                    except StopAsyncIteration:
                        return
                    assert chunk.offset == before  # nothing skipped
                    if chunk.dropped:
                        assert chunk.end == log.start_offset
                        assert (chunk.stream, chunk.data) == (None, b"")
                        continue
                    end = chunk.offset + len(chunk.data)
                    assert chunk.data == model.data[chunk.offset : end]
                    assert [chunk.stream] * len(chunk.data) == model.tags[chunk.offset : end]

            for (stream, chunk), n in zip(appends, steps, strict=False):
                model.append(log, stream, chunk)
                await take(n)
            log.close()
            await take(10**6)
            assert reader.offset == log.end_offset

        trio.run(main)
        log.remove()


def _fds_into(directory) -> int:
    return sum(
        1
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(directory))
    )


async def test_a_closed_log_holds_no_descriptors_and_stays_readable(tmp_path):
    # A server keeps every ended job: their logs must not pin a descriptor each.
    log = OutputLog(
        tmp_path / "log", retention_bytes=4 * 2**20, segment_bytes=256 * 2**10, tail_bytes=0
    )
    data = os.urandom(2**20)
    log.append(OutputStream.STDERR, data)
    assert _fds_into(tmp_path) == 4
    log.close()
    assert _fds_into(tmp_path) == 0
    chunks = [chunk async for chunk in log.reader(1000)]
    assert b"".join(c.data for c in chunks) == data[1000:]
    assert {c.stream for c in chunks} == {OutputStream.STDERR}
    assert _fds_into(tmp_path) == 0


def events_of(chunks: list[OutputChunk], start: int = 0) -> list[tuple[OutputStream, int | None]]:
    """One event per offset from `start` on, with no offset skipped: (stream, byte), or
    (stream, None) for a byte lost."""
    events: list[tuple[OutputStream, int | None]] = []
    for chunk in chunks:
        assert chunk.offset == start + len(events)
        if chunk.lost:
            assert not chunk.data
            events += [(chunk.stream, None)] * chunk.lost
        else:
            events += [(chunk.stream, b) for b in chunk.data]
    return events


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=st.lists(
        st.tuples(st.sampled_from([OUT, ERR]), st.binary(min_size=1, max_size=40), st.booleans()),
        max_size=30,
    ),
    segment_bytes=st.integers(1, 48),
    tail_bytes=st.integers(0, 100),
    max_chunk_bytes=st.integers(1, 50),
    disk_full_at_close=st.booleans(),
)
@example(  # more than retention keeps (64 segments of 1 byte): the oldest are dropped
    appends=[(OUT, b"\0" * 40, False)] * 3,
    segment_bytes=1,
    tail_bytes=0,
    max_chunk_bytes=1,
    disk_full_at_close=False,
)
def test_losses_read_back_as_gaps_live_and_after_reopening(
    appends, segment_bytes, tail_bytes, max_chunk_bytes, disk_full_at_close
):
    # Each append may meet a full disk. Whatever happens, a reader sees every offset either
    # as the byte appended there or as lost, in order, live; the reopened log shows the same
    # up to where its files end (and nothing beyond a loss that never reached them).
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(output, "_CHECKPOINT_INTERVAL_BYTES", 16),
    ):
        log = OutputLog(
            os.path.join(tmp, "log"),
            retention_bytes=segment_bytes * 64,
            tail_bytes=tail_bytes,
            segment_bytes=segment_bytes,
        )
        real_pwritev = os.pwritev
        real_open = os.open
        disk_full = False

        def pwritev(fd, buffers, pos):
            if disk_full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwritev(fd, buffers, pos)

        def open_(path, flags, mode=0o777, **kw):
            if disk_full and flags & os.O_CREAT:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, flags, mode, **kw)

        expected: list[tuple[OutputStream, int | None]] = []
        pending = dict.fromkeys(OutputStream, 0)
        with mock.patch.object(os, "pwritev", pwritev), mock.patch.object(os, "open", open_):
            for stream, chunk, full in appends:
                disk_full = full
                written = log.append(stream, chunk)
                assert written is not full
                if full:
                    pending[stream] += len(chunk)
                else:
                    for s in OutputStream:  # the gaps, then the data
                        expected += [(s, None)] * pending[s]
                        pending[s] = 0
                    expected += [(stream, b) for b in chunk]
            disk_full = disk_full_at_close
            log.close()
        on_disk = list(expected)
        for s in OutputStream:
            expected += [(s, None)] * pending[s]
            if not disk_full_at_close:
                on_disk += [(s, None)] * pending[s]

        async def main():
            # Retention may have dropped the oldest segments (64 of them at most are kept):
            # from where the log starts, every offset is there.
            start = log.start_offset
            live = await read_all(log.reader(start, max_chunk_bytes=max_chunk_bytes))
            assert events_of(live, start) == expected[start:]
            assert log.lost_bytes == sum(1 for _, b in expected if b is None)
            again = OutputLog.reopen(log.directory)
            assert again.start_offset == start
            reopened = await read_all(again.reader(start, max_chunk_bytes=max_chunk_bytes))
            assert events_of(reopened, start) == on_disk[start:]

        trio.run(main)
        log.remove()
