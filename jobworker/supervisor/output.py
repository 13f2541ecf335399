"""The per-job output log: stdout and stderr as one ordered, bounded, followable log.

Theory of operation
-------------------
Two pump tasks call :meth:`OutputLog.append` with whatever they read from the job's pipes. Each
append becomes one or more *records*: ``(stream, time, data)`` at a byte *offset* in the job's
combined output (offsets count every byte ever appended, from 0). The time is when the append
was made (wall clock, nanoseconds since the epoch), never earlier than the record before it: a
clock stepped back repeats the last time rather than breaking the order a ``since`` search
relies on.

**On disk.** Records are appended to segment files ``<start offset, 20 digits>.seg`` under the
log's directory. A record is a 5-byte header — a tag and the data length as a big-endian u32 —
then, for tags 5 to 8, the time as a big-endian u64 (a 13-byte header), then the data; nothing
else is in the file. Tags 1 and 2 (stdout, stderr) and 3 and 4 (their gaps, below) are the
records of logs written before times were kept: they still read, with no time. This version
writes tags 5 to 8 only (the same four plus 4). A segment is sealed when it holds exactly
``segment_bytes`` of output: an append that crosses the boundary is split into two records (of
the same time), so every sealed segment starts at a multiple of ``segment_bytes`` (as long as
nothing was lost).

**Losses.** Output that cannot be written (a full disk) is never dropped silently: the log
records a *gap*, a header with tag 7 (stdout) or 8 (stderr) whose length is the number of bytes
lost, whose time is when the loss began, and which has no data. Offsets jump over it, and a
reader gets a chunk with ``lost`` set instead of data. A gap is written before anything that
follows it, once the disk takes writes again: no data is ever on disk after a loss that is not.
If it cannot be written by the time the log closes, it is kept in memory (readers of this log
still see it; the log on disk ends there).

**Reopening.** ``OutputLog.reopen(directory)`` rebuilds a closed, read-only log from its segment
files (after a restart): it scans the headers, ignoring a partial record at the very end (a crash
mid-write), and keeps only the index in memory.

**Retention.** After each append, while more than ``retention_bytes`` are held, the oldest segment
is deleted. Segments are whole ``segment_bytes`` and the active one is never dropped (it is
never larger than ``segment_bytes <= retention_bytes``), so once anything has been dropped
``retention_bytes - segment_bytes < retained_bytes <= retention_bytes``. The default segment is
``retention_bytes // 8`` clamped to [64 KiB, ``retention_bytes``]: for caps of 512 KiB and more,
at least 7/8 of the cap stays readable. There is one file (and fd) per retained segment, so a
``segment_bytes`` under ``retention_bytes // 64`` is refused. Retention counts output bytes; the
disk also holds 13 header bytes per record.

**Index.** Per segment: its start offset and a sparse list of checkpoints ``(offset, file
position, time)`` at record boundaries, one each time ``_CHECKPOINT_INTERVAL_BYTES`` of file has
been written since the last. The index is O(retained file bytes / 64 KiB), not O(records).

**Tail.** Memory holds the most recent records (at most ``tail_bytes`` of data and
``_TAIL_MAX_RECORDS`` records), referencing the appended ``bytes`` objects themselves (a copy is
made only for the two halves of an append split at a segment boundary).

**Readers.** A reader is a cursor: an offset plus, when it last read from disk, where that offset
is in which segment file. Each ``__anext__`` checks, at that moment, that the cursor is still
retained — if not, the reader yields one chunk with ``dropped`` set (how many bytes retention
took from under it) and goes on from the first retained offset — then serves from the tail if
the cursor is in it, else from disk: find the segment (bisect on start offsets), then the record
(bisect on checkpoints and scan forward, unless the remembered position already matches), then
``os.pread`` up to ``max_chunk_bytes`` of data. Following records join the chunk while they are
of the same stream and were read less than ``COALESCE_NS`` (1 ms) after the chunk's first byte:
a chunk's ``time_ns`` is that of its first byte, and every other byte of it was read within the
millisecond after. A caught-up follower waits on ``_changed``, a :class:`trio.Event` that every
append, ``close()`` and ``remove()`` set and replace. Readers hold no fds and no buffers of their
own, so a stalled or abandoned reader costs its owner nothing but a small object, and delays
nobody else.

**Selecting** (:meth:`OutputReader.select`). A stream filter makes the reader step over the other
stream's records by their headers, never reading their data (offsets stay the combined ones).
``since`` moves the cursor to the first record read at or after a time: bisect the segments on
their first record's time, then that segment's checkpoints, then scan one interval. Records
without a time count as older than any ``since``. ``tail_lines`` moves it to the start of the last
N lines (of the selected streams) retained when it is asked: the segments are scanned backwards,
one checkpoint interval's headers, then the data of its records from the last, a block at a
time, counting newlines — so memory stays at one block and one interval's headers whatever the
log's size, and a reader yields to other tasks after each block. A start that retention has
already taken (fewer lines kept than asked, a first kept record after ``since``) is reported as
a drop, like any other.

File I/O is synchronous on purpose: ``os.pwritev``/``os.pread`` of <= 256 KiB hit the page cache
and take microseconds, while a hop to a worker thread per chunk costs more than the copy itself,
and ``append`` must never await (the pumps call it between reads).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import os
import struct
import time
import weakref
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import trio

__all__ = [
    "COALESCE_NS",
    "OutputChunk",
    "OutputLog",
    "OutputLogFootprint",
    "OutputReader",
    "OutputStream",
]

# Records join one chunk only if read less than this after the chunk's first byte: a chunk's
# time stands for all of its bytes to within this (see the module's "Readers").
COALESCE_NS: Final = 1_000_000


class OutputStream(enum.Enum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: OutputStream | None  # None only for a drop
    offset: int  # offset of data[0] in the job's combined output
    data: bytes
    # Bytes of `stream` lost at `offset` (the disk was full): then `data` is empty, and the next
    # chunk starts at offset + lost.
    lost: int = 0
    # Bytes at `offset` that retention removed before this reader got to them: then `data` is
    # empty, `stream` None, and the next chunk starts at offset + dropped.
    dropped: int = 0
    # When data[0] was read from the job (or the loss began), in ns since the epoch; None for
    # records of a log written before times were kept, and for drops. Left out of equality:
    # two chunks are the same output at the same place whenever it was read.
    time_ns: int | None = field(default=None, compare=False)

    @property
    def end(self) -> int:
        return self.offset + (self.lost or self.dropped or len(self.data))


@dataclass(frozen=True, slots=True)
class OutputLogFootprint:
    """What an :class:`OutputLog` holds in memory, for tests and metrics (see ``footprint()``)."""

    tail_records: int
    tail_data_bytes: int
    segments: int  # == open fds while the log is open; none once closed
    checkpoints: int  # index entries, over all segments


_HEADER: Final = struct.Struct(">BI")  # tag, data length
_HEADER_BYTES: Final = _HEADER.size
_TIME: Final = struct.Struct(">Q")  # after the header of a timed record
_TIMED_HEADER_BYTES: Final = _HEADER_BYTES + _TIME.size
_MAX_RECORD_BYTES: Final = 2**32 - 1
# A gap's tag: the stream's, plus this. A timed record's: the untimed one's, plus _TIMED_TAG.
_GAP_TAG: Final = 2
_TIMED_TAG: Final = 4
# tag -> (stream, whether a gap, header bytes)
_TAGS: Final = {
    s.value + gap * _GAP_TAG + timed * _TIMED_TAG: (
        s,
        bool(gap),
        _TIMED_HEADER_BYTES if timed else _HEADER_BYTES,
    )
    for s in OutputStream
    for gap in (0, 1)
    for timed in (0, 1)
}
# Stands for "no time" where times are compared: older than any time a record can have.
_UNTIMED: Final = -1

# File bytes between two index checkpoints (not Final: tests shrink it to exercise seeking).
_CHECKPOINT_INTERVAL_BYTES = 64 * 2**10
_SCAN_BLOCK_BYTES: Final = 64 * 2**10  # pread size when walking records (see _walk)
_HEADERS_BLOCK_BYTES: Final = 4 * 2**10  # the same, when only the headers are wanted
_MIN_READ_BYTES: Final = 4 * 2**10  # smallest pread when reading records
_MIN_DEFAULT_SEGMENT_BYTES: Final = 64 * 2**10
# Bounds the open fds per log (one per retained segment): retention_bytes / segment_bytes.
_MAX_SEGMENTS_PER_RETENTION: Final = 64
# Bounds the tail's bookkeeping when a job writes many tiny chunks (1-byte appends would
# otherwise mean 256 Ki tuples for the default tail).
_TAIL_MAX_RECORDS: Final = 4096
# Records a reader steps over (the other stream's) before it lets other tasks run.
_SKIP_RECORDS: Final = 1024
# Data a tail_lines scan reads backwards per pread, and between two yields to other tasks (not
# Final: tests shrink it to cross block boundaries).
_TAIL_BLOCK_BYTES = 64 * 2**10

_OPEN_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _wall_clock_ns() -> int:
    return time.time_ns()


class _Segment:
    """One segment file: its fd and its sparse index. Mutable, owned by the log alone."""

    __slots__ = (
        "start_offset",
        "path",
        "fd",
        "data_bytes",
        "span",
        "file_bytes",
        "cp_offsets",
        "cp_positions",
        "cp_times",
    )

    def __init__(self, directory: str, start_offset: int, *, create: bool = True) -> None:
        self.start_offset = start_offset
        self.path = os.path.join(directory, f"{start_offset:020d}.seg")
        self.fd = os.open(self.path, _OPEN_FLAGS, 0o600) if create else -1
        self.data_bytes = 0  # output stored in the file
        self.span = 0  # offsets covered: stored output and gaps
        self.file_bytes = 0
        # Checkpoints: record boundaries as (output offset, file position, time of the record
        # there); always (start, 0, time of the first record — None while there is none).
        self.cp_offsets = [start_offset]
        self.cp_positions = [0]
        self.cp_times: list[int | None] = [None]

    @property
    def first_time(self) -> int | None:
        """The time of its first record (None: none yet, or untimed)."""
        return self.cp_times[0]

    def write_record(self, stream: OutputStream, data: memoryview | bytes, time_ns: int) -> None:
        self._write(stream.value + _TIMED_TAG, len(data), data, time_ns)
        self.data_bytes += len(data)
        self.span += len(data)

    def write_gap(self, stream: OutputStream, lost: int, time_ns: int) -> None:
        self._write(stream.value + _GAP_TAG + _TIMED_TAG, lost, b"", time_ns)
        self.span += lost

    def _write(self, tag: int, length: int, data: memoryview | bytes, time_ns: int) -> None:
        pos = self.file_bytes
        if pos == 0:
            self.cp_times[0] = time_ns
        elif pos - self.cp_positions[-1] >= _CHECKPOINT_INTERVAL_BYTES:
            self.cp_offsets.append(self.start_offset + self.span)
            self.cp_positions.append(pos)
            self.cp_times.append(time_ns)
        header = _HEADER.pack(tag, length) + _TIME.pack(time_ns)
        try:
            _pwrite_all(self.fd, [header, data] if data else [header], pos)
        except BaseException:
            # Keep the file a sequence of whole records (e.g. after ENOSPC), then re-raise.
            os.ftruncate(self.fd, pos)
            if pos == 0:
                self.cp_times[0] = None
            elif self.cp_positions[-1] == pos:
                del self.cp_offsets[-1], self.cp_positions[-1], self.cp_times[-1]
            raise
        self.file_bytes = pos + len(header) + len(data)

    @classmethod
    def scan(cls, directory: str, name: str) -> _Segment:
        """An existing segment file, read back: its index and sizes (see OutputLog.reopen).
        A partial record at its end (a crash mid-write) is left out."""
        seg = cls(directory, int(name.removesuffix(".seg")), create=False)
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            end = 0
            # Small blocks: a scan wants the headers, and long records' data would be read
            # for nothing.
            for rec in _walk(fd, 0, _HEADERS_BLOCK_BYTES):
                if rec.end > size:
                    break  # the partial last record
                if rec.pos == 0:
                    seg.cp_times[0] = rec.time
                elif rec.pos - seg.cp_positions[-1] >= _CHECKPOINT_INTERVAL_BYTES:
                    seg.cp_offsets.append(seg.start_offset + seg.span)
                    seg.cp_positions.append(rec.pos)
                    seg.cp_times.append(rec.time)
                end = rec.end
                seg.data_bytes += rec.stored
                seg.span += rec.length
            seg.file_bytes = end
        finally:
            os.close(fd)
        return seg

    @contextlib.contextmanager
    def readable(self) -> Iterator[int]:
        """An fd to read from: the segment's own while the log is open; after the log is closed,
        one opened for this read alone — an ended job's log holds no descriptors (a server
        keeps thousands of ended jobs)."""
        if self.fd >= 0:
            yield self.fd
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def records(
        self,
        fd: int,
        checkpoint: int,
        block_bytes: int = _HEADERS_BLOCK_BYTES,
        *,
        to_next_checkpoint: bool = False,
    ) -> Iterator[tuple[int, _Record]]:
        """The records from checkpoint ``checkpoint`` to the end of the file (or to the next
        checkpoint), each with its output offset (``block_bytes``: see _walk)."""
        offset = self.cp_offsets[checkpoint]
        end_pos = self.file_bytes
        if to_next_checkpoint and checkpoint + 1 < len(self.cp_positions):
            end_pos = self.cp_positions[checkpoint + 1]
        for rec in _walk(fd, self.cp_positions[checkpoint], block_bytes, end_pos=end_pos):
            yield offset, rec
            offset += rec.length

    def locate(self, fd: int, offset: int) -> _Cursor:
        """Find ``offset`` (which this segment holds) in the file: at the header of the record
        starting there, or inside a record (of data, or a gap) with what is left of it."""
        i = bisect.bisect_right(self.cp_offsets, offset) - 1
        for rec_offset, rec in self.records(fd, i, _SCAN_BLOCK_BYTES):
            if rec_offset + rec.length > offset:
                skip = offset - rec_offset
                if skip == 0:
                    return _Cursor(rec.pos)
                data_pos = rec.pos + rec.header_bytes
                if rec.gap:
                    return _Cursor(data_pos, rec.length - skip, rec.stream, gap=True, time=rec.time)
                return _Cursor(data_pos + skip, rec.length - skip, rec.stream, time=rec.time)
        raise RuntimeError(f"output segment {self.path} is shorter than its index")

    def first_at_or_after(self, fd: int, since_ns: int) -> int | None:
        """The offset of this segment's first record read at or after ``since_ns`` (>= 0), if
        any: bisect the checkpoints, then scan the interval before the first that qualifies."""
        i = bisect.bisect_left(self.cp_times, since_ns, key=_time_key)
        if i == 0:
            return self.start_offset if self.span else None
        for rec_offset, rec in self.records(fd, i - 1):
            if _time_key(rec.time) >= since_ns:
                return rec_offset
        return None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _time_key(time_ns: int | None) -> int:
    return _UNTIMED if time_ns is None else time_ns


def _first_time_key(seg: _Segment) -> float:
    # A segment with no record yet (the active one, just rolled) sorts last: it has nothing
    # to offer a since search.
    return _time_key(seg.first_time) if seg.span else float("inf")


class _Record(NamedTuple):
    """A record's header, as read from a segment file. A tuple, not a dataclass: one is built
    per record walked (reopening, seeking, skipping a stream, scanning a tail), where a frozen
    dataclass's construction costs several times more."""

    pos: int  # of the header
    stream: OutputStream
    gap: bool
    length: int  # data bytes, or bytes lost for a gap
    time: int | None
    header_bytes: int

    @property
    def stored(self) -> int:
        return 0 if self.gap else self.length

    @property
    def end(self) -> int:
        return self.pos + self.header_bytes + self.stored


