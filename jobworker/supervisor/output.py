"""The per-job output log: stdout and stderr as one ordered, bounded, followable log.

Theory of operation
-------------------
Two pump tasks call :meth:`OutputLog.append` with whatever they read from the job's pipes. Each
append becomes one or more *records*: ``(stream, data)`` at a byte *offset* in the job's combined
output (offsets count every byte ever appended, from 0).

**On disk.** Records are appended to segment files ``<start offset, 20 digits>.seg`` under the
log's directory. A record is a 5-byte header — the stream tag (1 = stdout, 2 = stderr) and the
data length as a big-endian u32 — followed by the data; nothing else is in the file. A segment is
sealed when it holds exactly ``segment_bytes`` of output: an append that crosses the boundary is
split into two records, so every sealed segment starts at a multiple of ``segment_bytes`` (as
long as nothing was lost).

**Losses.** Output that cannot be written (a full disk) is never dropped silently: the log
records a *gap*, a header with tag 3 (stdout) or 4 (stderr) whose length is the number of bytes
lost and which has no data. Offsets jump over it, and a reader gets a chunk with ``lost`` set
instead of data. A gap is written before anything that follows it, once the disk takes writes
again: no data is ever on disk after a loss that is not. If it cannot be written by the time the
log closes, it is kept in memory (readers of this log still see it; the log on disk ends there).

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
disk also holds 5 header bytes per record.

**Index.** Per segment: its start offset and a sparse list of checkpoints ``(offset, file
position)`` at record boundaries, one each time ``_CHECKPOINT_INTERVAL_BYTES`` of file has been
written since the last. The index is O(retained file bytes / 64 KiB), not O(records).

**Tail.** Memory holds the most recent records (at most ``tail_bytes`` of data and
``_TAIL_MAX_RECORDS`` records), referencing the appended ``bytes`` objects themselves (a copy is
made only for the two halves of an append split at a segment boundary).

**Readers.** A reader is a cursor: an offset plus, when it last read from disk, where that offset
is in which segment file. Each ``__anext__`` checks, at that moment, that the cursor is still
retained (else :class:`OutputDropped`), then serves from the tail if the cursor is in it, else
from disk: find the segment (bisect on start offsets), then the record (bisect on checkpoints and
scan forward, unless the remembered position already matches), then ``os.pread`` up to
``max_chunk_bytes`` of data, coalescing following records of the same stream. A caught-up
follower waits on ``_changed``, a :class:`trio.Event` that every append, ``close()`` and
``remove()`` set and replace. Readers hold no fds and no buffers of their own, so a stalled or
abandoned reader costs its owner nothing but a small object, and delays nobody else.

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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import trio

from jobworker.supervisor.errors import OutputDropped

__all__ = [
    "OutputChunk",
    "OutputLog",
    "OutputLogFootprint",
    "OutputReader",
    "OutputStream",
]


class OutputStream(enum.Enum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: OutputStream
    offset: int  # offset of data[0] in the job's combined output
    data: bytes
    # Bytes of `stream` lost at `offset` (the disk was full): then `data` is empty, and the next
    # chunk starts at offset + lost.
    lost: int = 0

    @property
    def end(self) -> int:
        return self.offset + (self.lost or len(self.data))


@dataclass(frozen=True, slots=True)
class OutputLogFootprint:
    """What an :class:`OutputLog` holds in memory, for tests and metrics (see ``footprint()``)."""

    tail_records: int
    tail_data_bytes: int
    segments: int  # == open fds while the log is open; none once closed
    checkpoints: int  # index entries, over all segments


_HEADER: Final = struct.Struct(">BI")  # stream tag, data length
_HEADER_BYTES: Final = _HEADER.size
_MAX_RECORD_BYTES: Final = 2**32 - 1
_STREAM_BY_TAG: Final = {s.value: s for s in OutputStream}
# A gap's tag: the stream's, plus this.
_GAP_TAG: Final = 2

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

_OPEN_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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
    )

    def __init__(self, directory: str, start_offset: int, *, create: bool = True) -> None:
        self.start_offset = start_offset
        self.path = os.path.join(directory, f"{start_offset:020d}.seg")
        self.fd = os.open(self.path, _OPEN_FLAGS, 0o600) if create else -1
        self.data_bytes = 0  # output stored in the file
        self.span = 0  # offsets covered: stored output and gaps
        self.file_bytes = 0
        # Checkpoints: record boundaries as (output offset, file position); always (start, 0).
        self.cp_offsets = [start_offset]
        self.cp_positions = [0]

    def write_record(self, stream: OutputStream, data: memoryview | bytes) -> None:
        self._write(_HEADER.pack(stream.value, len(data)), data)
        self.data_bytes += len(data)
        self.span += len(data)

    def write_gap(self, stream: OutputStream, lost: int) -> None:
        self._write(_HEADER.pack(stream.value + _GAP_TAG, lost), b"")
        self.span += lost

    def _write(self, header: bytes, data: memoryview | bytes) -> None:
        pos = self.file_bytes
        if pos - self.cp_positions[-1] >= _CHECKPOINT_INTERVAL_BYTES:
            self.cp_offsets.append(self.start_offset + self.span)
            self.cp_positions.append(pos)
        try:
            _pwrite_all(self.fd, [header, data] if data else [header], pos)
        except BaseException:
            # Keep the file a sequence of whole records (e.g. after ENOSPC), then re-raise.
            os.ftruncate(self.fd, pos)
            raise
        self.file_bytes = pos + _HEADER_BYTES + len(data)

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
            for pos, _, gap, length in _walk(fd, 0, _HEADERS_BLOCK_BYTES):
                stored = 0 if gap else length
                if pos + _HEADER_BYTES + stored > size:
                    break  # the partial last record
                if pos - seg.cp_positions[-1] >= _CHECKPOINT_INTERVAL_BYTES:
                    seg.cp_offsets.append(seg.start_offset + seg.span)
                    seg.cp_positions.append(pos)
                end = pos + _HEADER_BYTES + stored
                seg.data_bytes += stored
                seg.span += length
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

    def locate(self, fd: int, offset: int) -> _Cursor:
        """Find ``offset`` (which this segment holds) in the file: at the header of the record
        starting there, or inside a record (of data, or a gap) with what is left of it."""
        i = bisect.bisect_right(self.cp_offsets, offset) - 1
        rec_offset = self.cp_offsets[i]
        for pos, stream, gap, length in _walk(fd, self.cp_positions[i]):
            if rec_offset + length > offset:
                skip = offset - rec_offset
                if skip == 0:
                    return _Cursor(pos)
                if gap:
                    return _Cursor(pos + _HEADER_BYTES, length - skip, stream, gap=True)
                return _Cursor(pos + _HEADER_BYTES + skip, length - skip, stream)
            rec_offset += length
        raise RuntimeError(f"output segment {self.path} is shorter than its index")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _walk(
    fd: int, pos: int, block_bytes: int = _SCAN_BLOCK_BYTES
) -> Iterator[tuple[int, OutputStream, bool, int]]:
    """The records of a segment file from the header at ``pos`` on, as (position, stream,
    whether a gap, length), to the end of the file. One pread serves every header in a block
    (a header per pread costs a syscall per record: seconds for a log of short lines), and a
    record longer than the block costs one more. The last record may be cut short by the
    file's end: callers that care check."""
    while True:
        block = os.pread(fd, block_bytes, pos)
        if len(block) < _HEADER_BYTES:
            return  # the end, or a header a crash cut short
        i = 0
        while i + _HEADER_BYTES <= len(block):
            tag, length = _HEADER.unpack_from(block, i)
            stream, gap = _parse_tag(tag)
            yield pos + i, stream, gap, length
            i += _HEADER_BYTES + (0 if gap else length)
        pos += i  # the next header, possibly beyond this block


