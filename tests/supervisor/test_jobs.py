"""Job lifecycle with real processes in real cgroups: states, exit causes, stop, output, exit."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.supervisor import (
    CgroupsUnavailable,
    InvalidJobSpec,
    JobEnded,
    JobNotFound,
    JobState,
    LimitOverrides,
    LimitPolicy,
    Limits,
    OutputStream,
    Supervisor,
)

from .helpers import (
    PYTHON,
    host_pid,
    job_cgroup_dirs,
    planned_groups,
    read_all,
    seen_from_inside,
    wait_for_output,
)

pytestmark = pytest.mark.cgroups

IGNORE_TERM = "trap '' TERM; echo ready; while :; do sleep 0.1; done"


def py(code: str) -> list[str]:
    return ["-c", textwrap.dedent(code)]


async def test_process_is_in_its_cgroups_from_its_first_instruction(
    sup, expected_backend, monkeypatch
):
    # cat opens its arguments first thing: the cgroup.procs files of the job's own groups. Had
    # placement happened after exec (the racy way), some of these runs would find cat missing.
    assert sup.cgroups == expected_backend
    new_id = uuid.uuid4
    for _ in range(30):
        job_id = new_id()
        monkeypatch.setattr(uuid, "uuid4", lambda job_id=job_id: job_id)
        groups = planned_groups(sup, str(job_id))
        if sup.isolation:
            # An isolated job sees each hierarchy from its cgroup namespace, whose root is the
            # group it was in when the namespace was made: its own group only if it was
            # placed before (else the supervisor's, and cat would be missing or not alone).
            paths = [seen_from_inside(g) / "cgroup.procs" for g in groups]
        else:
            paths = [g / "cgroup.procs" for g in groups]
        job = await sup.start("/bin/cat", [str(p) for p in paths])
        out = (await read_all(job))[OutputStream.STDOUT].decode().split()
        status = await job.wait()
        assert status.state is JobState.FINISHED
        # cat, and only cat, in each: its PID as the job sees it (2 behind the cage's init).
        expected = "2" if sup.isolation else str(status.pid)
        assert out == [expected] * len(groups)


@pytest.mark.parametrize(
    ("script", "state", "exit_code", "signum"),
    [
        ("exit 0", JobState.FINISHED, 0, None),
        ("exit 3", JobState.FAILED, 3, None),
        ("kill -KILL $$", JobState.FAILED, 137, signal.SIGKILL),
        ("kill -TERM $$", JobState.FAILED, 143, signal.SIGTERM),  # nobody asked: failed
    ],
)
async def test_exit_codes_and_states(sup, script, state, exit_code, signum):
    job = await sup.start("sh", ["-c", script], owner="alice")
    status = await job.wait()
    assert (status.state, status.exit_code, status.signal) == (state, exit_code, signum)
    assert status.owner == "alice"
    assert status.stop_requested_by is None and not status.escalated
    assert not status.oom_killed and not status.pids_limit_hit
    assert status.created_at <= status.started_at <= status.ended_at
    assert status.limits == Limits()  # seed 000's defaults
    assert status.usage.cpu_s is not None and status.usage.memory_peak_bytes is not None


async def test_job_ids_are_random_uuids(sup):
    jobs = [await sup.start("true") for _ in range(3)]
    assert len({job.id for job in jobs}) == 3
    assert all(uuid.UUID(job.id).version == 4 for job in jobs)


async def test_stop_sends_sigterm_to_every_process(sup):
    job = await sup.start("sh", ["-c", "sleep 60 & echo ready; wait"])
    await wait_for_output(job, b"ready")
    status = await job.stop(30, requested_by="alice")
    assert status.state is JobState.STOPPED
    assert (status.exit_code, status.signal, status.escalated) == (143, signal.SIGTERM, False)
    assert status.stop_requested_by == "alice"


async def test_a_plain_sleep_stops_on_sigterm_at_once(sup):
    # Isolated, the leader is PID 2 behind the cage's init, not PID 1 (which would ignore a
    # SIGTERM it has no handler for): the grace period is never needed.
    job = await sup.start("sleep", ["300"])
    status = await job.stop(300)
    assert (status.state, status.exit_code, status.signal, status.escalated) == (
        JobState.STOPPED,
        143,
        signal.SIGTERM,
        False,
    )


async def test_a_job_that_exits_0_on_sigterm_reports_0(sup):
    job = await sup.start(
        PYTHON,
        py("""
            import signal, sys
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            print("ready", flush=True)
            signal.pause()
        """),
    )
    await wait_for_output(job, b"ready")
    status = await job.stop(30)
    assert (status.state, status.exit_code, status.signal) == (JobState.STOPPED, 0, None)


async def test_stop_escalates_to_sigkill_after_the_grace_period(sup):
    job = await sup.start("sh", ["-c", IGNORE_TERM])
    await wait_for_output(job, b"ready")
    status = await job.stop(0.2)
    assert status.state is JobState.STOPPED
    assert (status.exit_code, status.signal, status.escalated) == (137, signal.SIGKILL, True)


async def test_a_second_stop_with_a_shorter_grace_kills_sooner(sup):
    job = await sup.start("sh", ["-c", IGNORE_TERM])
    await wait_for_output(job, b"ready")
    with trio.fail_after(30):  # the first stop alone would wait 600 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.stop, 600)
            await trio.testing.wait_all_tasks_blocked()
            status = await job.stop(0)
    assert status.escalated and status.state is JobState.STOPPED


async def test_concurrent_stops_agree(sup):
    job = await sup.start("sleep", ["60"])
    results = []

    async def stop():
        results.append(await job.stop(30))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(stop)
    assert len(results) == 5 and len(set(results)) == 1
    assert results[0].state is JobState.STOPPED


async def test_requesting_a_stop_of_an_ended_job_is_an_error(sup):
    # request_stop (what a server records before it waits) still says the job has ended;
    # stop() returns the final status then (test_habits.py).
    job = await sup.start("true")
    await job.wait()
    with pytest.raises(JobEnded, match="already ended"):
        job.request_stop()
    broken = await sup.start("/nonexistent/program")
    with pytest.raises(JobEnded, match="error"):
        broken.request_stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != b"Z"


DAEMONIZE = textwrap.dedent("""
    import os, signal, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # the daemon: orphaned, own session, deaf to SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(os.getpid(), flush=True)
            time.sleep(600)
        os._exit(0)
    os.wait()
    sys.stdout.flush()
