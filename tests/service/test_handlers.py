"""The JobService through the real transport: mutual TLS on 127.0.0.1, identify=identify, a real
Supervisor with real processes and cgroups. Each error code, owner isolation, roles, logs."""

from __future__ import annotations

import json
import logging
import os
import shlex
import uuid
from pathlib import Path

import pytest
import trio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.purgatory import GrpcError, Status
from jobworker.supervisor import JobState
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import MAX_RUNNING_JOBS, PYTHON, RETENTION_BYTES, Served, fifo, release

pytestmark = pytest.mark.cgroups

SLEEP = ("sleep", "60")  # dies at once on SIGTERM


async def raises(status: Status, call) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        await call
    assert caught.value.status is status, caught.value
    return caught.value


def events(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "jobworker.events" and r.getMessage().startswith(prefix)
    ]


# --- starting, status, limits ---------------------------------------------------------------------


async def test_a_job_runs_and_its_status_says_how_it_ended(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", "exit 3")
    await alice.wait_ended(job_id)
    status = await alice.status(job_id)
    assert (status.job_id, status.owner, status.command) == (job_id, "alice", "sh")
    assert list(status.args) == ["-c", "exit 3"]
    assert status.state == pb.JOB_STATE_FAILED
    assert status.exit_code == 3 and not status.HasField("signal")
    assert status.HasField("pid") and status.cgroup_version in (
        pb.CGROUP_VERSION_V1,
        pb.CGROUP_VERSION_V2,
    )
    assert status.create_time.ToDatetime() <= status.start_time.ToDatetime()
    assert status.start_time.ToDatetime() <= status.end_time.ToDatetime()
    assert status.usage.HasField("cpu_seconds")


async def test_limits_unset_take_the_defaults_and_set_ones_apply(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start(
        "true", limits=pb.Limits(cpu=0.25, memory_bytes=128 * 2**20, io_read_bytes_per_second=5000)
    )
    limits = (await alice.status(job_id)).limits
    assert (limits.cpu, limits.memory_bytes, limits.io_read_bytes_per_second) == (
        0.25,
        128 * 2**20,
        5000,
    )
    default = served.supervisor.policy.defaults
    assert (limits.io_write_bytes_per_second, limits.pids) == (
        default.io_write_bps,
        default.pids,
    )
    # IOPS limits are opt-in: none by default, unset in the status; asked for, applied.
    assert not limits.HasField("io_read_iops") and not limits.HasField("io_write_iops")
    iops_job = await alice.start("true", limits=pb.Limits(io_read_iops=30, io_write_iops=40))
    limits = (await alice.status(iops_job)).limits
    assert (limits.io_read_iops, limits.io_write_iops) == (30, 40)
    assert served.supervisor.get(iops_job).spec.limits.io_write_iops == 40


async def test_env_and_working_dir_reach_the_job(served: Served, shared_path: Path) -> None:
    (shared_path / "here").mkdir()
    alice = served.client("alice")
    job_id = await alice.start(
        "sh",
        "-c",
        'printf "%s:%s" "$GREETING" "$PWD"',
        env={"GREETING": "hi there"},
        working_dir=str(shared_path / "here"),
    )
    await alice.wait_ended(job_id)
    chunks = await alice.logs(job_id)
    assert b"".join(c.data for c in chunks) == f"hi there:{shared_path / 'here'}".encode()


async def test_without_a_working_dir_a_job_gets_a_new_one_of_its_own(served: Served) -> None:
    alice = served.client("alice")
    job_ids = [await alice.start("sh", "-c", "pwd; ls -A; touch mine") for _ in range(2)]
    places = set()
    for job_id in job_ids:
        status = await alice.wait_ended(job_id)
        assert status.state == pb.JOB_STATE_FINISHED
        output = b"".join(c.data for c in await alice.logs(job_id))
        place = output.decode().strip()  # it was empty: nothing but its path was printed
        assert place.startswith(str(served.supervisor.data_dir / "work"))
        places.add(place)
        assert not os.path.exists(place)  # removed with the job
    assert len(places) == 2


async def test_a_command_that_cannot_run_is_a_job_in_error(served: Served) -> None:
    alice = served.client("alice")
    started = await alice.call("StartJob", pb.StartJobRequest(command="/nonexistent/command"))
    # StartJob's answer says so already, as GetJobStatus does after it
    for status in (started.status, await alice.status(started.job_id)):
        assert (status.job_id, status.state) == (started.job_id, pb.JOB_STATE_ERROR)
        assert "/nonexistent/command" in status.error
        assert not status.HasField("exit_code")


async def test_start_answers_with_the_status_of_the_job_it_started(served: Served) -> None:
    alice = served.client("alice")
    request = pb.StartJobRequest(command="sleep", args=["60"], limits=pb.Limits(pids=9))
    started = await alice.call("StartJob", request)
    status = started.status
    assert (status.job_id, status.owner, status.state) == (
        started.job_id,
        "alice",
        pb.JOB_STATE_RUNNING,
    )
    assert status.HasField("pid") and status.limits.pids == 9
    await alice.stop(started.job_id)


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        ({"command": ""}, "command"),
        ({"command": "true", "limits": pb.Limits(cpu=0.001)}, "cpu"),
        ({"command": "true", "limits": pb.Limits(cpu=float("nan"))}, "cpu"),
        ({"command": "true", "limits": pb.Limits(pids=1)}, "pids"),
        (
            {"command": "true", "limits": pb.Limits(io_write_bytes_per_second=0)},
            "io_write_bytes_per_second",
        ),
        ({"command": "true", "limits": pb.Limits(io_read_iops=0)}, "limits.io_read_iops 0"),
        (
            {"command": "true", "limits": pb.Limits(io_write_iops=2**32)},
            "limits.io_write_iops 4294967296 is above the largest IOPS limit",
        ),
        ({"command": "true", "limits": pb.Limits(memory_bytes=2**30)}, "maximum"),
        ({"command": "true", "limits": pb.Limits(cpu=4)}, "maximum"),
        ({"command": "true", "env": {"A=B": "x"}}, "A=B"),
        ({"command": "true", "env": {"A\0": "x"}}, "NUL"),
        ({"command": "true", "env": {"A": "x\0y"}}, "NUL"),
        ({"command": "true", "env": {"": "x"}}, "empty name"),
        ({"command": "true", "working_dir": "a\0b"}, "working_dir"),
        ({"command": "true", "working_dir": "relative/dir"}, "working_dir must be absolute"),
        ({"command": "true", "args": ["a\0b"]}, "NUL"),
    ],
)
async def test_bad_start_requests_are_invalid_argument(
    served: Served, request_fields: dict, words: str
) -> None:
    alice = served.client("alice")
    error = await raises(
        Status.INVALID_ARGUMENT, alice.call("StartJob", pb.StartJobRequest(**request_fields))
    )
    assert words in error.message
    assert served.supervisor.jobs() == []


