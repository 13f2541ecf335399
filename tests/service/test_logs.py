"""GetJobLogs' selection over the real transport: tail_lines, since, streams, chunk times and
drops, for a running job and for one read back from its files; and what is refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.purgatory import GrpcError, Status
from jobworker.service import SERVICE_NAME, convert
from jobworker.supervisor import OutputChunk, OutputStream
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import CALL_TIMEOUT_S, RETENTION_BYTES, Served, fifo, release

pytestmark = pytest.mark.cgroups

OUT, ERR = pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR


async def get_logs(client, job_id: str, **fields) -> list[pb.GetJobLogsResponse]:
    request = pb.GetJobLogsRequest(job_id=job_id, **fields)
    async with client.channel.server_stream(
        f"/{SERVICE_NAME}/GetJobLogs", request, pb.GetJobLogsResponse, timeout_s=CALL_TIMEOUT_S
    ) as stream:
        return [chunk async for chunk in stream]


def text(chunks: list[pb.GetJobLogsResponse], stream: int | None = None) -> bytes:
    return b"".join(c.data for c in chunks if stream is None or c.stream == stream)


async def ended_and_recorded(served: Served, job_id: str) -> None:
    await served.client("alice").wait_ended(job_id)
    await served.service.recorded(job_id)  # from now on read back from its files


BOTH = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"


@pytest.mark.parametrize("where", ["live", "stored"])
async def test_tail_lines_of_one_stream_or_both(served: Served, where: str) -> None:
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", BOTH)
    if where == "stored":
        await ended_and_recorded(served, job_id)
    else:
        await alice.wait_ended(job_id)
    assert text(await get_logs(alice, job_id, tail_lines=2, streams=[OUT])) == b"out4\nout5\n"
    chunks = await get_logs(alice, job_id, tail_lines=1, streams=[ERR])
    assert [(c.stream, c.data) for c in chunks] == [(ERR, b"err5\n")]
    # Both streams: the last lines of the two as the server read them (the order the pumps
    # read the two pipes in is the job's and the scheduler's).
    everything = await get_logs(alice, job_id)
    both = await get_logs(alice, job_id, tail_lines=4)
    assert text(both).splitlines() == text(everything).splitlines()[-4:]
    # Offsets stay the job's combined ones: what one stream skips, the other had.
    at = {c.offset + i: (c.stream, byte) for c in everything for i, byte in enumerate(c.data)}
    errs = await get_logs(alice, job_id, streams=[ERR])
    assert [(c.offset + i, (c.stream, b)) for c in errs for i, b in enumerate(c.data)] == [
        (offset, sb) for offset, sb in sorted(at.items()) if sb[0] == ERR
    ]
    assert text(await get_logs(alice, job_id, streams=[OUT, ERR])) == text(everything)


async def test_a_follower_with_tail_gets_the_last_lines_then_what_comes(
    served: Served, shared_path: Path
) -> None:
    alice = served.client("alice")
    go = fifo(shared_path)
    job_id = await alice.start("sh", "-c", f"seq 1 1000; cat {go}; echo after")
    async with alice.logs_stream(job_id, follow=True) as stream:  # until seq's output is in
        seen = b""
        while not seen.endswith(b"\n1000\n"):
            seen += (await stream.__anext__()).data
    request = pb.GetJobLogsRequest(job_id=job_id, follow=True, tail_lines=3)
    async with alice.channel.server_stream(
        f"/{SERVICE_NAME}/GetJobLogs", request, pb.GetJobLogsResponse, timeout_s=CALL_TIMEOUT_S
    ) as stream:
        got = b""
        while got != b"998\n999\n1000\n":
            got += (await stream.__anext__()).data
        await release(go)
        rest = [chunk async for chunk in stream]
    assert text(rest) == b"after\n"


async def test_chunks_carry_when_they_were_read_and_since_selects_by_it(
    served: Served, shared_path: Path
) -> None:
    alice = served.client("alice")
    go = fifo(shared_path)
    before_ns = time.time_ns()
    job_id = await alice.start("sh", "-c", f"echo early; cat {go}; echo late >&2")
    async with alice.logs_stream(job_id, follow=True) as stream:
        early = await stream.__anext__()
        # Taken after the server stamped "early" and before "late" is written: between them.
        between_ns = time.time_ns()
        await release(go)
        [late] = [chunk async for chunk in stream]
    after_ns = time.time_ns()
    assert (early.data, late.data) == (b"early\n", b"late\n")
    assert before_ns <= early.read_time.ToNanoseconds() <= between_ns
    assert between_ns <= late.read_time.ToNanoseconds() <= after_ns

    since = Timestamp()
    since.FromNanoseconds(between_ns)
    for _ in ("live", "stored"):
        chunks = await get_logs(alice, job_id, since_time=since)
        assert [(c.offset, c.data, c.read_time) for c in chunks] == [(6, b"late\n", late.read_time)]
        assert await get_logs(alice, job_id, since_time=since, streams=[OUT]) == []
        since_early = await get_logs(alice, job_id, since_time=early.read_time)
        assert text(since_early) == b"early\nlate\n"
        await ended_and_recorded(served, job_id)


async def test_retention_drops_with_tail_and_since(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start("seq", "1", "100000")  # 588 895 bytes: more than is kept
    await ended_and_recorded(served, job_id)
    end = 588_895
    last = await get_logs(alice, job_id, tail_lines=10)
    assert text(last) == b"".join(b"%d\n" % i for i in range(99_991, 100_001))
    assert not any(c.dropped for c in last)
    # More lines than are kept: the drop first (stream unspecified), then all that is kept.
    first, *rest = await get_logs(alice, job_id, tail_lines=100_000)
    assert (first.offset, first.stream, first.data) == (0, pb.LOG_STREAM_UNSPECIFIED, b"")
    assert 0 < first.dropped and end - first.dropped <= RETENTION_BYTES
    assert rest[0].offset == first.dropped and len(text(rest)) == end - first.dropped
    # Since a time before anything was kept: the same drop.
    since = Timestamp()
    since.FromNanoseconds(0)
    assert (await get_logs(alice, job_id, since_time=since))[0] == first


@pytest.mark.parametrize(
    "fields",
    [
        {"streams": [pb.LOG_STREAM_UNSPECIFIED]},
        {"streams": [OUT, 7]},
        {"since_time": Timestamp(seconds=0, nanos=-1)},
        {"since_time": Timestamp(seconds=0, nanos=10**9)},
        {"since_time": Timestamp(seconds=253_402_300_800)},  # year 10000
    ],
    ids=["unspecified-stream", "unknown-stream", "negative-nanos", "nanos-overflow", "year-10000"],
)
async def test_a_bad_selection_is_invalid_argument(served: Served, fields) -> None:
    alice = served.client("alice")
    job_id = await alice.start("echo", "x")
    with pytest.raises(GrpcError) as caught:
        await get_logs(alice, job_id, **fields)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "since" in caught.value.message or "stream" in caught.value.message


def test_drops_and_times_round_trip_through_the_message() -> None:
    drop = OutputChunk(None, 10, b"", dropped=4096)
    message = convert.chunk_to_proto(drop)
    assert (message.stream, message.dropped, message.HasField("read_time")) == (
        pb.LOG_STREAM_UNSPECIFIED,
        4096,
        False,
    )
    assert convert.chunk_from_proto(message) == drop
    timed = OutputChunk(OutputStream.STDERR, 5, b"x", time_ns=1_800_000_000_123_456_789)
    message = convert.chunk_to_proto(timed)
    assert (message.read_time.seconds, message.read_time.nanos) == (1_800_000_000, 123_456_789)
    assert convert.chunk_from_proto(message).time_ns == timed.time_ns