""")


async def test_stop_kills_a_daemonized_grandchild(sup):
    job = await sup.start(PYTHON, py(DAEMONIZE + "\ntime.sleep(600)\n"))
    daemon = host_pid(job, int((await wait_for_output(job, b"\n")).split()[0]))
    assert _alive(daemon)
    status = await job.stop(0.2)
    assert status.state is JobState.STOPPED
    assert not _alive(daemon)


async def test_stragglers_die_when_the_leader_exits(sup, shared_path):
    gate = shared_path / "gate"
    os.mkfifo(gate, 0o666)
    # The leader exits 0 once the daemon runs and the test has found it.
    job = await sup.start(PYTHON, [*py(DAEMONIZE + "\nopen(sys.argv[1]).read()\n"), str(gate)])
    daemon = host_pid(job, int((await wait_for_output(job, b"\n")).split()[0]))
    assert _alive(daemon)
    with open(gate, "w") as release:
        release.write("go")
    await read_all(job)  # ends only if the daemon's copy of stdout was closed too
    status = await job.wait()
    assert status.state is JobState.FINISHED
    assert not _alive(daemon)
    assert job_cgroup_dirs(job.id) == []


@pytest.mark.parametrize(
    ("command", "mode", "cwd", "reason"),
    [
        ("no-such-command-here", None, None, "cannot run 'no-such-command-here': No such file"),
        ("{tmp}/data.txt", 0o644, None, "data.txt': Permission denied"),
        ("{tmp}/data.txt", 0o755, None, "data.txt': Exec format error"),
        ("{tmp}", None, None, "Permission denied"),
        ("true", None, "/no/such/dir", "cannot use working directory '/no/such/dir'"),
    ],
)
async def test_creation_failures_are_error_jobs(sup, shared_path, command, mode, cwd, reason):
    command = command.format(tmp=shared_path)
    if mode is not None:
        Path(command).write_text("not a program\n")
        Path(command).chmod(mode)
    job = await sup.start(command, cwd=cwd, owner="bob")
    status = job.status()
    assert status.state is JobState.ERROR
    assert reason in status.error
    assert status.pid is None and status.exit_code is None
    assert sup.get(job.id) is job  # the record is kept
    assert await read_all(job) == {OutputStream.STDOUT: b"", OutputStream.STDERR: b""}
    assert job_cgroup_dirs(job.id) == []


async def test_a_limit_the_kernel_refuses_makes_an_error_job_and_no_group(sup, monkeypatch):
    # io.max/blkio take whole disks only; the kernel answers ENODEV for anything else. The job
    # must say so, and its half-made groups must be gone.
    from jobworker.supervisor.cgroups import backends

    monkeypatch.setattr(backends, "_disks", lambda cwd: ["999:0"])
    job = await sup.start("true")
    status = job.status()
    assert status.state is JobState.ERROR
    assert "cgroup setup failed" in status.error and "999:0" in status.error
    assert job_cgroup_dirs(job.id) == []


async def test_invalid_arguments_raise(tmp_path):
    policy = LimitPolicy(maximums=LimitOverrides(memory_bytes=2**30, cpu=1))
    async with Supervisor(data_dir=tmp_path, limits=policy) as sup:
        for bad in ["", None, 3]:
            with pytest.raises(InvalidJobSpec, match="command"):
                await sup.start(bad)
        with pytest.raises(InvalidJobSpec, match="sequence of strings"):
            await sup.start("echo", "hello")
        with pytest.raises(InvalidJobSpec, match="NUL"):
            await sup.start("echo", ["a\0b"])
        with pytest.raises(InvalidJobSpec, match="environment"):
            await sup.start("true", env={"A=B": "c"})
        with pytest.raises(InvalidJobSpec, match="A contains a NUL byte"):
            await sup.start("true", env={"A": "b\0c"})
        with pytest.raises(InvalidJobSpec, match="working directory cannot contain NUL"):
            await sup.start("true", cwd="/tmp\0x")  # once left a job "running" forever
        with pytest.raises(InvalidJobSpec, match="memory_bytes 2G is above the maximum 1G"):
            await sup.start("true", limits=LimitOverrides(memory_bytes=2 * 2**30))
        with pytest.raises(
            InvalidJobSpec, match=r"cpu 1\.5 is above the maximum 1 \(allowed: 0\.01 to 1\)$"
        ):
            await sup.start("true", limits=LimitOverrides(cpu=1.5))
        with pytest.raises(InvalidJobSpec, match="pids -1 is below the minimum 2"):
            await sup.start("true", limits=LimitOverrides(pids=-1))
        assert sup.jobs() == []  # nothing was created


async def test_output_keeps_streams_apart_and_offsets_contiguous(sup):
    job = await sup.start(
        PYTHON,
        py("""
            import os
            for i in range(200):
                os.write(1, b"out%d\\n" % i)
                os.write(2, b"err%d\\n" % i)
        """),
    )
    out = await read_all(job)
    assert out[OutputStream.STDOUT] == b"".join(b"out%d\n" % i for i in range(200))
    assert out[OutputStream.STDERR] == b"".join(b"err%d\n" % i for i in range(200))


async def test_output_is_binary_safe_and_identical_for_many_readers(sup):
    # 8 MiB of every byte value; 8 followers from the start and one from the middle, all
    # attached while the job is writing.
    writer = py("""
        import os, sys
        block = bytes(range(256)) * 4096
        for _ in range(8):
            sys.stdout.buffer.write(block)
    """)
    expected = bytes(range(256)) * 4096 * 8
    job = await sup.start(PYTHON, writer)
    digests = []

    async def follow(offset):
        h = hashlib.sha256()
        async for chunk in job.output(offset, follow=True):
            h.update(chunk.data)
        digests.append((offset, h.hexdigest()))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(follow, 0)
        nursery.start_soon(follow, 12345)
    assert sorted(digests) == sorted(
        [(0, hashlib.sha256(expected).hexdigest())] * 8
        + [(12345, hashlib.sha256(expected[12345:]).hexdigest())]
    )


async def test_follow_ends_when_the_job_ends_and_history_is_replayed(sup):
    job = await sup.start("sh", ["-c", "echo first; exec sleep 600"])
    followed = {}

    async def follower():
        followed.update(await read_all(job))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower)
        await wait_for_output(job, b"first")
        await trio.testing.wait_all_tasks_blocked()
        assert not followed  # still following a live job
        await job.stop()
    assert followed[OutputStream.STDOUT] == b"first\n"
    # Without follow, a reader gets what exists and ends.
    assert (await read_all(job, follow=False))[OutputStream.STDOUT] == b"first\n"
    assert (await read_all(job, offset=3))[OutputStream.STDOUT] == b"st\n"


async def test_a_stalled_reader_does_not_hold_back_the_job(sup):
    job = await sup.start("head", ["-c", str(32 * 2**20), "/dev/zero"])
    stalled = job.output(follow=True)  # never iterated
    await anext(stalled)  # took one chunk and stopped reading
    status = await job.wait()
    assert status.state is JobState.FINISHED
    assert sum(len(c.data) for c in [c async for c in job.output()]) == 32 * 2**20


async def test_environment_is_not_inherited_and_cwd_is_used(sup, shared_path, monkeypatch):
    monkeypatch.setenv("SUPERVISOR_SECRET", "hunter2")
    job = await sup.start("sh", ["-c", "env; pwd"], env={"GREETING": "hi"}, cwd=str(shared_path))
    out = (await read_all(job))[OutputStream.STDOUT].decode()
    assert "GREETING=hi" in out.splitlines()
    assert "SUPERVISOR_SECRET" not in out
    assert out.splitlines()[-1] == str(shared_path)


async def test_get_and_list(sup):
    a = await sup.start("true", owner="alice")
    b = await sup.start("true", owner="bob")
    assert sup.get(a.id) is a
    assert sup.jobs() == [a, b]
    assert sup.jobs(owner="bob") == [b]
    with pytest.raises(JobNotFound):
        sup.get(str(uuid.uuid4()))


async def test_leaving_the_supervisor_stops_jobs_and_removes_everything():
    async with Supervisor(grace_period_s=0.5) as sup:
        data_dir = sup.data_dir
        polite = await sup.start("sleep", ["600"])
        stubborn = await sup.start("sh", ["-c", IGNORE_TERM])
        await wait_for_output(stubborn, b"ready")
    assert polite.status().state is JobState.STOPPED
    assert polite.status().stop_requested_by == "supervisor shutdown"
    assert stubborn.status().escalated
    assert not data_dir.exists()
    assert job_cgroup_dirs(polite.id) == job_cgroup_dirs(stubborn.id) == []


async def test_leaving_by_exception_stops_jobs_and_propagates(tmp_path):
    with pytest.raises(ZeroDivisionError):
        async with Supervisor(data_dir=tmp_path, grace_period_s=5) as sup:
            job = await sup.start("sleep", ["600"])
            1 / 0  # noqa: B018
    status = job.status()
    assert status.state is JobState.STOPPED and status.exit_code == 143
    assert job_cgroup_dirs(job.id) == []
    assert (tmp_path / "jobs" / job.id).is_dir()  # a given data_dir is kept


async def test_leaving_by_cancellation_stops_jobs(tmp_path):
    with trio.CancelScope() as scope:
        async with Supervisor(data_dir=tmp_path, grace_period_s=5) as sup:
            job = await sup.start(
                "sh",
                ["-c", "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.1; done"],
            )
            await wait_for_output(job, b"ready")
            scope.cancel()
            await trio.sleep_forever()
    status = job.status()
    assert (status.state, status.exit_code) == (JobState.STOPPED, 7)
    # The pumps kept draining during the grace period: the goodbye was captured.
    assert (await read_all(job))[OutputStream.STDOUT] == b"ready\nbye\n"


async def test_start_after_exit_is_refused(tmp_path):
    async with Supervisor(data_dir=tmp_path) as sup:
        pass
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start("true")


async def test_without_cgroups_only_when_asked(tmp_path):
    async with Supervisor(data_dir=tmp_path, cgroups="off", grace_period_s=5) as sup:
        with pytest.raises(InvalidJobSpec, match="without cgroups"):
            await sup.start("true", limits=LimitOverrides(cpu=1))
        job = await sup.start("sh", ["-c", "sleep 600 & echo ready; wait"])
        await wait_for_output(job, b"ready")
        status = await job.stop()
        assert status.state is JobState.STOPPED
        assert status.cgroups == "off" and status.limits is None
        assert status.usage.cpu_s is None  # nothing measured, and nothing pretends to be


async def test_cgroup_cleanup_leaves_no_group(sup):
    job = await sup.start("sleep", ["600"])
    assert job_cgroup_dirs(job.id) != []
    await job.stop()
    assert job_cgroup_dirs(job.id) == []
    assert os.path.isdir(sup.data_dir / "jobs" / job.id)


async def test_jobs_inherit_no_descriptors(sup):
    # A job must not inherit the supervisor's descriptors (other jobs' pipes, log files):
    # otherwise one job's straggler could hold another job's output open.
    other = await sup.start("sleep", ["600"])
    job = await sup.start("ls", ["/proc/self/fd"])
    fds = sorted((await read_all(job))[OutputStream.STDOUT].split())
    await other.stop()
    assert fds == [b"0", b"1", b"2", b"3"]  # 3 is ls's own handle on the directory


async def test_a_cancelled_start_leaves_no_job_and_no_group(sup):
    with trio.CancelScope() as scope:
        scope.cancel()
        await sup.start("sleep", ["600"])
    assert scope.cancelled_caught
    assert sup.jobs() == []
    assert list((sup.data_dir / "jobs").iterdir()) == []


CTRL_C_DURING_SHUTDOWN = """
import signal, sys, trio
from jobworker.supervisor import Supervisor

