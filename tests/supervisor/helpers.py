"""Helpers shared by the supervisor tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jobworker.supervisor import Job, OutputStream, Supervisor

# The interpreter for Python snippets run as jobs. An isolated job runs as a transient
# unprivileged user, which cannot reach an interpreter under root's home (pyenv's, or this
# venv's); the system's can be run by anyone.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
IN_V2_VM = os.environ.get("JOBWORKER_IN_CGROUP2_VM") == "1"


async def read_all(job: Job, *, follow: bool = True, offset: int = 0) -> dict[OutputStream, bytes]:
    """Everything a job wrote, per stream, checking offsets are contiguous on the way."""
    parts: dict[OutputStream, list[bytes]] = {OutputStream.STDOUT: [], OutputStream.STDERR: []}
    expected_offset = offset
    async for chunk in job.output(offset, follow=follow):
        assert chunk.offset == expected_offset
        expected_offset += len(chunk.data)
        parts[chunk.stream].append(chunk.data)
    return {stream: b"".join(data) for stream, data in parts.items()}


async def wait_for_output(job: Job, needle: bytes) -> bytes:
    """Follow the job's output until `needle` has appeared; what came so far."""
    seen = b""
    async for chunk in job.output(follow=True):
        seen += chunk.data
        if needle in seen:
            return seen
    raise AssertionError(f"job ended without writing {needle!r}; wrote {seen!r}")


def job_cgroup_dirs(job_id: str) -> list[Path]:
    """Every cgroup directory on this machine named after the job."""
    return [Path(top) / job_id for top, dirs, _ in os.walk("/sys/fs/cgroup") if job_id in dirs]


# A root job without isolation leaving its cgroups: it moves itself into the groups named by
# {procs}, starts a process that ignores SIGTERM in a session of its own (still holding the
# job's output), ignores SIGTERM itself, and says so.
ESCAPE = """
for f in {procs}; do echo $$ > $f; done
setsid sh -c 'trap "" TERM; exec sleep 600' &
trap '' TERM
echo escaped
wait
"""


def host_pid(job: Job, pid_in_job: int) -> int:
    """The pid this process sees for a process the job sees as `pid_in_job` (an isolated job
    has a PID namespace of its own; the job's leader must still run)."""
    leader = job.status().pid
    namespace = os.readlink(f"/proc/{leader}/ns/pid")
    if namespace == os.readlink("/proc/self/ns/pid"):
        return pid_in_job
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/status", encoding="ascii") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()
        except (OSError, StopIteration):
            continue
        if int(nspid[-1]) == pid_in_job:
            return int(entry)
    raise LookupError(f"no process {pid_in_job} in the PID namespace of job {job.id}")


def planned_groups(sup: Supervisor, job_id: str) -> list[Path]:
    """The directories a job with this id gets: one per v1 hierarchy plus the unified leaf
    (where cgroup.kill and cgroup.events are), or the one cgroup2 leaf."""
    backend = sup._backend
    if sup.cgroups == "v2":
        return [backend.subtree / job_id]
    return [base / job_id for base in backend._bases.values()]


def seen_from_inside(group: Path) -> Path:
    """Where an isolated job sees its own `group`: at the mount point of its hierarchy, which
    the cage mounts afresh from the job's cgroup namespace, rooted at that group."""
    from jobworker.supervisor.cgroups.discover import cgroup_filesystems

    points = [point for point, _, _ in cgroup_filesystems()]
    return max((p for p in points if group.is_relative_to(p)), key=lambda p: len(p.parts))
