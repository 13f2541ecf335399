"""WaitJob, SignalJob, an idempotent StopJob and live memory (issue 14), through the real server:
real processes in real cgroups, caged as the server runs them by default as root."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.purgatory import GrpcError, Status
from jobworker.service import Identity, open_job_service, open_store, recover
from jobworker.service.handlers import SERVICE_NAME
from jobworker.service.recovery import LOST
from jobworker.service.store import Record
from jobworker.supervisor import Supervisor
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import PYTHON, Served, answered, fifo, release

pytestmark = pytest.mark.cgroups

SLEEP = ("sleep", "600")
# A shell that says when its trap is set, reports SIGUSR1, and waits on a background sleep so
# that the trap runs at once.
TRAPPING = "trap 'echo got USR1' USR1; echo ready; while :; do sleep 600 & wait $!; done"


async def error_of(call) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        await call
    return caught.value


async def first_output(client, job_id: str, needle: bytes) -> None:
    """Follow the job's output until `needle` has appeared."""
    seen = b""
    async with client.logs_stream(job_id, follow=True) as stream:
        async for chunk in stream:
            seen += chunk.data
            if needle in seen:
                return
    raise AssertionError(f"the job ended without writing {needle!r}: {seen!r}")


def all_tasks() -> int:
    """Every task of this Trio run: the server's handlers run here too."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


# --- WaitJob --------------------------------------------------------------------------------------


async def test_wait_returns_the_final_status_once_the_job_has_ended(
    served: Served, shared_path: Path
) -> None:
    alice = served.client("alice")
    go = fifo(shared_path)
    job_id = await alice.start("sh", "-c", f"cat {go}; exit 7")
    waited: list[pb.JobStatus] = []

    async def wait() -> None:
        waited.append(await alice.wait(job_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []  # the job runs: the call waits
        await release(go)
    [status] = waited
    assert (status.job_id, status.state, status.exit_code) == (job_id, pb.JOB_STATE_FAILED, 7)
    assert status.HasField("end_time")
    # What WaitJob said is what the server keeps saying.
    await served.service.recorded(job_id)
    assert await alice.status(job_id) == status


async def test_wait_for_a_kept_ended_job_answers_at_once(served: Served) -> None:
    alice, vera = served.client("alice"), served.client("vera")
    job_id = await alice.start("true")
    await served.service.recorded(job_id)
    assert served.supervisor.jobs() == []  # the store alone answers for it now
    status = await alice.wait(job_id)
    assert (status.state, status.exit_code) == (pb.JOB_STATE_FINISHED, 0)
    assert await vera.wait(job_id) == status  # a viewer may wait as it may read
    hidden = await error_of(served.client("bob").wait(job_id))
    assert hidden.status is Status.NOT_FOUND


async def test_a_waits_deadline_ends_the_wait_and_nothing_else(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    await trio.testing.wait_all_tasks_blocked()
    before = all_tasks()
    for _ in range(10):
        with pytest.raises(GrpcError) as caught:
            await alice.channel.unary(
                f"/{SERVICE_NAME}/WaitJob",
                pb.WaitJobRequest(job_id=job_id),
                pb.WaitJobResponse,
                timeout_s=0.05,
            )
        assert caught.value.status is Status.DEADLINE_EXCEEDED
    await trio.testing.wait_all_tasks_blocked()
    assert all_tasks() == before  # every handler is gone: none waits on for a deadline passed
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
    await alice.stop(job_id)


async def test_a_cancelled_wait_leaves_nothing_behind(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    await trio.testing.wait_all_tasks_blocked()
    before = all_tasks()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.wait, job_id)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the client gives up: the server's handler is cancelled with it
    await trio.testing.wait_all_tasks_blocked()
    assert all_tasks() == before
    assert (await alice.stop(job_id)).state == pb.JOB_STATE_STOPPED


@dataclasses.dataclass
class Call:
    identity: Identity
    peer_certificate: None = None


async def test_wait_stop_and_signal_after_a_restart_see_the_recorded_end(tmp_path: Path) -> None:
    alice = Call(Identity("alice"))
    store = await open_store(tmp_path / "jobworker.db")
    try:
        # A job stopped by one server's shutdown, another lost in a crash of another run.
        async with Supervisor(data_dir=tmp_path / "data", grace_period_s=5) as supervisor:
            async with open_job_service(supervisor, store=store) as service:
                request = pb.StartJobRequest(command=SLEEP[0], args=SLEEP[1:], name="nightly")
                stopped = (await service.start_job(request, alice)).job_id
        crashed = await store.begin_run(99999, [])
        lost = "0badc0de-0000-4000-8000-000000000001"
        created = pb.JobStatus(job_id=lost, owner="alice", state=pb.JOB_STATE_RUNNING)
        created.create_time.GetCurrentTime()
        await store.insert(
            Record(
                lost,
                "alice",
                pb.JOB_STATE_RUNNING,
                1.0,
                created.SerializeToString(),
                run_id=crashed,
            )
        )
        await recover(store, tmp_path / "data")
        async with Supervisor(data_dir=tmp_path / "data", grace_period_s=5) as supervisor:
            async with open_job_service(supervisor, store=store) as service:
                waited = (await service.wait_job(pb.WaitJobRequest(job_id="nightly"), alice)).status
                assert (waited.job_id, waited.state) == (stopped, pb.JOB_STATE_STOPPED)
                assert waited.stop_requested_by == "server shutdown"
                waited = (
                    await service.wait_job(pb.WaitJobRequest(job_id="0badc0de"), alice)
                ).status
                assert (waited.job_id, waited.state, waited.error) == (
                    lost,
                    pb.JOB_STATE_FAILED,
                    LOST,
                )
                response = await service.stop_job(pb.StopJobRequest(job_id=lost), alice)
                assert response.already_ended and response.status == waited
                with pytest.raises(GrpcError) as caught:
                    signal_request = pb.SignalJobRequest(job_id=lost, signal=signal.SIGTERM)
                    await answered(service.signal_job(signal_request, alice))
                assert caught.value.status is Status.FAILED_PRECONDITION
                assert "already ended (failed)" in caught.value.message
    finally:
        await store.aclose()


# --- SignalJob ------------------------------------------------------------------------------------


async def test_an_isolated_job_gets_a_signal_its_shell_traps(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.events")
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", TRAPPING, name="trapper")
    status = await alice.status(job_id)
    assert "pid" in status.namespaces  # under the cage's init, which has no USR1 handler
    await first_output(alice, job_id, b"ready\n")
    await alice.signal("trapper", signal.SIGUSR1)
    with trio.fail_after(30):  # a backstop: a signal that went astray would leave us waiting
        await first_output(alice, job_id, b"got USR1\n")
    status = await alice.status(job_id)
    assert status.state == pb.JOB_STATE_RUNNING and not status.stop_requested_by
    lines = [r.getMessage() for r in caplog.records if r.name == "jobworker.events"]
    assert any(
        line.startswith("signal sent ") and f"job={job_id}" in line and "by=alice" in line
        and "signal=SIGUSR1" in line
        for line in lines
    )  # fmt: skip
    await alice.stop(job_id)


async def test_sigkill_through_signaljob_ends_the_job_and_its_status_says_so(
    served: Served,
) -> None:
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", "trap '' TERM; echo ready; exec sleep 600")
    await first_output(alice, job_id, b"ready\n")
    await alice.signal(job_id, signal.SIGTERM)  # ignored; and nothing escalates
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
    await alice.signal(job_id, signal.SIGKILL)
    status = await alice.wait(job_id)
    # Killed by a signal someone sent, not stopped: FAILED, with the signal; no stop recorded.
    assert (status.state, status.exit_code, status.signal) == (pb.JOB_STATE_FAILED, 137, 9)
    assert status.stop_requested_by == "" and not status.escalated and not status.oom_killed
    error = await error_of(alice.signal(job_id, signal.SIGKILL))
    assert error.status is Status.FAILED_PRECONDITION and "already ended (failed)" in error.message


@pytest.mark.parametrize("signum", [0, -1, 32, 65, 1000])
async def test_a_number_that_is_no_signal_is_invalid_argument(served: Served, signum: int) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP)
    error = await error_of(alice.signal(job_id, signum))
    assert error.status is Status.INVALID_ARGUMENT and f"signal {signum}" in error.message
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
    await alice.stop(job_id)


async def test_signalling_is_the_owners_or_an_admins(served: Served) -> None:
    alice, bob, vera, adam = (served.client(n) for n in ("alice", "bob", "vera", "adam"))
    job_id = await alice.start(*SLEEP)
    hidden = await error_of(bob.signal(job_id, signal.SIGKILL))
    assert hidden.status is Status.NOT_FOUND
    denied = await error_of(vera.signal(job_id, signal.SIGKILL))
    assert denied.status is Status.PERMISSION_DENIED and "signal" in denied.message
    assert (await alice.status(job_id)).state == pb.JOB_STATE_RUNNING
    await adam.signal(job_id, signal.SIGTERM)
    status = await alice.wait(job_id)
    assert (status.state, status.signal) == (pb.JOB_STATE_FAILED, 15)


# --- StopJob --------------------------------------------------------------------------------------


async def test_stopping_an_ended_job_is_ok_and_says_it_had_ended(served: Served) -> None:
    alice, bob, vera = served.client("alice"), served.client("bob"), served.client("vera")
    job_id = await alice.start("sh", "-c", "exit 3")
    await alice.wait(job_id)  # else the stop may find it still running: no race to win
    live_or_kept = await alice.call("StopJob", pb.StopJobRequest(job_id=job_id))
    assert live_or_kept.already_ended and live_or_kept.status.exit_code == 3
    await served.service.recorded(job_id)  # now only the store knows it
    kept = await alice.call("StopJob", pb.StopJobRequest(job_id=job_id))
    assert kept.already_ended and kept.status.state == pb.JOB_STATE_FAILED
    assert not kept.status.stop_requested_by  # nothing was recorded: nothing was signalled
    # Still the owner's or an admin's, ended or not.
    assert (await error_of(bob.stop(job_id))).status is Status.NOT_FOUND
    assert (await error_of(vera.stop(job_id))).status is Status.PERMISSION_DENIED
    error_job = await alice.start("/nonexistent/command")
    never_ran = await alice.call("StopJob", pb.StopJobRequest(job_id=error_job))
    assert never_ran.already_ended and never_ran.status.state == pb.JOB_STATE_ERROR


# --- usage ----------------------------------------------------------------------------------------


async def test_running_jobs_list_their_memory_in_use_and_ended_ones_do_not(
    served: Served,
) -> None:
    alice = served.client("alice")
    script = "data = b'x' * (32 << 20); print('ready', flush=True); import time; time.sleep(600)"
    running = await alice.start(PYTHON, "-c", script)
    ended = await alice.start("true")
    await alice.wait(ended)
    await first_output(alice, running, b"ready\n")
    jobs = await alice.list(states=[pb.JOB_STATE_RUNNING])
    assert [j.job_id for j in jobs] == [running]
    usage = jobs[0].usage
    assert usage.HasField("memory_bytes") and usage.memory_bytes >= 32 << 20
    assert usage.memory_peak_bytes >= usage.memory_bytes
    [done] = await alice.list(states=[pb.JOB_STATE_FINISHED])
    assert not done.usage.HasField("memory_bytes") and done.usage.HasField("memory_peak_bytes")
    stopped = await alice.stop(running)
    assert not stopped.usage.HasField("memory_bytes")