def _walk(
    fd: int, pos: int, block_bytes: int = _SCAN_BLOCK_BYTES, *, end_pos: int | None = None
) -> Iterator[_Record]:
    """The records of a segment file from the header at ``pos`` on, to ``end_pos`` or the end
    of the file. One pread serves every header in a block (a header per pread costs a syscall
    per record: seconds for a log of short lines), and a record longer than the block costs one
    more. The last record may be cut short by the file's end: callers that care check."""
    while end_pos is None or pos < end_pos:
        block = os.pread(fd, block_bytes, pos)
        i = 0
        while i + _HEADER_BYTES <= len(block):
            tag, length = _HEADER.unpack_from(block, i)
            stream, gap, header_bytes = _parse_tag(tag)
            if i + header_bytes > len(block):
                break  # the header straddles the block
            timed = header_bytes == _TIMED_HEADER_BYTES
            rec = _Record(
                pos + i,
                stream,
                gap,
                length,
                _TIME.unpack_from(block, i + _HEADER_BYTES)[0] if timed else None,
                header_bytes,
            )
            if end_pos is not None and rec.pos >= end_pos:
                return
            yield rec
            i += header_bytes + rec.stored
        if i == 0:
            return  # the end, or a header a crash cut short
        pos += i  # the next header, possibly beyond this block


