"""No single identity may exhaust the server: running jobs and open log streams are capped in
all and per identity, and limits a job asks for are checked against what the host has. Through
the real transport (mutual TLS on 127.0.0.1) and a real Supervisor, as in test_handlers."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from google.protobuf.duration_pb2 import Duration

from jobworker.purgatory import GrpcError, Status
from jobworker.service import Identity, JobStore
from jobworker.service.store import Record
from jobworker.supervisor import LimitPolicy
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import DEFAULT_LIMITS, Certs, Client, Served, serve

pytestmark = pytest.mark.cgroups

SLEEP = ("sleep", "60")  # dies at once on SIGTERM
# Says it runs (so a follower knows its stream is being served), then waits to be stopped.
READY = ("sh", "-c", "echo ready; exec sleep 60")
MAX_JOBS, MAX_JOBS_PER_USER = 3, 2
MAX_STREAMS, MAX_STREAMS_PER_USER = 3, 2
NOW = Duration(seconds=0)


async def raises(status: Status, call) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        await call
    assert caught.value.status is status, caught.value
    return caught.value


@pytest.fixture
async def fair(tmp_path: Path, certs: Certs) -> AsyncIterator[Served]:
    async with serve(
        tmp_path,
        certs,
        max_running_jobs=MAX_JOBS,
        max_running_jobs_per_user=MAX_JOBS_PER_USER,
        max_log_streams=MAX_STREAMS,
        max_log_streams_per_user=MAX_STREAMS_PER_USER,
    ) as served:
        yield served


# --- running jobs -------------------------------------------------------------------------------


async def test_a_user_at_its_cap_is_refused_while_others_still_start(fair: Served) -> None:
    alice, bob, adam = fair.client("alice"), fair.client("bob"), fair.client("adam")
    mine = [await alice.start(*SLEEP) for _ in range(MAX_JOBS_PER_USER)]
    error = await raises(Status.RESOURCE_EXHAUSTED, alice.start(*SLEEP))
    assert error.message.startswith(
        f"you have {MAX_JOBS_PER_USER} jobs running, the most per user (--max-jobs-per-user)"
    )
    await bob.start(*SLEEP)  # alice's cap is hers alone
    # Now the server is full: adam has no job, so it is the cap in all that refuses him.
    error = await raises(Status.RESOURCE_EXHAUSTED, adam.start(*SLEEP))
    assert error.message.startswith(
        f"the server already runs its maximum of {MAX_JOBS} jobs at once (--max-jobs)"
    )
    assert (fair.service.running_jobs, fair.service.running_jobs_of("alice")) == (3, 2)
    # A job that ended gives its slot back, to its owner.
    await alice.stop(mine[0], grace_period=NOW)
    await fair.service.recorded(mine[0])
    assert fair.service.running_jobs_of("alice") == 1
    await alice.start(*SLEEP)
    await raises(Status.RESOURCE_EXHAUSTED, alice.start(*SLEEP))


async def test_the_per_user_cap_binds_admins_too(fair: Served) -> None:
    adam = fair.client("adam")
    for _ in range(MAX_JOBS_PER_USER):
        await adam.start(*SLEEP)
    error = await raises(Status.RESOURCE_EXHAUSTED, adam.start(*SLEEP))
    assert "(--max-jobs-per-user)" in error.message
    await fair.client("alice").start(*SLEEP)  # and protects the others from them


async def test_starts_that_fail_leave_no_slot_taken(fair: Served) -> None:
    alice = fair.client("alice")
    for _ in range(MAX_JOBS_PER_USER + 1):
        # Refused by the Supervisor after StartJob counted the job and recorded it.
        await raises(Status.INVALID_ARGUMENT, alice.start("echo", "a\0b"))
        # Refused before anything was counted.
        await raises(Status.INVALID_ARGUMENT, alice.start("true", limits=pb.Limits(cpu=1e300)))
    assert (fair.service.running_jobs, fair.service.running_jobs_of("alice")) == (0, 0)
    # Jobs that could not run end in ERROR at once, and give their slot back then.
    failed = [await alice.start("/nonexistent/command") for _ in range(MAX_JOBS_PER_USER)]
    for job_id in failed:
        await fair.service.recorded(job_id)
        assert (await alice.status(job_id)).state == pb.JOB_STATE_ERROR
    assert fair.service.running_jobs == 0
    for _ in range(MAX_JOBS_PER_USER):
        await alice.start(*SLEEP)


async def test_concurrent_starts_of_one_user_count_each_other(fair: Served) -> None:
    alice = fair.client("alice")
    outcomes: list[str] = []

    async def start() -> None:
        try:
            await alice.start(*SLEEP)
            outcomes.append("started")
        except GrpcError as exc:
            outcomes.append(exc.status.name)

    async with trio.open_nursery() as nursery:
        for _ in range(MAX_JOBS_PER_USER + 2):
            nursery.start_soon(start)
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * 2 + ["started"] * MAX_JOBS_PER_USER
    assert fair.service.running_jobs_of("alice") == MAX_JOBS_PER_USER


# --- log streams --------------------------------------------------------------------------------


async def follow(stack: AsyncExitStack, client: Client, job_id: str):
    """A follower of `job_id` whose handler is surely running (and counted): it has sent the
    job's first line."""
    stream = await stack.enter_async_context(client.logs_stream(job_id, follow=True))
    first = await stream.__anext__()
    assert first.data == b"ready\n"
    return stream


