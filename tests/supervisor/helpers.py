"""Helpers shared by the supervisor tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jobworker.supervisor import Job, OutputStream

PYTHON = sys.executable
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
