"""Limits enforced for real by the kernel, and exit causes read from the job's own counters.

These run on our hybrid machines (v1 controllers) and, through tools/cgroup2_vm.sh, on a
v2-only kernel. No assertion here is a performance figure: each checks a kernel-enforced bound
(a throttled job cannot go faster than its limit, however slow the machine).
"""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
import trio

from jobworker.supervisor import JobState, LimitOverrides, OutputStream, Supervisor
from jobworker.supervisor.cgroups.backends import V1Backend
from jobworker.supervisor.cgroups.discover import current_layout
from jobworker.supervisor.spawn import spawn

from .helpers import IN_V2_VM, PYTHON, read_all

pytestmark = pytest.mark.cgroups
MiB = 2**20


def py(code: str) -> list[str]:
    return ["-c", textwrap.dedent(code)]


async def test_cpu_is_throttled_to_its_share(sup):
    job = await sup.start(
        PYTHON,
        py("""
            import time
            wall0, cpu0 = time.monotonic(), time.process_time()
            while time.monotonic() - wall0 < 1.0:
                pass
            print(time.process_time() - cpu0, time.monotonic() - wall0)
        """),
        limits=LimitOverrides(cpu=0.1),
    )
    out = (await read_all(job))[OutputStream.STDOUT].split()
    cpu_s, wall_s = float(out[0]), float(out[1])
    status = await job.wait()
    assert status.state is JobState.FINISHED
    # A busy loop alone on a core would get ~100%; the quota holds it near 10%. A small share:
    # on a machine busy with other work (another suite) the loop still wants more than its
    # quota, so it is throttled; at half a core it might get no more than that anyway.
    assert cpu_s / wall_s < 0.3
    assert status.usage.cpu_throttled_s > 0
    assert status.usage.cpu_s >= cpu_s * 0.9  # the cgroup saw (at least) what the job used


async def test_memory_over_the_limit_is_oom_killed_and_reported_as_such(sup):
    job = await sup.start(
        PYTHON,
        py("""
            chunks = []
            for _ in range(64):
                chunks.append(b"\\x01" * (8 << 20))  # touched, so really resident
            print("survived")
        """),
        limits=LimitOverrides(memory_bytes=64 * MiB),
    )
    status = await job.wait()
    assert status.oom_killed
    assert (status.state, status.exit_code, status.signal) == (JobState.FAILED, 137, 9)
    assert b"survived" not in (await read_all(job))[OutputStream.STDOUT]


async def test_a_plain_sigkill_is_not_mistaken_for_oom(sup):
    job = await sup.start("sh", ["-c", "kill -KILL $$"])
    status = await job.wait()
    assert status.exit_code == 137 and not status.oom_killed  # never guessed from 137


async def test_pids_limit_makes_fork_fail(sup):
    job = await sup.start(
        PYTHON,
        py("""
            import os, signal
            children = 0
            try:
                while children < 100:
                    if os.fork() == 0:
                        signal.pause()
                    children += 1
            except BlockingIOError:
                print("EAGAIN after", children)
        """),
        limits=LimitOverrides(pids=16),
    )
    out = (await read_all(job))[OutputStream.STDOUT].split()
    status = await job.wait()
    assert out[:2] == [b"EAGAIN", b"after"] and int(out[2]) < 16
    assert status.pids_limit_hit
    assert status.state is JobState.FINISHED  # its children were cleaned up with the group


DIRECT_IO = """
    import mmap, os, sys, time
    mode, path, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 64 * 1024  # one IO each
    block = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT requires
    block.write(b"x" * len(block))
    flags = os.O_DIRECT | (os.O_WRONLY | os.O_CREAT if mode == "write" else os.O_RDONLY)
    fd = os.open(path, flags, 0o600)
    start = time.monotonic()
    done = 0
    while done < total:
        n = os.write(fd, block) if mode == "write" else os.readv(fd, [block])
        assert n > 0
        done += n
    os.fsync(fd)
    print(time.monotonic() - start)
"""


