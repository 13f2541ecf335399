"""What a GetJobLogs request selects — streams, a time, a number of last lines — checked once,
before any job is looked up, and applied to an output reader."""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.supervisor import OutputChunk, OutputStream
from jobworker.supervisor.output import OutputReader
from jobworker.v1 import jobworker_pb2 as pb

from .convert import STREAM_FROM_PROTO
from .errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class LogSelection:
    streams: frozenset[OutputStream] | None  # None: both
    since_ns: int | None
    tail_lines: int

    def apply(self, reader: OutputReader) -> OutputReader:
        return reader.select(
            streams=self.streams, since_ns=self.since_ns, tail_lines=self.tail_lines
        )


def selection_of(request: pb.GetJobLogsRequest) -> LogSelection:
    """The request's selection, or InvalidRequest for a stream that is not one or a `since_time`
    that is not a valid Timestamp."""
    streams = None
    if request.streams:
        unknown = [value for value in request.streams if value not in STREAM_FROM_PROTO]
        if unknown:
            raise InvalidRequest(
                f"streams: {unknown[0]} is not a stream"
                " (LOG_STREAM_STDOUT = 1, LOG_STREAM_STDERR = 2)"
            )
        streams = frozenset(STREAM_FROM_PROTO[value] for value in request.streams)
    since_ns = None
    if request.HasField("since_time"):
        since = request.since_time
        try:
            since_ns = since.ToNanoseconds()  # checks Timestamp's own range
        except ValueError:
            raise InvalidRequest(
                f"since_time: not a valid Timestamp (seconds {since.seconds}, nanos {since.nanos}):"
                " years 1 to 9999, nanos 0 to 999999999"
            ) from None
    return LogSelection(streams, since_ns, request.tail_lines)


def all_dropped(offset: int, end: int) -> list[OutputChunk]:
    """What a reader from ``offset`` is told of output that is gone up to ``end``: one drop, or
    nothing if there was nothing there."""
    return [OutputChunk(None, offset, b"", dropped=end - offset)] if offset < end else []