def _parse_tag(tag: int) -> tuple[OutputStream, bool]:
    """(stream, whether the record is a gap)."""
    gap = tag > _GAP_TAG
    try:
        return _STREAM_BY_TAG[tag - _GAP_TAG if gap else tag], gap
    except KeyError:
        raise RuntimeError(f"corrupt output segment: unknown stream tag {tag}") from None


@dataclass(slots=True)
class _Cursor:
    """Where a reader is in a segment file: at a header (``left == 0``), or inside a record
    of ``stream`` with ``left`` bytes of it to go (for a gap, ``pos`` is after its header)."""

    pos: int
    left: int = 0
    stream: OutputStream | None = None
    gap: bool = False


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


def _read_records(
    fd: int, at: _Cursor, end_pos: int, max_bytes: int
) -> tuple[bytes, int, OutputStream | None, _Cursor]:
    """Read up to ``max_bytes`` of data of one stream from ``at`` on, or the gap there.

    Returns the data (or b""), the bytes lost (a gap), their stream, and where that leaves the
    reader. A chunk never mixes streams, nor data with a gap.
    """
    if at.gap:  # inside a gap: the rest of it
        return b"", at.left, at.stream, _Cursor(at.pos)
    pos, rec_left = at.pos, at.left
    stream = at.stream if rec_left else None  # at a header: the next record sets the stream
    parts: list[memoryview] = []
    size = 0
    while size < max_bytes and pos < end_pos:
        # Enough for the data still wanted plus a header; more when records are tiny, so
        # that coalescing 1-byte records does not cost a syscall each.
        want = max(max_bytes - size + _HEADER_BYTES, _MIN_READ_BYTES)
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
                record_stream, gap = _parse_tag(tag)
                if gap:
                    if not parts:  # the gap is the chunk
                        return b"", length, record_stream, _Cursor(pos + i + _HEADER_BYTES)
                    stop = True
                    break
                if stream is not None and record_stream is not stream:
                    stop = True
                    break
                stream, rec_left = record_stream, length
                i += _HEADER_BYTES
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
    return data, 0, stream, _Cursor(pos, rec_left, stream if rec_left else None)


