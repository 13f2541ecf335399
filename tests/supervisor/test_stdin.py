"""A job's stdin: byte-exact through the cage, EOF passed on, backpressure, and a clear error
(never a hang) for a writer whose job no longer reads."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.supervisor import InvalidJobSpec, JobState, OutputStream, Supervisor

from .helpers import PYTHON, host_pid, read_all, wait_for_output

pytestmark = pytest.mark.cgroups
MiB = 2**20
# Each test that waits on a job's stdin fails instead of hanging, should the code under test
# hang: a guard, never a measurement.
HANG_GUARD_S = 60


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def sha256_of_what_the_job_read(job) -> str:
    out = (await read_all(job))[OutputStream.STDOUT]
    return out.split()[0].decode()


class ChunkedSource(trio.abc.ReceiveStream):
    """A ReceiveStream handing out `data` in uneven pieces, as a network peer would."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data = memoryview(data)
        self._random = random.Random(seed)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = self._random.randint(1, 200_000)
        if max_bytes is not None:
            size = min(size, max_bytes)
        piece, self._data = bytes(self._data[:size]), self._data[size:]
        return piece

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("form", ["bytes", "stream", "pipe"])
async def test_binary_stdin_arrives_byte_exact(sup, form):
    data = random_bytes(6 * MiB + 12345, seed=1)  # every byte value, NULs and newlines included
    with trio.fail_after(HANG_GUARD_S):
        if form == "bytes":
            job = await sup.start(["sha256sum"], stdin=data)
        elif form == "stream":
            job = await sup.start(["sha256sum"], stdin=ChunkedSource(data, seed=2))
        else:
            job = await sup.start(["sha256sum"], stdin=subprocess.PIPE)
            pieces = random.Random(3)
            view = memoryview(data)
            while view:
                size = pieces.randint(1, 300_000)
                await job.stdin.send_all(view[:size])
                view = view[size:]
            await job.stdin.aclose()  # EOF: sha256sum prints only once it has read all
        assert await sha256_of_what_the_job_read(job) == hashlib.sha256(data).hexdigest()
        status = await job.wait()
    assert status.state is JobState.FINISHED


async def test_eof_is_passed_on_and_cat_ends(sup):
    job = await sup.start(["cat"], stdin=subprocess.PIPE)
    with trio.fail_after(HANG_GUARD_S):
        await job.stdin.send_all(b"one\n")
        assert await wait_for_output(job, b"one\n") == b"one\n"  # cat got it before EOF
        await job.stdin.send_all(b"two\n")
        await job.stdin.aclose()
        status = await job.wait()
    assert status.state is JobState.FINISHED
    assert (await read_all(job))[OutputStream.STDOUT] == b"one\ntwo\n"


async def test_without_stdin_the_job_reads_dev_null(sup):
    # The null device itself (1:3), by number: its path, as a job sees it, depends on where
    # the supervisor's root is (in the cgroup v2 VM, a chroot).
    show = "import os; d = os.fstat(0).st_rdev; print(os.major(d), os.minor(d))"
    job = await sup.start([PYTHON, "-c", show])
    assert (await read_all(job))[OutputStream.STDOUT] == b"1 3\n"
    assert job.stdin is None
    fed = await sup.start(["cat"], stdin=b"x")
    assert fed.stdin is None  # fed by the job's own tree: nothing for the caller to write
    assert (await fed.wait()).state is JobState.FINISHED


SHOW_FDS = textwrap.dedent("""
    import os, sys
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    print(fds, os.readlink("/proc/self/fd/0"), flush=True)
    sys.stdin.buffer.read()
""")


async def test_the_pipe_is_the_jobs_fd_0_and_nothing_else_holds_it(sup):
    job = await sup.start([PYTHON, "-c", SHOW_FDS], stdin=subprocess.PIPE)
    line = (await wait_for_output(job, b"\n")).decode()
    our_end = f"pipe:[{os.fstat(job.stdin._stream.fileno()).st_ino}]"
    # 0, 1, 2 and listdir's own handle on the directory: nothing of the cage's leaked in.
    assert line.split("] ")[0] == "[0, 1, 2, 3" and line.split("] ")[1].strip() == our_end
    holders = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            links = {
                os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")
            }
        except OSError:
            continue
        if our_end in links:
            holders.add(int(entry))
    # The job's leader alone: not the cage's keeper or init, nor another process of ours.
    assert holders == {host_pid(job, 2) if sup.isolation else job.status().pid}
    with trio.fail_after(HANG_GUARD_S):
        await job.stdin.aclose()
        assert (await job.wait()).state is JobState.FINISHED