@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "unisolated"])
@pytest.mark.parametrize("mode", ["write", "read"])
async def test_direct_io_is_throttled(shared_path, mode, isolation):
    # O_DIRECT needs a real block device under the file: shared_path is on one (in the VM, the
    # runner's scratch disk), and so is the data directory, which holds each job's working
    # directory, where the writer writes (a transient user may write nowhere else).
    path = shared_path / "jobworker-io-test-read"
    total = 3 * MiB
    if mode == "read":
        path.write_bytes(os.urandom(total))
        path.chmod(0o644)
    data_dir = shared_path / "data"
    async with Supervisor(data_dir=data_dir, isolation=isolation) as sup:
        job = await sup.start(
            PYTHON,
            [*py(DIRECT_IO), mode, str(path) if mode == "read" else "written", str(total)],
            limits=LimitOverrides(io_read_bps=MiB, io_write_bps=MiB),
        )
        out = await read_all(job)
        status = await job.wait()
        assert status.state is JobState.FINISHED, out
        # 3 MiB at 1 MiB/s cannot take much less than 3 s (the throttle allows a short
        # initial burst); unthrottled it takes milliseconds.
        assert float(out[OutputStream.STDOUT]) > 1.5
        moved = status.usage.io_write_bytes if mode == "write" else status.usage.io_read_bytes
        assert moved >= total


@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "unisolated"])
@pytest.mark.parametrize("mode", ["write", "read"])
async def test_direct_iops_are_throttled(shared_path, mode, isolation):
    # As the bandwidth test, counting operations: 4 KiB direct IOs, one request each, so the
    # bandwidth (the 100M/s default) is never what holds the job back.
    path = shared_path / "jobworker-iops-test-read"
    block, ops = 4096, 300
    total = block * ops
    if mode == "read":
        path.write_bytes(os.urandom(total))
        path.chmod(0o644)
    data_dir = shared_path / "data"
    async with Supervisor(data_dir=data_dir, isolation=isolation) as sup:
        target = str(path) if mode == "read" else "written"
        job = await sup.start(
            [PYTHON, *py(DIRECT_IO), mode, target, str(total), str(block)],
            limits=LimitOverrides(io_read_iops=100, io_write_iops=100),
        )
        out = await read_all(job)
        status = await job.wait()
        assert status.state is JobState.FINISHED, out
        assert (status.limits.io_read_iops, status.limits.io_write_iops) == (100, 100)
        # 300 operations at 100 per second cannot take much less than 3 s (after the short
        # initial burst the throttle allows); unthrottled they take milliseconds.
        assert float(out[OutputStream.STDOUT]) > 1.5
        moved = status.usage.io_write_bytes if mode == "write" else status.usage.io_read_bytes
        assert moved >= total


@pytest.mark.skipif(IN_V2_VM, reason="the freezer is the v1 fallback; v2 always has cgroup.kill")
async def test_v1_freezer_kill_takes_a_whole_forking_tree(cgroup_name):
    # Without a unified hierarchy, tree kill goes through the freezer: frozen processes cannot
    # fork, so one pass of SIGKILL gets them all.
    backend = V1Backend(current_layout(), cgroup_name, use_unified=False)
    try:
        group = backend.create("job", LimitOverrides() and _limits(), "/")
        spawned = await spawn(
            ["sh", "-c", "trap '' TERM; for i in 1 2 3 4; do sleep 600 & done; echo ready; wait"],
            env={"PATH": os.environ["PATH"]},
            cwd="/",
            procs_files=group.procs_files,
        )
        assert await spawned.stdout.receive_some(100) == b"ready\n"
        assert len(_procs(group)) == 5
        group.signal(signal.SIGTERM)  # ignored by all of them
        await group.kill()
        assert await spawned.process.wait() == -signal.SIGKILL
        with trio.fail_after(10):
            await group.wait_empty()
        assert _procs(group) == []
        await spawned.stdout.aclose()
        await spawned.stderr.aclose()
        await group.remove()
        assert not any(d.exists() for d in group.dirs.values())
    finally:
        await backend.aclose()


def _limits():
    from jobworker.supervisor import Limits

    return Limits()


def _procs(group) -> list[int]:
    return [int(p) for p in (group.dirs["freezer"] / "cgroup.procs").read_text().split()]