async def test_past_max_running_jobs_start_is_resource_exhausted_until_one_ends(
    served: Served,
) -> None:
    alice = served.client("alice")
    job_ids = [await alice.start(*SLEEP) for _ in range(MAX_RUNNING_JOBS)]
    error = await raises(Status.RESOURCE_EXHAUSTED, alice.start(*SLEEP))
    assert str(MAX_RUNNING_JOBS) in error.message
    await alice.stop(job_ids[0], grace_period=Duration(seconds=0))
    await alice.start(*SLEEP)  # room again
    assert served.service.running_jobs == MAX_RUNNING_JOBS


# --- malformed ids, unknown and hidden jobs -------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    ["", "../../etc/passwd", "-rf", "a b", "job\x1b]0;pwned\x07", "x" * 10_000],
)
async def test_malformed_job_ids_are_invalid_argument(served: Served, job_id: str) -> None:
    # References that can name no job, ever (test_references.py has the well-formed ones).
    alice = served.client("alice")
    for call in (alice.status(job_id), alice.stop(job_id), alice.logs(job_id)):
        error = await raises(Status.INVALID_ARGUMENT, call)
        assert "job_id" in error.message and len(error.message) < 200
        assert "\x1b" not in error.message  # control characters are shown escaped


async def test_another_users_job_is_not_found_exactly_like_an_unknown_one(served: Served) -> None:
    alice, bob = served.client("alice"), served.client("bob")
    alices = await alice.start(*SLEEP)
    bobs = await bob.start(*SLEEP)
    unknown = str(uuid.uuid4())
    for me, theirs in ((bob, alices), (alice, bobs)):
        for action in (me.status, me.stop, me.logs):
            hidden = await raises(Status.NOT_FOUND, action(theirs))
            missing = await raises(Status.NOT_FOUND, action(unknown))
            assert hidden.message.replace(theirs, "ID") == missing.message.replace(unknown, "ID")
            assert hidden.trailers == missing.trailers
    assert [j.job_id for j in await alice.list()] == [alices]
    assert [j.job_id for j in await bob.list()] == [bobs]
    # and nothing happened to the jobs
    assert (await alice.status(alices)).state == pb.JOB_STATE_RUNNING
    assert (await bob.status(bobs)).state == pb.JOB_STATE_RUNNING