def _close_segments(segments: list[_Segment]) -> None:
    for seg in segments:
        seg.close()


class OutputLog:
    """One job's stdout and stderr, as one ordered log that any number of readers follow.

    Lifecycle: ``append`` until ``close()``; readers drain and end. ``remove()`` (which the
    owner must call: it is what releases the fds and the files) also drops everything retained:
    afterwards ``start_offset == end_offset``, so a reader that had not delivered all output
    raises :class:`OutputDropped` and one that had ends, like after any other drop.

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

        self._start_offset = 0
        self._end_offset = 0
        self._stored_bytes = 0  # output in the retained segment files (gaps are not stored)
        self._closed = False
        self._removed = False
        self._changed = trio.Event()
        # Losses: bytes per stream not yet recorded as a gap (the disk refused it too), and
        # every byte ever lost, with the error that lost the first.
        self._pending_loss = dict.fromkeys(OutputStream, 0)
        self._lost_bytes = 0
        self.loss_error: OSError | None = None
        # Tail: (offset, stream, data or bytes lost) records in order; entries before
        # _tail_head are evicted (compacted away in batches, so eviction is O(1) amortised).
        self._tail: list[tuple[int, OutputStream, bytes | int]] = []
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
        """Add ``data`` from ``stream`` at ``end_offset``. Never awaits nor waits for readers.

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
        done = 0
        try:
            # Nothing may be written after a loss that is not on disk yet.
            self._write_pending_gaps()
            view = memoryview(data)
            while done < len(data):
                seg = self._segments[-1]
                if seg.data_bytes >= self._segment_bytes:
                    seg = self._roll()
                n = min(len(data) - done, self._segment_bytes - seg.data_bytes, _MAX_RECORD_BYTES)
                seg.write_record(stream, view[done : done + n])
                self._tail_append(
                    self._end_offset, stream, data if n == len(data) else data[done : done + n]
                )
                self._end_offset += n
                self._stored_bytes += n
                done += n
            return True
        except OSError as exc:
            self._pending_loss[stream] += len(data) - done
            self._lost_bytes += len(data) - done
            self.loss_error = self.loss_error or exc
            return False
        finally:
            self._drop_over_retention()
            self._wake()

    def _write_pending_gaps(self) -> None:
        for stream, lost in self._pending_loss.items():
            if lost:
                seg = self._segments[-1]
                if seg.data_bytes >= self._segment_bytes:
                    seg = self._roll()
                seg.write_gap(stream, lost)
                self._record_gap(stream, lost)

    def _record_gap(self, stream: OutputStream, lost: int) -> None:
        self._pending_loss[stream] = 0
        self._tail_append(self._end_offset, stream, lost)
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
                        self._record_gap(stream, lost)
        self._closed = True
        for seg in self._segments:
            seg.close()  # reads reopen per call from now on (see _Segment.readable)
        self._wake()

    def remove(self) -> None:
        """Close, drop all output, close the fds, delete the files and the directory.

        Idempotent. Readers then behave as after a drop of everything: one whose cursor is
        before ``end_offset`` raises :class:`OutputDropped`; one at the end stops.
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

    def _tail_append(self, offset: int, stream: OutputStream, data: bytes | int) -> None:
        # An int is a gap of that many bytes: it holds no memory to speak of. The newest gap
        # always stays: one kept in memory only (no file has it) must not be evicted.
        tail = self._tail
        tail.append((offset, stream, data))
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
        Dropped output is reported by the reader, as :class:`OutputDropped`, not here.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, not {offset}")
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be positive, not {max_chunk_bytes}")
        return OutputReader(self, offset, follow=follow, max_chunk_bytes=max_chunk_bytes)

    def _read(self, reader: OutputReader) -> OutputChunk | None:
        """The next chunk for ``reader`` (advancing it), or None if it is at the end."""
        offset = reader._offset
        if offset < self._start_offset:
            raise OutputDropped(offset, self._start_offset)
        if offset >= self._end_offset:
            return None
        tail, head = self._tail, self._tail_head
        if head < len(tail) and offset >= tail[head][0]:
            chunk = self._read_tail(offset, reader._max_chunk_bytes)
        else:
            chunk = self._read_disk(reader, offset)
        reader._offset = chunk.end
        return chunk

    def _read_tail(self, offset: int, max_bytes: int) -> OutputChunk:
        tail = self._tail
        i = bisect.bisect_right(tail, offset, lo=self._tail_head, key=_tail_offset) - 1
        rec_offset, stream, data = tail[i]
        skip = offset - rec_offset
        if isinstance(data, int):
            return OutputChunk(stream, offset, b"", lost=data - skip)
        if skip == 0 and len(data) <= max_bytes:
            first = data  # the common case: no copy at all
        else:
            first = data[skip : skip + max_bytes]
        size = len(first)
        parts = None
        i += 1
        while size < max_bytes and i < len(tail) and tail[i][1] is stream:
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
        return OutputChunk(stream, offset, first if parts is None else b"".join(parts))

    def _read_disk(self, reader: OutputReader, offset: int) -> OutputChunk:
        seg = self._segments[bisect.bisect_right(self._segment_starts, offset) - 1]
        with seg.readable() as fd:
            if reader._disk_segment is seg and reader._disk_offset == offset:
                at = reader._disk_cursor
            else:
                at = seg.locate(fd, offset)
            max_bytes = reader._max_chunk_bytes
            if not at.gap and at.left >= max_bytes:
                # A whole chunk inside the current record: read exactly it.
                data = os.pread(fd, max_bytes, at.pos)
                lost, stream = 0, at.stream
                at = _Cursor(at.pos + len(data), at.left - len(data), stream)
            else:
                data, lost, stream, at = _read_records(fd, at, seg.file_bytes, max_bytes)
        if not (data or lost) or stream is None:
            raise RuntimeError(f"output segment {seg.path} is shorter than its index")
        chunk = OutputChunk(stream, offset, data, lost)
        reader._disk_segment = seg
        reader._disk_offset = chunk.end
        reader._disk_cursor = at
        return chunk


def _held(data: bytes | int) -> int:
    return 0 if isinstance(data, int) else len(data)


def _tail_offset(record: tuple[int, OutputStream, bytes | int]) -> int:
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

    ``__anext__`` raises :class:`OutputDropped` if the cursor is before the log's
    ``start_offset`` at that moment (the reader stays where it is; raising again if retried).
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

    @property
    def offset(self) -> int:
        """The offset of the next byte this reader will deliver."""
        return self._offset

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> OutputChunk:
        # Always a checkpoint (Trio convention), so a reader of a long history neither
        # starves other tasks nor ignores cancellation.
        await trio.lowlevel.checkpoint()
        log = self._log
        while not self._done:
            changed = log._changed  # before looking, so no wake-up can be missed
            chunk = log._read(self)
            if chunk is not None:
                return chunk
            if not self._follow or log.closed:
                self._done = True
                break
            await changed.wait()
        raise StopAsyncIteration