# Python leaves SIGINT ignored when started so (a test run launched in the background):
# this child is the interactive program whose Ctrl-C we mean to test.
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    async with Supervisor(grace_period_s=1) as sup:
        job = await sup.start("sh", ["-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
        async for chunk in job.output(follow=True):
            break
        print(job.id, flush=True)
    print("unreachable", flush=True)

trio.run(main)
"""


async def test_ctrl_c_during_shutdown_still_cleans_up():
    # Shutdown waits out the grace period of a job that ignores SIGTERM; a Ctrl-C then must
    # unwind everything: no corrupted nursery, no job, no cgroup left.
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", CTRL_C_DURING_SHUTDOWN],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        job_id = (await process.stdout.receive_some(100)).decode().strip()
        assert job_cgroup_dirs(job_id) != []
        process.send_signal(signal.SIGINT)  # arrives while __aexit__ waits for the job
        stderr = b""
        async for data in process.stderr:
            stderr += data
        await process.wait()
    assert b"KeyboardInterrupt" in stderr
    assert b"corrupt" not in stderr.lower()
    assert job_cgroup_dirs(job_id) == []


NOBODY = 65534


def as_nobody(main: Callable[[], Awaitable[str]]) -> str:
    """What trio.run(main) returns in a forked child (jobworker already imported) that dropped
    to nobody first; an exception's repr, prefixed "other: ", if it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                message = trio.run(main)
            except BaseException as exc:
                message = f"other: {exc!r}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


def test_without_cgroup_access_the_supervisor_refuses_and_names_the_fix():
    # As nobody, cgroupfs is not writable.
    async def enter() -> str:
        try:
            async with Supervisor():  # its private data dir is removed on refusal
                pass
        except CgroupsUnavailable as exc:
            return f"refused: {exc}"
        return "entered"

    message = as_nobody(enter)
    # The wording names the file that failed (v1: a group dir; v2: subtree_control); the fix
    # must be there either way.
    assert message.startswith("refused: cannot "), message
    assert "Permission denied" in message
    assert "run jobworker as root" in message and "Delegate=yes" in message
    assert "cgroups='off'" in message


def test_without_root_the_library_runs_jobs_unisolated_and_says_so(shared_path):
    # As a user without privileges, with cgroups="off": jobs run, as that user, in its
    # namespaces, and their status says so.
    data = shared_path / "nobody-data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)

    async def run_one() -> str:
        async with Supervisor(data_dir=data, cgroups="off") as sup:
            assert sup.isolation is None
            status = await (await sup.start("id", ["-u"])).wait()
            out = (await read_all(sup.get(status.id)))[OutputStream.STDOUT].decode()
            return f"{status.state.value} {status.namespaces} {status.run_as.uid} {out}"

    assert as_nobody(run_one) == "finished () 65534 65534\n"


async def test_a_failure_inside_one_job_tree_ends_that_job_not_the_supervisor(
    sup, monkeypatch, caplog
):
    # E.g. an administrator removed the job's cgroup, so killing its stragglers fails. That job
    # ends, the failure is logged, and every other job goes on.
    from jobworker.supervisor import CgroupError
    from jobworker.supervisor.cgroups.group import CgroupGroup

    other = await sup.start("sleep", ["600"])
    real_kill = CgroupGroup.kill
    broken = await sup.start("sh", ["-c", "echo done"])

    async def kill(self):
        if job_id_of(self) == broken.id:
            raise CgroupError("cannot write '1' to cgroup.kill: No such file or directory")
        await real_kill(self)

    def job_id_of(group):
        return next(iter(group.dirs.values())).name

    monkeypatch.setattr(CgroupGroup, "kill", kill)
    with trio.fail_after(30):  # hang guard: a cleanup cut short never marks the job ended
        status = await broken.wait()
    assert status.state is JobState.FINISHED  # its own cleanup still ran to the end
    assert "cgroup.kill" in caplog.text
    assert other.status().state is JobState.RUNNING  # the Supervisor and its other jobs live on
    monkeypatch.setattr(CgroupGroup, "kill", real_kill)
    assert (await other.stop()).state is JobState.STOPPED
    started = await sup.start("true")  # and it still starts new jobs
    assert (await started.wait()).state is JobState.FINISHED