async def test_a_job_that_never_reads_holds_its_writer_back_until_stopped(sup):
    job = await sup.start(["sleep", "600"], stdin=subprocess.PIPE)
    written = 0
    failure: list[BaseException] = []

    async def write_for_ever() -> None:
        nonlocal written
        try:
            while True:
                await job.stdin.send_all(b"\0" * 4096)
                written += 4096
        except trio.BrokenResourceError as exc:
            failure.append(exc)

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_for_ever)
            await trio.testing.wait_all_tasks_blocked()
            # Blocked on a full pipe: what was accepted is bounded by the pipe, not growing.
            blocked_at = written
            assert 0 < blocked_at <= int(Path("/proc/sys/fs/pipe-max-size").read_text())
            await trio.testing.wait_all_tasks_blocked()
            assert written == blocked_at
            status = await job.stop(requested_by="test")
    assert status.state is JobState.STOPPED
    (error,) = failure
    assert f"job {job.id} no longer reads its stdin" in str(error)
    # After the end: an immediate, clear error, never a hang; closing stays harmless.
    with pytest.raises(trio.BrokenResourceError, match=f"job {job.id} has ended"):
        await job.stdin.send_all(b"more")
    await job.stdin.aclose()


async def test_a_job_that_exits_early_breaks_its_writer(sup):
    job = await sup.start(["head", "-c", "10"], stdin=subprocess.PIPE)
    with trio.fail_after(HANG_GUARD_S):
        with pytest.raises(trio.BrokenResourceError, match=r"no longer reads its stdin|has ended"):
            while True:
                await job.stdin.send_all(random_bytes(MiB, seed=4))
        status = await job.wait()
    assert status.state is JobState.FINISHED
    assert (await read_all(job))[OutputStream.STDOUT] == random_bytes(MiB, seed=4)[:10]


async def test_fed_input_a_job_does_not_read_is_dropped_quietly(sup):
    # As trio.run_process: the job decides how much of its input it wants.
    with trio.fail_after(HANG_GUARD_S):
        status = await sup.run(["head", "-c", "3"], stdin=random_bytes(4 * MiB, seed=5))
        never_reads = await sup.run(["true"], stdin=ChunkedSource(random_bytes(MiB, 6), seed=7))
    assert status.state is never_reads.state is JobState.FINISHED
    assert (await read_all(sup.get(status.id)))[OutputStream.STDOUT] == random_bytes(4 * MiB, 5)[:3]


async def test_a_job_that_could_not_be_created_has_a_broken_stdin(sup):
    job = await sup.start(["/nonexistent/program"], stdin=subprocess.PIPE)
    assert job.status().state is JobState.ERROR
    with pytest.raises(trio.BrokenResourceError, match="has ended"):
        await job.stdin.send_all(b"x")


async def test_a_failing_source_ends_the_input(sup):
    class Failing(trio.abc.ReceiveStream):
        sent = False

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            if self.sent:
                raise OSError("the peer went away")
            self.sent = True
            return b"partial"

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    with trio.fail_after(HANG_GUARD_S):
        status = await sup.run(["cat"], stdin=Failing())
    assert status.state is JobState.FINISHED  # cat read EOF after what came
    assert (await read_all(sup.get(status.id)))[OutputStream.STDOUT] == b"partial"


async def test_bad_stdin_is_refused(tmp_path):
    async with Supervisor(data_dir=tmp_path, isolation=False) as sup:
        with pytest.raises(InvalidJobSpec, match="encode text first"):
            await sup.start(["cat"], stdin="text")
        with pytest.raises(InvalidJobSpec, match="not int"):
            await sup.start(["cat"], stdin=0)
        with pytest.raises(InvalidJobSpec, match="run\\(\\) gives no handle"):
            await sup.run(["cat"], stdin=subprocess.PIPE)
        assert sup.jobs() == []