def _parse_tag(tag: int) -> tuple[OutputStream, bool, int]:
    """(stream, whether the record is a gap, its header's size)."""
    try:
        return _TAGS[tag]
    except KeyError:
        raise RuntimeError(f"corrupt output segment: unknown stream tag {tag}") from None


@dataclass(slots=True)
class _Cursor:
    """Where a reader is in a segment file: at a header (``left == 0``), or inside a record
    of ``stream`` read at ``time`` with ``left`` bytes of it to go (for a gap, ``pos`` is after
    its header)."""

    pos: int
    left: int = 0
    stream: OutputStream | None = None
    gap: bool = False
    time: int | None = None


def _pwrite_all(fd: int, buffers: list[bytes | memoryview], pos: int) -> None:
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, pos)
    if written == total:
        return
    # Short write (rare on regular files: a signal, or the disk filling up): finish by hand.
    rest = memoryview(b"".join(buffers))[written:]
    pos += written
    while rest:
        n = os.pwrite(fd, rest, pos)
        rest = rest[n:]
        pos += n


def _joins(first_ns: int | None, time_ns: int | None) -> bool:
    """Whether a record read at ``time_ns`` may join a chunk whose first byte was read at
    ``first_ns`` (see COALESCE_NS). Untimed records (an old log's) always may."""
    if first_ns is None or time_ns is None:
        return first_ns is time_ns
    return time_ns - first_ns < COALESCE_NS