async def test_log_streams_are_capped_per_user_and_in_all(fair: Served) -> None:
    alice, bob, vera = fair.client("alice"), fair.client("bob"), fair.client("vera")
    job_id = await alice.start(*READY)
    bobs = await bob.start(*READY)
    async with AsyncExitStack() as stack:
        streams = [await follow(stack, alice, job_id) for _ in range(MAX_STREAMS_PER_USER)]
        error = await raises(Status.RESOURCE_EXHAUSTED, alice.logs(job_id, follow=True))
        assert error.message.startswith(
            f"you have {MAX_STREAMS_PER_USER} log streams open, the most per user"
            " (--max-log-streams-per-user)"
        )
        # Follow or not, every stream counts.
        await raises(Status.RESOURCE_EXHAUSTED, alice.logs(job_id))
        streams.append(await follow(stack, vera, job_id))  # another user still gets hers
        assert (fair.service.log_streams, fair.service.log_streams_of("alice")) == (3, 2)
        # Now every stream of the server is taken: bob, who has none, meets the cap in all.
        error = await raises(Status.RESOURCE_EXHAUSTED, bob.logs(bobs, follow=True))
        assert error.message.startswith(
            f"the server already serves its maximum of {MAX_STREAMS} log streams at once"
            " (--max-log-streams)"
        )
        # The job ends, so do its followers; once a follower has seen its stream end, its
        # handler has returned and its slot is free.
        await alice.stop(job_id, grace_period=NOW)
        for stream in streams:
            assert [chunk async for chunk in stream] == []
        assert fair.service.log_streams == 0
        assert [c.data for c in await alice.logs(job_id)] == [b"ready\n"]
        assert [c.data for c in await bob.logs(bobs)] == [b"ready\n"]


async def test_a_refused_stream_takes_no_slot(fair: Served) -> None:
    alice = fair.client("alice")
    job_id = await alice.start(*READY)
    async with AsyncExitStack() as stack:
        for _ in range(MAX_STREAMS_PER_USER):
            await follow(stack, alice, job_id)
        for _ in range(3):
            await raises(Status.RESOURCE_EXHAUSTED, alice.logs(job_id))
        assert fair.service.log_streams_of("alice") == MAX_STREAMS_PER_USER
    # A stream of a job the caller may not see, or of no job, is counted while it is
    # answered, and freed: NOT_FOUND does not leak a slot.
    await alice.stop(job_id, grace_period=NOW)
    await alice.wait_ended(job_id)
    for _ in range(MAX_STREAMS_PER_USER + 1):
        await raises(Status.NOT_FOUND, fair.client("bob").logs(job_id))
    assert fair.service.log_streams == 0