async def test_a_job_id_in_upper_case_is_the_same_job(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start("true")
    assert (await alice.status(job_id.upper())).job_id == job_id


# --- stopping -------------------------------------------------------------------------------------


async def test_stop_sigterms_and_a_second_stop_says_it_had_already_ended(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    response = await alice.call("StopJob", pb.StopJobRequest(job_id=job_id))
    status = response.status
    assert status.state == pb.JOB_STATE_STOPPED and not response.already_ended
    assert (status.exit_code, status.signal) == (143, 15)
    assert status.stop_requested_by == "alice" and not status.escalated
    # Idempotent (docker stop): OK, nothing signalled, the status as it ended.
    again = await alice.call("StopJob", pb.StopJobRequest(job_id=job_id))
    assert again.already_ended and again.status == status


async def test_stop_escalates_to_sigkill_after_the_requested_grace_period(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
    async with alice.logs_stream(job_id, follow=True) as stream:
        assert (await stream.__anext__()).data == b"ready\n"  # the trap is set
    status = await alice.stop(job_id, grace_period=Duration(nanos=100_000_000))
    assert status.state == pb.JOB_STATE_STOPPED
    assert (status.exit_code, status.signal, status.escalated) == (137, 9, True)


@pytest.mark.parametrize(
    ("duration", "words"),
    [
        (Duration(seconds=-1), "negative"),
        (Duration(seconds=0, nanos=-1), "negative"),
        (Duration(seconds=10**9), "maximum"),
        (Duration(seconds=1, nanos=-5), "not a valid Duration"),
        (Duration(seconds=0, nanos=2_000_000_000), "not a valid Duration"),
    ],
)
async def test_bad_grace_periods_are_invalid_argument(
    served: Served, duration: Duration, words: str
) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    error = await raises(Status.INVALID_ARGUMENT, alice.stop(job_id, grace_period=duration))
    assert words in error.message
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING


# --- roles ----------------------------------------------------------------------------------------


async def test_a_viewer_reads_every_job_and_starts_and_stops_nothing(served: Served) -> None:
    alice, vera = served.client("alice"), served.client("vera")
    job_id = await alice.start("sh", "-c", "echo hello; exec sleep 60")
    assert (await vera.status(job_id)).owner == "alice"
    assert [j.job_id for j in await vera.list(all=True)] == [job_id]
    assert await vera.list() == []  # it owns nothing
    async with vera.logs_stream(job_id, follow=True) as stream:
        assert (await stream.__anext__()).data == b"hello\n"
    denied = await raises(Status.PERMISSION_DENIED, vera.stop(job_id))
    assert "vera" in denied.message and "stop" in denied.message
    denied = await raises(Status.PERMISSION_DENIED, vera.start("true"))
    assert "start" in denied.message
    # existence comes first: stopping a job that does not exist is NOT_FOUND for everyone
    await raises(Status.NOT_FOUND, vera.stop(str(uuid.uuid4())))
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING


async def test_a_user_may_not_list_every_job(served: Served) -> None:
    alice = served.client("alice")
    error = await raises(Status.PERMISSION_DENIED, alice.list(all=True))
    assert "viewer or admin" in error.message


async def test_an_unknown_ou_grants_nothing(served: Served) -> None:
    alice, eve = served.client("alice"), served.client("eve")
    job_id = await alice.start(*SLEEP)
    await raises(Status.NOT_FOUND, eve.status(job_id))
    await raises(Status.PERMISSION_DENIED, eve.list(all=True))
    assert (await eve.status(await eve.start("true"))).owner == "eve"  # a plain user


@pytest.mark.parametrize("admin", ["adam", "olga"])
async def test_an_admin_does_everything_to_every_job(served: Served, admin: str) -> None:
    alice, boss = served.client("alice"), served.client(admin)
    job_id = await alice.start("sh", "-c", "echo hi; exec sleep 60")
    assert (await boss.status(job_id)).owner == "alice"
    async with boss.logs_stream(job_id, follow=True) as stream:
        assert (await stream.__anext__()).data == b"hi\n"
    own = await boss.start("true")
    assert {j.job_id for j in await boss.list(all=True)} == {job_id, own}
    assert [j.job_id for j in await boss.list()] == [own]
    status = await boss.stop(job_id)
    assert (status.state, status.stop_requested_by) == (pb.JOB_STATE_STOPPED, admin)
    assert (await alice.status(job_id)).stop_requested_by == admin


async def test_a_certificate_without_cn_is_unauthenticated(served: Served) -> None:
    nameless = served.client("nameless")
    for call in (nameless.start("true"), nameless.list(), nameless.status(str(uuid.uuid4()))):
        error = await raises(Status.UNAUTHENTICATED, call)
        assert "no CN" in error.message
    assert served.supervisor.jobs() == []


# --- logs -----------------------------------------------------------------------------------------

WRITER = r"""
import sys
out, err = sys.stdout.buffer, sys.stderr.buffer
for i in range(50):
    out.write(bytes(range(256)) + b"out %d\n" % i); out.flush()
    err.write(b"err %d \xff\x00\n" % i); err.flush()
"""


def by_stream(chunks: list[pb.GetJobLogsResponse], offset: int = 0) -> dict[int, bytes]:
    """Per stream, the bytes of `chunks`, checking that offsets are contiguous from `offset`."""
    out: dict[int, bytes] = {pb.LOG_STREAM_STDOUT: b"", pb.LOG_STREAM_STDERR: b""}
    for chunk in chunks:
        assert chunk.offset == offset
        offset += len(chunk.data)
        out[chunk.stream] += chunk.data
    return out


async def test_logs_are_byte_exact_with_their_streams_history_and_follow(served: Served) -> None:
    alice = served.client("alice")
    expected = {
        pb.LOG_STREAM_STDOUT: b"".join(bytes(range(256)) + b"out %d\n" % i for i in range(50)),
        pb.LOG_STREAM_STDERR: b"".join(b"err %d \xff\x00\n" % i for i in range(50)),
    }
    job_id = await alice.start(PYTHON, "-c", WRITER)
    followed = await alice.logs(job_id, follow=True)  # from while it runs until it has ended
    assert by_stream(followed) == expected
    history = await alice.logs(job_id)
    assert by_stream(history) == expected
    assert b"".join(c.data for c in history) == b"".join(c.data for c in followed)
    # from an offset: exactly the rest
    middle = len(b"".join(c.data for c in history)) // 2
    rest = await alice.logs(job_id, offset=middle)
    assert b"".join(c.data for c in rest) == b"".join(c.data for c in history)[middle:]
    by_stream(rest, offset=middle)


async def test_follow_delivers_live_output_and_ends_with_the_job(
    served: Served, shared_path: Path
) -> None:
    alice = served.client("alice")
    go = fifo(shared_path)
    job_id = await alice.start("sh", "-c", f"echo before; cat {go}; echo after >&2")
    async with alice.logs_stream(job_id, follow=True) as stream:
        first = await stream.__anext__()
        assert (first.data, first.stream) == (b"before\n", pb.LOG_STREAM_STDOUT)
        assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
        await release(go)
        rest = [chunk async for chunk in stream]
    assert [(c.data, c.stream, c.offset) for c in rest] == [(b"after\n", pb.LOG_STREAM_STDERR, 7)]
    assert (await alice.status(job_id)).state == pb.JOB_STATE_FINISHED


async def test_an_offset_beyond_the_end_gives_an_empty_stream(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start("echo", "12345")
    await alice.wait_ended(job_id)
    assert await alice.logs(job_id, offset=6) == []  # the end: nothing more
    assert await alice.logs(job_id, offset=1000) == []
    assert await alice.logs(job_id, offset=1000, follow=True) == []  # ended: nothing to wait for


async def test_output_dropped_by_retention_is_a_chunk_saying_how_much_then_the_rest(
    served: Served,
) -> None:
    alice = served.client("alice")
    job_id = await alice.start("head", "-c", str(4 * RETENTION_BYTES), "/dev/zero")
    await alice.wait_ended(job_id)
    first, *rest = await alice.logs(job_id)
    assert (first.offset, first.stream, first.data) == (0, pb.LOG_STREAM_UNSPECIFIED, b"")
    retained = first.dropped
    assert 0 < retained < 4 * RETENTION_BYTES
    assert rest[0].offset == retained
    assert sum(len(c.data) for c in rest) == 4 * RETENTION_BYTES - retained
    assert not any(c.dropped for c in rest)


async def test_a_follower_that_falls_behind_retention_is_told_and_goes_on(
    served: Served, shared_path: Path
) -> None:
    alice = served.client("alice")
    go = fifo(shared_path)
    total = 32 * RETENTION_BYTES  # far more than retention plus the stream's 1 MiB window
    job_id = await alice.start("sh", "-c", f"echo first; cat {go}; head -c {total} /dev/zero")
    received = dropped = 0
    async with alice.logs_stream(job_id, follow=True) as stream:
        assert (await stream.__anext__()).data == b"first\n"
        await release(go)
        await alice.wait_ended(job_id)  # all written while we did not read
        async for chunk in stream:
            assert chunk.offset == 6 + received + dropped  # nothing skipped unannounced
            received += len(chunk.data)
            dropped += chunk.dropped
    assert dropped > 0  # it was behind what is kept
    assert received + dropped == total


# --- removing jobs, listing pages -----------------------------------------------------------------


async def test_rm_is_the_owners_or_an_admins_and_takes_record_and_output(
    served: Served,
) -> None:
    alice, bob, vera, adam = (served.client(n) for n in ("alice", "bob", "vera", "adam"))
    mine, other = [await alice.start("sh", "-c", "echo out") for _ in range(2)]
    for job_id in (mine, other):
        await alice.wait_ended(job_id)
        await served.service.recorded(job_id)
    output_dir = served.supervisor.data_dir / "jobs" / mine
    assert output_dir.is_dir()

    await raises(Status.NOT_FOUND, bob.call("DeleteJob", pb.DeleteJobRequest(job_id=mine)))
    denied = await raises(
        Status.PERMISSION_DENIED, vera.call("DeleteJob", pb.DeleteJobRequest(job_id=mine))
    )
    assert "remove jobs" in denied.message
    assert (await alice.status(mine)).state == pb.JOB_STATE_FINISHED  # still there

    await alice.call("DeleteJob", pb.DeleteJobRequest(job_id=mine))
    await adam.call("DeleteJob", pb.DeleteJobRequest(job_id=other))
    for job_id in (mine, other):
        await raises(Status.NOT_FOUND, alice.status(job_id))
        await raises(Status.NOT_FOUND, alice.logs(job_id))
    assert not output_dir.exists()
    assert await alice.list() == []


async def test_rm_refuses_a_running_job_unless_forced_which_stops_it_first(
    served: Served,
) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    refused = await raises(
        Status.FAILED_PRECONDITION, alice.call("DeleteJob", pb.DeleteJobRequest(job_id=job_id))
    )
    assert "still running" in refused.message
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
    job = served.supervisor.get(job_id)
    await alice.call("DeleteJob", pb.DeleteJobRequest(job_id=job_id, force=True))
    assert job.status().state is JobState.STOPPED  # stopped (SIGTERM), not abandoned
    await raises(Status.NOT_FOUND, alice.status(job_id))


async def test_prune_takes_the_callers_ended_jobs_and_all_only_for_an_admin(
    served: Served,
) -> None:
    alice, bob, vera, adam = (served.client(n) for n in ("alice", "bob", "vera", "adam"))
    ended = [await alice.start("true") for _ in range(2)]
    bobs = await bob.start("true")
    for job_id in ended:
        await alice.wait_ended(job_id)
    await bob.wait_ended(bobs)
    for job_id in (*ended, bobs):
        await served.service.recorded(job_id)
    running = await alice.start(*SLEEP)

    prune = pb.PruneJobsRequest
    # Not older than an hour: nothing goes.
    recent = Duration(seconds=3600)
    assert list((await alice.call("PruneJobs", prune(older_than=recent))).job_ids) == []
    # Everyone's: the attempt is refused for a user and a viewer, and changes nothing.
    denied = await raises(Status.PERMISSION_DENIED, alice.call("PruneJobs", prune(all=True)))
    assert "admin role" in denied.message
    await raises(Status.PERMISSION_DENIED, vera.call("PruneJobs", prune(all=True)))
    await raises(Status.PERMISSION_DENIED, vera.call("PruneJobs", prune()))
    assert len(await adam.list(all=True)) == 4

    assert sorted((await alice.call("PruneJobs", prune())).job_ids) == sorted(ended)
    # Neither bob's nor a running job went.
    assert [j.job_id for j in await adam.list(all=True)] == [bobs, running]
    assert list((await adam.call("PruneJobs", prune(all=True))).job_ids) == [bobs]
    assert [j.job_id for j in await adam.list(all=True)] == [running]


async def test_list_pages_filters_and_refuses_a_token_of_another_query(served: Served) -> None:
    alice, bob, adam = (served.client(n) for n in ("alice", "bob", "adam"))
    alices = []
    for _ in range(5):  # one at a time: the server runs at most MAX_RUNNING_JOBS
        alices.append(await alice.start("true"))
        await alice.wait_ended(alices[-1])
    bobs = await bob.start(*SLEEP)

    async def pages(client, **fields) -> list[list[str]]:
        """The ids on each page, following next_page_token to the end."""
        result, token = [], ""
        while True:
            reply = await client.call("ListJobs", pb.ListJobsRequest(page_token=token, **fields))
            result.append([j.job_id for j in reply.jobs])
            if not (token := reply.next_page_token):
                return result

    assert await pages(alice, page_size=2) == [alices[0:2], alices[2:4], alices[4:]]
    newest = await pages(alice, page_size=3, order_by="create_time desc")
    assert newest == [alices[:1:-1], alices[1::-1]]
    everyone = await pages(adam, all=True, page_size=4)
    assert [j for page in everyone for j in page] == [*alices, bobs]
    assert await pages(adam, all=True, owner="bob") == [[bobs]]
    assert await pages(adam, all=True, states=[pb.JOB_STATE_RUNNING]) == [[bobs]]
    # Between the creations of the third and fourth jobs (milliseconds apart).
    third, fourth = [(await alice.status(j)).create_time.ToNanoseconds() for j in alices[2:4]]
    since = Timestamp()
    since.FromNanoseconds((third + fourth) // 2)
    assert await pages(alice, create_time_after=since) == [alices[3:]]

    first = await alice.call("ListJobs", pb.ListJobsRequest(page_size=2))
    other_query = pb.ListJobsRequest(page_size=2, page_token=first.next_page_token, all=True)
    await raises(Status.INVALID_ARGUMENT, adam.call("ListJobs", other_query))
    garbage = pb.ListJobsRequest(page_token="not-a-token")
    await raises(Status.INVALID_ARGUMENT, alice.call("ListJobs", garbage))
    owner_alone = await raises(Status.INVALID_ARGUMENT, adam.list(owner="bob"))
    assert "set all" in owner_alone.message
    await raises(Status.INVALID_ARGUMENT, alice.list(order_by="owner"))


# --- events ---------------------------------------------------------------------------------------


async def test_each_event_is_one_line_with_the_identity(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.events")
    alice, bob, vera = (served.client(n) for n in ("alice", "bob", "vera"))
    script = "sleep 60\necho 'evil\nline' \u2028"
    job_id = await alice.start("sh", "-c", script, limits=pb.Limits(pids=64))
    await raises(Status.NOT_FOUND, bob.stop(job_id))
    await raises(Status.PERMISSION_DENIED, vera.stop(job_id))
    await raises(Status.PERMISSION_DENIED, bob.list(all=True))
    await alice.stop(job_id)
    await trio.testing.wait_all_tasks_blocked()  # the watcher logs the end

    [created] = events(caplog, "job created ")
    assert "\n" not in created  # a command line never breaks the line
    assert f"job={job_id} owner=alice roles=user " in created and "pids=64" in created
    start = created.index("command=") + len("command=")
    command, _ = json.JSONDecoder().raw_decode(created, start)
    assert command == shlex.join(["sh", "-c", script])
    failures = events(caplog, "authorization failure ")
    assert failures == [
        f"authorization failure identity=bob roles=user action=stop job={job_id} "
        'answer="not found"',
        f"authorization failure identity=vera roles=viewer action=stop job={job_id} "
        'answer="permission denied"',
        'authorization failure identity=bob roles=user action=list answer="permission denied"',
    ]
    [stop] = events(caplog, "stop requested ")
    assert f"job={job_id}" in stop and "by=alice" in stop and "owner=alice" in stop
    [ended] = events(caplog, "job ended ")
    assert f"job={job_id}" in ended and "state=stopped" in ended and "signal=SIGTERM" in ended
    assert 'cause="stopped by alice"' in ended and "exit_code=143" in ended


# --- health ---------------------------------------------------------------------------------------


async def test_health_check_and_watch(served: Served) -> None:
    from jobworker._pb.grpc.health.v1 import health_pb2 as health

    channel = (served.client("alice")).channel
    check = "/grpc.health.v1.Health/Check"

    async def status_of(service: str) -> int:
        request = health.HealthCheckRequest(service=service)
        return (await channel.unary(check, request, health.HealthCheckResponse)).status

    assert await status_of("") == health.HealthCheckResponse.SERVING
    assert await status_of("jobworker.v1.JobService") == health.HealthCheckResponse.SERVING
    error = await raises(Status.NOT_FOUND, status_of("jobworker.v1.Nope"))
    assert "jobworker.v1.Nope" in error.message

    request = health.HealthCheckRequest(service="jobworker.v1.JobService")
    async with channel.server_stream(
        "/grpc.health.v1.Health/Watch", request, health.HealthCheckResponse
    ) as watch:
        assert (await watch.__anext__()).status == health.HealthCheckResponse.SERVING
        served.service.set_serving(False)
        assert (await watch.__anext__()).status == health.HealthCheckResponse.NOT_SERVING
    assert await status_of("") == health.HealthCheckResponse.NOT_SERVING
    async with channel.server_stream(
        "/grpc.health.v1.Health/Watch",
        health.HealthCheckRequest(service="nope"),
        health.HealthCheckResponse,
    ) as watch:
        assert (await watch.__anext__()).status == health.HealthCheckResponse.SERVICE_UNKNOWN


async def test_the_methods_cover_every_rpc_of_the_schema(served: Served) -> None:
    from jobworker._pb.grpc.health.v1 import health_pb2 as health

    schema = {
        (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
        for module in (pb, health)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    served_methods = {
        (m.path, m.client_streaming, m.server_streaming) for m in served.service.methods()
    }
    assert served_methods == schema  # each method, and each of its kind