def _read_records(
    fd: int, at: _Cursor, end_pos: int, max_bytes: int
) -> tuple[bytes, int, OutputStream | None, int | None, _Cursor]:
    """Read up to ``max_bytes`` of data of one stream from ``at`` on, or the gap there.

    Returns the data (or b""), the bytes lost (a gap), their stream, the time of their first
    byte, and where that leaves the reader. A chunk never mixes streams, nor data with a gap,
    nor records read a millisecond or more apart (``_joins``).
    """
    if at.gap:  # inside a gap: the rest of it
        return b"", at.left, at.stream, at.time, _Cursor(at.pos)
    pos, rec_left = at.pos, at.left
    # At a header, the next record sets the chunk's stream and time.
    stream, first_ns = (at.stream, at.time) if rec_left else (None, None)
    rec_time = at.time
    parts: list[memoryview] = []
    size = 0
    while size < max_bytes and pos < end_pos:
        # Enough for the data still wanted plus a header; more when records are tiny, so
        # that coalescing 1-byte records does not cost a syscall each.
        want = max(max_bytes - size + _TIMED_HEADER_BYTES, _MIN_READ_BYTES)
        block = os.pread(fd, min(want, end_pos - pos), pos)
        if not block:
            break
        view = memoryview(block)
        i = 0
        stop = False
        while size < max_bytes:
            if rec_left == 0:
                if i + _HEADER_BYTES > len(block):
                    break  # the header straddles the block: read on from it
                tag, length = _HEADER.unpack_from(block, i)
                record_stream, gap, header_bytes = _parse_tag(tag)
                if i + header_bytes > len(block):
                    break
                time_ns = (
                    _TIME.unpack_from(block, i + _HEADER_BYTES)[0]
                    if header_bytes == _TIMED_HEADER_BYTES
                    else None
                )
                if gap:
                    if not parts:  # the gap is the chunk
                        return b"", length, record_stream, time_ns, _Cursor(pos + i + header_bytes)
                    stop = True
                    break
                if stream is None:
                    stream, first_ns = record_stream, time_ns
                elif record_stream is not stream or not _joins(first_ns, time_ns):
                    stop = True
                    break
                rec_left, rec_time = length, time_ns
                i += header_bytes
            take = min(rec_left, max_bytes - size, len(block) - i)
            if take == 0:
                break  # the record goes on beyond the block
            parts.append(view[i : i + take])
            i += take
            size += take
            rec_left -= take
        pos += i
        if stop:
            break
    data = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
    after = _Cursor(pos, rec_left, stream, time=rec_time) if rec_left else _Cursor(pos)
    return data, 0, stream, first_ns, after


def _skip_records(
    fd: int, pos: int, end_pos: int, streams: Collection[OutputStream]
) -> tuple[int, _Cursor]:
    """Step over the records from the header at ``pos`` that are not of ``streams`` (by their
    headers alone), at most _SKIP_RECORDS of them: the offsets stepped over, and where."""
    skipped = 0
    for n, rec in enumerate(_walk(fd, pos, _HEADERS_BLOCK_BYTES, end_pos=end_pos)):
        if rec.stream in streams or n >= _SKIP_RECORDS:
            return skipped, _Cursor(rec.pos)
        skipped += rec.length
        pos = rec.end
    return skipped, _Cursor(pos)


def _close_segments(segments: list[_Segment]) -> None:
    for seg in segments:
        seg.close()