@dataclass
class Call:
    """What get_job_logs reads of its ServerCall: the identity, and where messages go."""

    identity: Identity
    peer_certificate: None = None
    sent: list[pb.GetJobLogsResponse] = field(default_factory=list)
    first: trio.Event = field(default_factory=trio.Event)

    async def send_serialized(self, payload: bytes) -> None:
        self.sent.append(pb.GetJobLogsResponse.FromString(payload))
        self.first.set()


async def test_a_stream_cancelled_midway_frees_its_slot(fair: Served) -> None:
    """A client that goes away (RST_STREAM) cancels its handler: the slot comes back then.
    The handler is called directly, so the cancellation is exactly where the test puts it."""
    job_id = await fair.client("alice").start(*READY)
    service = fair.service
    call = Call(Identity("alice"))
    request = pb.GetJobLogsRequest(job_id=job_id, follow=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.get_job_logs, request, call)
        await call.first.wait()
        assert service.log_streams_of("alice") == 1
        nursery.cancel_scope.cancel()
    assert (service.log_streams, service.log_streams_of("alice")) == (0, 0)


# --- limits out of range --------------------------------------------------------------------------


@pytest.fixture
async def unbounded(tmp_path: Path, certs: Certs) -> AsyncIterator[Served]:
    """A server with no configured maximums: what the host has is the maximum."""
    async with serve(tmp_path, certs, limits=LimitPolicy(defaults=DEFAULT_LIMITS)) as served:
        yield served


def _above_host(field_: str):
    def limits(served: Served) -> pb.Limits:
        host = served.supervisor.policy.host
        if field_ == "cpu":
            return pb.Limits(cpu=host.cpus + 1)
        return pb.Limits(memory_bytes=host.memory_bytes + 2**20)

    return limits


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        (lambda s: pb.Limits(cpu=1e300), "limits.cpu 1e+300 is above this host's"),
        (lambda s: pb.Limits(cpu=math.nan), "limits.cpu nan is not a finite number of cores"),
        (lambda s: pb.Limits(cpu=-math.inf), "limits.cpu -inf is not a finite number of cores"),
        (lambda s: pb.Limits(cpu=0), "limits.cpu 0 is below the minimum 0.01"),
        (lambda s: pb.Limits(pids=2**32 - 1), "limits.pids 4294967295 is above this host's"),
        (_above_host("cpu"), "CPUs (allowed: 0.01 to "),
        (_above_host("memory"), "limits.memory_bytes"),
        (
            lambda s: pb.Limits(io_read_bytes_per_second=2**64 - 1),
            "limits.io_read_bytes_per_second 18446744073709551615 is above",
        ),
    ],
    ids=["cpu=1e300", "cpu=nan", "cpu=-inf", "cpu=0", "pids=2**32-1", "cpu>host", "mem>host", "io"],
)
async def test_limits_out_of_range_are_invalid_argument_and_create_no_job(
    unbounded: Served, limits, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserted: list[str] = []
    insert = JobStore.insert

    async def spy(self: JobStore, record: Record) -> None:
        inserted.append(record.job_id)
        await insert(self, record)

    monkeypatch.setattr(JobStore, "insert", spy)
    alice = unbounded.client("alice")
    request = pb.StartJobRequest(command="true", limits=limits(unbounded))
    error = await raises(Status.INVALID_ARGUMENT, alice.call("StartJob", request))
    assert words in error.message and "(allowed: " in error.message
    # Refused before anything was written: no record, not even one removed again.
    assert inserted == [] and await alice.list() == []
    assert unbounded.supervisor.jobs() == [] and unbounded.service.running_jobs == 0


async def test_limits_up_to_what_the_host_has_are_accepted(unbounded: Served) -> None:
    alice = unbounded.client("alice")
    host = unbounded.supervisor.policy.host
    job_id = await alice.start("true", limits=pb.Limits(cpu=host.cpus, pids=host.pids))
    status = await alice.wait_ended(job_id)
    assert status.state == pb.JOB_STATE_FINISHED, status.error
    assert (status.limits.cpu, status.limits.pids) == (host.cpus, host.pids)
