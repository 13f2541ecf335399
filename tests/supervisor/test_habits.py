"""What a Trio developer expects of the library (trio.run_process, anyio.open_process): the
command as a whole argv, a one-call run() that checks, stop() on an ended job, and who owns a
job when a task is cancelled."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from jobworker.supervisor import (
    InvalidJobSpec,
    Job,
    JobFailed,
    JobState,
    LimitOverrides,
    OutputStream,
    Supervisor,
)

from .helpers import PYTHON, job_cgroup_dirs, read_all, wait_for_output

pytestmark = pytest.mark.cgroups
MiB = 2**20


async def test_a_sequence_is_the_whole_argv(sup):
    for command in (
        ["echo", "hi", "there"],
        ("echo", "hi", "there"),
        [Path("/bin/echo"), "hi", "there"],
    ):
        job = await sup.start(command)
        assert (await read_all(job))[OutputStream.STDOUT] == b"hi there\n"
        status = await job.wait()
        assert status.state is JobState.FINISHED
        assert status.args == ("hi", "there") and status.command.endswith("echo")
    # The program-and-arguments form is unchanged.
    job = await sup.start("echo", ["hi"])
    assert (await read_all(job))[OutputStream.STDOUT] == b"hi\n"


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ([], (), "empty sequence"),
        ([""], (), "non-empty string"),
        (["echo", 3], (), r"argv\[1\] must be a string, not int"),
        (["echo", b"x"], (), r"argv\[1\] must be a string, not bytes"),
        (["echo", "a\0b"], (), r"argv\[1\] contains a NUL byte"),
        ("echo", ["ok", None], r"argv\[2\] must be a string, not NoneType"),
        (["echo"], ["hi"], "put its arguments in it"),
        (b"echo", (), "not bytes"),
        ({"echo"}, (), "not set"),
        ("echo", "hi", "args must be a sequence of strings, not str"),
    ],
)
async def test_a_bad_argv_is_refused_clearly(tmp_path, command, args, message):
    async with Supervisor(data_dir=tmp_path, isolation=False) as sup:
        with pytest.raises(InvalidJobSpec, match=message):
            await sup.start(command, args)
        assert sup.jobs() == []  # nothing was created


async def test_run_returns_the_final_status_of_a_job_that_succeeded(sup):
    status = await sup.run(["sh", "-c", "echo out; echo err >&2"])
    assert (status.state, status.exit_code) == (JobState.FINISHED, 0)
    assert status.cause == "exited with code 0"
    # Not captured into memory: the job's log has it, for as long as the job is kept.
    output = await read_all(sup.get(status.id), follow=False)
    assert output == {OutputStream.STDOUT: b"out\n", OutputStream.STDERR: b"err\n"}


async def test_run_with_check_raises_with_the_exit_cause(sup):
    with pytest.raises(JobFailed) as failed:
        await sup.run(["sh", "-c", "exit 3"])
    assert failed.value.exit_code == 3 and failed.value.signal is None
    assert failed.value.status.state is JobState.FAILED
    assert str(failed.value) == f"job {failed.value.status.id} (sh -c 'exit 3') exited with code 3"

    with pytest.raises(JobFailed, match=r"was killed by SIGKILL$") as killed:
        await sup.run(["sh", "-c", "kill -KILL $$"])
    assert (killed.value.exit_code, killed.value.signal) == (137, 9)

    with pytest.raises(JobFailed, match=r"could not be created: cannot run '/nonexistent/x'"):
        await sup.run(["/nonexistent/x"])

    # check=False: the status, whatever it is.
    status = await sup.run(["sh", "-c", "exit 5"], check=False)
    assert (status.state, status.exit_code) == (JobState.FAILED, 5)


async def test_run_reports_an_oom_kill_and_the_pids_limit(tmp_path):
    async with Supervisor(data_dir=tmp_path, grace_period_s=5) as sup:
        with pytest.raises(
            JobFailed, match=r"was killed by SIGKILL: the OOM killer at its memory limit 64M$"
        ) as oom:
            await sup.run(
                [PYTHON, "-c", "x = [b'\\x01' * (8 << 20) for _ in range(64)]"],
                limits=LimitOverrides(memory_bytes=64 * MiB),
            )
        assert oom.value.status.oom_killed
        fork_until_refused = textwrap.dedent("""
            import os, signal, sys
            for _ in range(100):
                try:
                    if os.fork() == 0:
                        signal.pause()
                except BlockingIOError:
                    sys.exit(4)
        """)
        with pytest.raises(
            JobFailed, match=r"exited with code 4: a fork failed at its pids limit of 8$"
        ):
            await sup.run([PYTHON, "-c", fork_until_refused], limits=LimitOverrides(pids=8))


async def started_job(sup: Supervisor) -> Job:
    """The job that a concurrent run() starts, once it writes "ready"."""
    while not sup.jobs():
        await trio.lowlevel.checkpoint()  # run() is spawning it (in a thread): a moment
    job = sup.jobs()[0]
    await wait_for_output(job, b"ready")
    return job


async def test_run_says_who_stopped_the_job(sup):
    async def stop_it() -> None:
        await (await started_job(sup)).stop(requested_by="bob")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_it)
        with pytest.raises(JobFailed, match=r"was stopped by bob \(SIGTERM\)$") as stopped:
            await sup.run(["sh", "-c", "echo ready; exec sleep 600"])
    assert stopped.value.status.state is JobState.STOPPED


async def test_cancelling_run_stops_its_job(sup):
    async def cancel_it(scope: trio.CancelScope) -> None:
        await started_job(sup)
        scope.cancel()

    trapping = "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_it, scope)
            await sup.run(["sh", "-c", trapping])
    assert scope.cancelled_caught
    (job,) = sup.jobs()
    # run() returned only once the job had ended: stopped, its goodbye captured, no group left.
    status = job.status()
    assert (status.state, status.exit_code) == (JobState.STOPPED, 7)
    assert status.stop_requested_by == "cancellation"
    assert (await read_all(job))[OutputStream.STDOUT] == b"ready\nbye\n"
    assert job_cgroup_dirs(job.id) == []


async def test_cancelling_wait_leaves_the_job_running(sup):
    job = await sup.start(["sh", "-c", "echo ready; exec sleep 600"])
    await wait_for_output(job, b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await job.wait()
    assert scope.cancelled_caught
    assert job.status().state is JobState.RUNNING  # the job is the Supervisor's, not wait()'s
    assert (await job.stop(requested_by="test")).state is JobState.STOPPED


async def test_stop_on_an_ended_job_returns_its_final_status(sup):
    job = await sup.start("sh", ["-c", "exit 3"])
    ended = await job.wait()
    again = await job.stop(requested_by="late")
    assert again == ended  # unchanged: not "stopped", nobody's request recorded
    assert (again.state, again.exit_code, again.stop_requested_by) == (JobState.FAILED, 3, None)
    broken = await sup.start("/nonexistent/program")
    assert (await broken.stop()).state is JobState.ERROR
    with pytest.raises(ValueError, match="grace period"):
        await job.stop(-1)  # a bad argument is still refused