class OutputLog:
    """One job's stdout and stderr, as one ordered log that any number of readers follow.

    Lifecycle: ``append`` until ``close()``; readers drain and end. ``remove()`` (which the
    owner must call: it is what releases the fds and the files) also drops everything retained:
    afterwards ``start_offset == end_offset``, so a reader that had not delivered all output
    yields a drop for the rest and ends, like after any other drop.

    ``clock_ns`` gives the time each append is stamped with (tests pass their own).

    Not thread-safe: use it from the Trio thread only (nothing in it ever awaits except a
    reader waiting for output, so no lock is needed there).
    """

    def __init__(
        self,
        directory: os.PathLike[str] | str,
        *,
        retention_bytes: int = 256 * 2**20,
        tail_bytes: int = 256 * 2**10,
        segment_bytes: int | None = None,
        clock_ns: Callable[[], int] | None = None,
        _reopen: bool = False,
    ) -> None:
        if retention_bytes < 1:
            raise ValueError(f"retention_bytes must be positive, not {retention_bytes}")
        if tail_bytes < 0:
            raise ValueError(f"tail_bytes must not be negative, not {tail_bytes}")
        if segment_bytes is None:
            segment_bytes = min(
                retention_bytes, max(retention_bytes // 8, _MIN_DEFAULT_SEGMENT_BYTES)
            )
        if not 1 <= segment_bytes <= retention_bytes:
            raise ValueError(
                f"segment_bytes must be in [1, retention_bytes={retention_bytes}],"
                f" not {segment_bytes}"
            )
        if retention_bytes // segment_bytes > _MAX_SEGMENTS_PER_RETENTION:
            raise ValueError(
                f"segment_bytes={segment_bytes} is too small for retention_bytes="
                f"{retention_bytes}: retention may span at most {_MAX_SEGMENTS_PER_RETENTION}"
                " segments (one open file each)"
            )
        self._directory = os.fspath(directory)
        self._retention_bytes = retention_bytes
        self._tail_bytes = tail_bytes
        self._segment_bytes = segment_bytes
        self._clock_ns = clock_ns or _wall_clock_ns
        self._last_time_ns = 0  # appends are stamped no earlier than this

        self._start_offset = 0
        self._end_offset = 0
        self._stored_bytes = 0  # output in the retained segment files (gaps are not stored)
        self._closed = False
        self._removed = False
        self._changed = trio.Event()
        # Losses: bytes per stream not yet recorded as a gap (the disk refused it too), when
        # that loss began, and every byte ever lost, with the error that lost the first.
        self._pending_loss = dict.fromkeys(OutputStream, 0)
        self._pending_loss_ns = dict.fromkeys(OutputStream, 0)
        self._lost_bytes = 0
        self.loss_error: OSError | None = None
        # Tail: (offset, stream, data or bytes lost, time) records in order; entries before
        # _tail_head are evicted (compacted away in batches, so eviction is O(1) amortised).
        self._tail: list[tuple[int, OutputStream, bytes | int, int | None]] = []
        self._tail_head = 0
        self._tail_data_bytes = 0

        # Segments, oldest first; the last one is the active one. Mutated in place only, so
        # the finalizer (a safety net for a log dropped without remove()) sees the live list.
        self._segments: list[_Segment] = []
        self._segment_starts: list[int] = []
        self._finalizer = weakref.finalize(self, _close_segments, self._segments)
        if _reopen:
            self._load()
        else:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
            self._segments.append(_Segment(self._directory, 0))
            self._segment_starts.append(0)

    @classmethod
    def reopen(cls, directory: os.PathLike[str] | str) -> OutputLog:
        """The log a previous process left in ``directory``, closed and read-only: what it had
        retained, from its files (retention and losses as they were written)."""
        return cls(directory, _reopen=True)

    def _load(self) -> None:
        names = sorted(n for n in os.listdir(self._directory) if n.endswith(".seg"))
        for name in names:
            seg = _Segment.scan(self._directory, name)
            if self._segments and seg.start_offset < self._end_offset:
                raise RuntimeError(f"output segment {seg.path} overlaps the one before it")
            self._segments.append(seg)
            self._segment_starts.append(seg.start_offset)
            self._end_offset = seg.start_offset + seg.span
            self._stored_bytes += seg.data_bytes
        if not self._segments:
            raise FileNotFoundError(f"no output segments in {self._directory}")
        self._start_offset = self._segments[0].start_offset
        self._closed = True

    # -- properties ---------------------------------------------------------------------

    @property
    def end_offset(self) -> int:
        """Total bytes ever appended."""
        return self._end_offset

    @property
    def start_offset(self) -> int:
        """First offset still retained (``end_offset`` after ``remove()``)."""
        return self._start_offset

    @property
    def retained_bytes(self) -> int:
        return self._end_offset - self._start_offset

    @property
    def stored_bytes(self) -> int:
        """Output held in the segment files (what retention and budgets count)."""
        return self._stored_bytes

    @property
    def lost_bytes(self) -> int:
        """Output that could not be written (the disk refused it), over both streams."""
        return self._lost_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def directory(self) -> str:
        return self._directory

    def footprint(self) -> OutputLogFootprint:
        """What the log holds in memory right now (tests assert the bounds on this)."""
        return OutputLogFootprint(
            tail_records=len(self._tail) - self._tail_head,
            tail_data_bytes=self._tail_data_bytes,
            segments=len(self._segments),
            checkpoints=sum(len(s.cp_offsets) for s in self._segments),
        )

    # -- writing ------------------------------------------------------------------------

    def append(self, stream: OutputStream, data: bytes) -> bool:
        """Add ``data`` from ``stream`` at ``end_offset``, stamped with the time now. Never
        awaits nor waits for readers.

        Returns False if some of it could not be written (a full disk): that output is then
        recorded as a gap, never dropped silently (see the module's "Losses"), and
        ``lost_bytes`` and ``loss_error`` say so. Raises RuntimeError once closed.
        """
        if self._closed:
            raise RuntimeError("append to a closed OutputLog")
        if not isinstance(stream, OutputStream):
            raise TypeError(f"stream must be an OutputStream, not {stream!r}")
        data = bytes(data)  # no copy for bytes; a snapshot of a bytearray/memoryview
        if not data:
            return True
        read_ns = self._clock_ns()
        done = 0
        try:
            # Nothing may be written after a loss that is not on disk yet (stamped with when
            # it began: before now).
            self._write_pending_gaps()
            now = self._stamp(read_ns)
            view = memoryview(data)
            while done < len(data):
                seg = self._segments[-1]
                if seg.data_bytes >= self._segment_bytes:
                    seg = self._roll()
                n = min(len(data) - done, self._segment_bytes - seg.data_bytes, _MAX_RECORD_BYTES)
                seg.write_record(stream, view[done : done + n], now)
                self._tail_append(
                    self._end_offset,
                    stream,
                    data if n == len(data) else data[done : done + n],
                    now,
                )
                self._end_offset += n
                self._stored_bytes += n
                done += n
            return True
        except OSError as exc:
            if not self._pending_loss[stream]:
                self._pending_loss_ns[stream] = read_ns
            self._pending_loss[stream] += len(data) - done
            self._lost_bytes += len(data) - done
            self.loss_error = self.loss_error or exc
            return False
        finally:
            self._drop_over_retention()
            self._wake()

    def _stamp(self, time_ns: int) -> int:
        # Never before the last record: `since` bisects on these times.
        self._last_time_ns = max(self._last_time_ns, time_ns)
        return self._last_time_ns

    def _write_pending_gaps(self) -> None:
        for stream, lost in self._pending_loss.items():
            if lost:
                seg = self._segments[-1]
                if seg.data_bytes >= self._segment_bytes:
                    seg = self._roll()
                began = self._stamp(self._pending_loss_ns[stream])
                seg.write_gap(stream, lost, began)
                self._record_gap(stream, lost, began)

    def _record_gap(self, stream: OutputStream, lost: int, time_ns: int) -> None:
        self._pending_loss[stream] = 0
        self._tail_append(self._end_offset, stream, lost, time_ns)
        self._end_offset += lost

    def close(self) -> None:
        """No more appends; followers deliver what exists, then end. Idempotent.

        A loss not yet on disk is written now if the disk takes it, else kept in memory only:
        this log's readers still see it; the files end where the loss began."""
        if not self._closed and any(self._pending_loss.values()):
            try:
                self._write_pending_gaps()
            except OSError:
                for stream, lost in self._pending_loss.items():
                    if lost:
                        self._record_gap(stream, lost, self._stamp(self._pending_loss_ns[stream]))
        self._closed = True
        for seg in self._segments:
            seg.close()  # reads reopen per call from now on (see _Segment.readable)
        self._wake()

    def remove(self) -> None:
        """Close, drop all output, close the fds, delete the files and the directory.

        Idempotent. Readers then behave as after a drop of everything: one whose cursor is
        before ``end_offset`` yields a drop of the rest, then ends; one at the end ends.
        """
        if self._removed:
            return
        self._closed = True
        self._removed = True
        self._start_offset = self._end_offset
        self._tail.clear()
        self._tail_head = 0
        self._tail_data_bytes = 0
        self._wake()
        segments = list(self._segments)
        self._segments.clear()
        self._segment_starts.clear()
        for seg in segments:
            seg.close()
        for seg in segments:
            _unlink_missing_ok(seg.path)
        try:
            os.rmdir(self._directory)
        except FileNotFoundError:
            pass

    def _roll(self) -> _Segment:
        seg = _Segment(self._directory, self._end_offset)
        self._segments.append(seg)
        self._segment_starts.append(seg.start_offset)
        return seg

    def _tail_append(
        self, offset: int, stream: OutputStream, data: bytes | int, time_ns: int
    ) -> None:
        # An int is a gap of that many bytes: it holds no memory to speak of. The newest gap
        # always stays: one kept in memory only (no file has it) must not be evicted.
        tail = self._tail
        tail.append((offset, stream, data, time_ns))
        self._tail_data_bytes += _held(data)
        head = self._tail_head
        while (
            head < len(tail)
            and (self._tail_data_bytes > self._tail_bytes or len(tail) - head > _TAIL_MAX_RECORDS)
            and not (head == len(tail) - 1 and isinstance(tail[head][2], int))
        ):
            self._tail_data_bytes -= _held(tail[head][2])
            tail[head] = None  # type: ignore[call-overload]  # release the bytes now
            head += 1
        if head > 64 and head * 2 > len(tail):
            del tail[:head]
            head = 0
        self._tail_head = head

    def _drop_over_retention(self) -> None:
        # The active segment never holds more than segment_bytes <= retention_bytes, so
        # this never drops it. Gaps take no room: they do not count.
        while self._stored_bytes > self._retention_bytes and len(self._segments) > 1:
            self._drop_oldest_segment()

    def _drop_oldest_segment(self) -> None:
        seg = self._segments.pop(0)
        del self._segment_starts[0]
        seg.close()
        _unlink_missing_ok(seg.path)
        self._stored_bytes -= seg.data_bytes
        self._start_offset = self._segments[0].start_offset

    def trim(self, bytes_to_free: int) -> int:
        """Drop the oldest whole segments (never the active one) until at least
        ``bytes_to_free`` of stored output are gone, or only the active one is left: as
        retention does, and readers are told as they are by it. Returns the bytes freed."""
        freed = 0
        while freed < bytes_to_free and len(self._segments) > 1:
            freed += self._segments[0].data_bytes
            self._drop_oldest_segment()
        if freed:
            self._wake()
        return freed

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading ------------------------------------------------------------------------

    def reader(
        self, offset: int = 0, *, follow: bool = False, max_chunk_bytes: int = 64 * 2**10
    ) -> OutputReader:
        """A reader of the output from ``offset`` on (history first, then, if ``follow``, live).

        ``offset`` may be beyond ``end_offset`` (a follower then waits for output to reach it).
        Output that retention dropped is reported by the reader, as a chunk with ``dropped``
        set; :meth:`OutputReader.select` narrows what it reads.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, not {offset}")
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be positive, not {max_chunk_bytes}")
        return OutputReader(self, offset, follow=follow, max_chunk_bytes=max_chunk_bytes)

    def _holds(self, seg: _Segment) -> bool:
        """Whether ``seg`` is still retained (drops take segments from the front only)."""
        return bool(self._segments) and self._segments[0].start_offset <= seg.start_offset

    def _offset_at_time(self, since_ns: int) -> tuple[int, bool]:
        """The offset of the first retained record read at or after ``since_ns`` and True, or
        ``end_offset`` and False if there is none (yet)."""
        if not self._closed and self._last_time_ns < since_ns:
            return self._end_offset, False  # a follower waiting for `since` to come
        segments = self._segments
        i = bisect.bisect_left(segments, since_ns, key=_first_time_key)
        # The answer is in the last segment that begins before `since`, or is the first
        # record of the next one.
        for seg in segments[max(i - 1, 0) : i + 1]:
            with seg.readable() as fd:
                found = seg.first_at_or_after(fd, since_ns)
            if found is not None:
                return found, True
        return self._end_offset, False

    def _after_since(self, reader: OutputReader, offset: int, since_ns: int) -> int:
        """Where ``reader``, at ``offset``, goes for its ``since``."""
        at, found = self._offset_at_time(since_ns)
        if found:
            reader._since_ns = None  # times only grow from here: nothing more to skip
        # A retained record older than `since` before `at` means every byte before it, the
        # dropped ones too, is older: skip them all. Otherwise what retention took may have
        # been newer, and the reader is told of the drop.
        return max(offset, at) if at > self._start_offset else offset

    def _last_lines_start(
        self, lines: int, streams: Collection[OutputStream]
    ) -> Generator[None, None, int | None]:
        """A scan for the offset where the last ``lines`` lines of ``streams`` retained now
        begin (a last line without a newline counts), run a step per ``next()``. It returns
        None if that is before what is retained (fewer lines are kept, and retention took the
        rest) or once retention takes a segment it still had to read."""
        end = self._end_offset
        segments = list(self._segments)  # now: segments appended later are not scanned

        def scan() -> Generator[None, None, int | None]:
            left = lines
            last_byte = True  # a newline there ends the last line and begins none
            for seg in reversed(segments):
                for checkpoint in range(len(seg.cp_offsets) - 1, -1, -1):
                    if not self._holds(seg):
                        return None
                    wanted: list[tuple[int, int, int]] = []  # (offset, file position, length)
                    with seg.readable() as fd:
                        for rec_offset, rec in seg.records(fd, checkpoint, to_next_checkpoint=True):
                            if rec_offset >= end:
                                break
                            if not rec.gap and rec.stream in streams:
                                wanted.append((rec_offset, rec.pos + rec.header_bytes, rec.length))
                    for rec_offset, data_pos, length in reversed(wanted):
                        high = length
                        while high > 0:
                            low = max(0, high - _TAIL_BLOCK_BYTES)
                            if not self._holds(seg):
                                return None
                            with seg.readable() as fd:
                                block = os.pread(fd, high - low, data_pos + low)
                            if len(block) != high - low:
                                raise RuntimeError(f"output segment {seg.path} is cut short")
                            k = len(block)
                            if last_byte:
                                last_byte = False
                                if block.endswith(b"\n"):
                                    k -= 1
                            while (i := block.rfind(b"\n", 0, k)) >= 0:
                                left -= 1
                                if left == 0:
                                    return rec_offset + low + i + 1
                                k = i
                            high = low
                            yield
                    yield
            # Fewer lines than asked: all of them, if the log's beginning is still here.
            return 0 if segments and segments[0].start_offset == 0 else None

        return scan()

    def _read(self, reader: OutputReader) -> OutputChunk | object | None:
        """The next chunk for ``reader`` (advancing it); _STEPPED if it only stepped over
        records it does not select; None if it is at the end."""
        offset = reader._offset
        if reader._since_ns is not None:
            offset = reader._offset = self._after_since(reader, offset, reader._since_ns)
        if offset < self._start_offset:
            chunk = OutputChunk(None, offset, b"", dropped=self._start_offset - offset)
            reader._offset = chunk.end
            return chunk
        if offset >= self._end_offset:
            return None
        tail, head = self._tail, self._tail_head
        if head < len(tail) and offset >= tail[head][0]:
            got = self._read_tail(offset, reader._max_chunk_bytes, reader._streams)
        else:
            got = self._read_disk(reader, offset)
        if isinstance(got, int):
            reader._offset = got
            return _STEPPED
        reader._offset = got.end
        return got

    def _read_tail(
        self, offset: int, max_bytes: int, streams: Collection[OutputStream] | None
    ) -> OutputChunk | int:
        tail = self._tail
        i = bisect.bisect_right(tail, offset, lo=self._tail_head, key=_tail_offset) - 1
        rec_offset, stream, data, time_ns = tail[i]
        if streams is not None and stream not in streams:
            # Step over the other stream's records: where the reader goes next.
            limit = min(len(tail), i + _SKIP_RECORDS)
            i += 1
            while i < limit and tail[i][1] not in streams:
                i += 1
            return tail[i][0] if i < len(tail) else self._end_offset
        skip = offset - rec_offset
        if isinstance(data, int):
            return OutputChunk(stream, offset, b"", lost=data - skip, time_ns=time_ns)
        if skip == 0 and len(data) <= max_bytes:
            first = data  # the common case: no copy at all
        else:
            first = data[skip : skip + max_bytes]
        size = len(first)
        parts = None
        i += 1
        while (
            size < max_bytes
            and i < len(tail)
            and tail[i][1] is stream
            and _joins(time_ns, tail[i][3])
        ):
            more = tail[i][2]
            if isinstance(more, int):
                break  # a gap is a chunk of its own
            if len(more) > max_bytes - size:
                more = more[: max_bytes - size]
            if parts is None:
                parts = [first]
            parts.append(more)
            size += len(more)
            i += 1
        data = first if parts is None else b"".join(parts)
        return OutputChunk(stream, offset, data, time_ns=time_ns)

    def _read_disk(self, reader: OutputReader, offset: int) -> OutputChunk | int:
        seg = self._segments[bisect.bisect_right(self._segment_starts, offset) - 1]
        streams = reader._streams
        with seg.readable() as fd:
            if reader._disk_segment is seg and reader._disk_offset == offset:
                at = reader._disk_cursor
            else:
                at = seg.locate(fd, offset)
            skipped = 0
            if streams is not None:
                if not at.left:
                    skipped, at = _skip_records(fd, at.pos, seg.file_bytes, streams)
                elif at.stream not in streams:  # the rest of a record of the other stream
                    skipped = at.left
                    at = _Cursor(at.pos if at.gap else at.pos + at.left)
            if skipped:
                reader._disk_segment, reader._disk_offset = seg, offset + skipped
                reader._disk_cursor = at
                return offset + skipped
            max_bytes = reader._max_chunk_bytes
            if not at.gap and at.left >= max_bytes:
                # A whole chunk inside the current record: read exactly it.
                data = os.pread(fd, max_bytes, at.pos)
                lost, stream, time_ns = 0, at.stream, at.time
                at = _Cursor(at.pos + len(data), at.left - len(data), stream, time=time_ns)
            else:
                data, lost, stream, time_ns, at = _read_records(fd, at, seg.file_bytes, max_bytes)
        if not (data or lost) or stream is None:
            raise RuntimeError(f"output segment {seg.path} is shorter than its index")
        chunk = OutputChunk(stream, offset, data, lost, time_ns=time_ns)
        reader._disk_segment = seg
        reader._disk_offset = chunk.end
        reader._disk_cursor = at
        return chunk


# What OutputLog._read returns when a reader only stepped over records it does not select.
_STEPPED: Final = object()


def _held(data: bytes | int) -> int:
    return 0 if isinstance(data, int) else len(data)


def _tail_offset(record: tuple[int, OutputStream, bytes | int, int | None]) -> int:
    return record[0]


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class OutputReader:
    """An async iterator of :class:`OutputChunk` over an :class:`OutputLog`, from an offset.

    A class rather than an async generator so that abandoning it mid-way needs no
    finalisation (Trio cannot finalise async generators promptly). It is only a cursor:
    ``offset`` is the next byte it will deliver, and where a caller may resume.

    If the cursor is before the log's ``start_offset`` when ``__anext__`` looks, the chunk is
    a drop (``dropped`` bytes, no stream, no data) and the reader goes on from ``start_offset``.
    Without ``follow`` it stops once caught up; with ``follow`` it waits for more output and
    stops once the log is closed and everything has been delivered.
    """

    __slots__ = (
        "_log",
        "_offset",
        "_follow",
        "_max_chunk_bytes",
        "_done",
        "_disk_segment",
        "_disk_offset",
        "_disk_cursor",
        "_streams",
        "_since_ns",
        "_seek",
    )

    def __init__(self, log: OutputLog, offset: int, *, follow: bool, max_chunk_bytes: int) -> None:
        self._log = log
        self._offset = offset
        self._follow = follow
        self._max_chunk_bytes = max_chunk_bytes
        self._done = False
        # Where the reader's offset is on disk, valid while _disk_offset == _offset and
        # _disk_segment is still in the log: saves a scan from a checkpoint per chunk.
        self._disk_segment: _Segment | None = None
        self._disk_offset = -1
        self._disk_cursor = _Cursor(0)
        self._streams: frozenset[OutputStream] | None = None  # None: both
        self._since_ns: int | None = None  # until a record at or after it is found
        self._seek: Generator[None, None, int | None] | None = None  # a tail_lines scan

    @property
    def offset(self) -> int:
        """The offset of the next byte this reader will deliver."""
        return self._offset

    def select(
        self,
        *,
        streams: Collection[OutputStream] | None = None,
        since_ns: int | None = None,
        tail_lines: int = 0,
    ) -> OutputReader:
        """Narrow this reader (before its first chunk); returns it.

        ``streams``: only their records (None or both: everything); offsets stay the combined
        ones. ``since_ns``: begin at the first record read at or after that time (ns since the
        epoch; records with no time never qualify); a follower whose ``since`` has not come
        yet waits for it. ``tail_lines`` (> 0): begin at the start of the last that many lines
        of the selected streams retained now. The reader begins at the latest of these and its
        offset; where that is before what is retained, it yields a drop first (see the module's
        "Selecting").
        """
        if streams is not None:
            chosen = frozenset(streams)
            if not chosen or not all(isinstance(s, OutputStream) for s in chosen):
                raise ValueError(f"streams must be OutputStreams, at least one: {streams!r}")
            self._streams = None if len(chosen) == len(OutputStream) else chosen
        if since_ns is not None:
            self._since_ns = max(since_ns, 0)
        if tail_lines < 0:
            raise ValueError(f"tail_lines must not be negative, not {tail_lines}")
        if tail_lines:
            self._seek = self._log._last_lines_start(tail_lines, self._streams or OutputStream)
        return self

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> OutputChunk:
        # Always a checkpoint (Trio convention), so a reader of a long history neither
        # starves other tasks nor ignores cancellation; another after each bounded step that
        # delivers nothing (a tail_lines scan, stepping over the other stream).
        await trio.lowlevel.checkpoint()
        log = self._log
        while not self._done:
            if self._seek is not None:
                try:
                    next(self._seek)
                except StopIteration as scanned:
                    self._seek = None
                    if scanned.value is not None:
                        self._offset = max(self._offset, scanned.value)
                else:
                    await trio.lowlevel.checkpoint()
                continue
            changed = log._changed  # before looking, so no wake-up can be missed
            chunk = log._read(self)
            if chunk is _STEPPED:
                await trio.lowlevel.checkpoint()
                continue
            if chunk is not None:
                return chunk  # type: ignore[return-value]
            if not self._follow or log.closed:
                self._done = True
                break
            await changed.wait()
        raise StopAsyncIteration
