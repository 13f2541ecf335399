"""`jobctl top`: live CPU, memory and IO of running jobs, as docker stats and systemd-cgtop.

How: ListJobs(states=[RUNNING]) again every interval, one call (a page per 500 jobs) for all
the jobs shown. Each JobStatus carries the job's cumulative counters (cpu_seconds,
io_read_bytes, io_write_bytes) and its memory now; a rate is the difference of two samples
over the time between them. So the first frame needs two samples: the first is taken a short
window before it (docker stats --no-stream waits for its second sample the same way). A job
seen once only (it started between the samples) shows "-" for its rates until the next frame.

The time between samples is measured here, on the client's monotonic clock, when each answer
arrives: the server's clock is not in the answer, and a poll's own latency is the same on both
ends of the window, so it cancels out of the difference.

The arithmetic and the layout are pure functions (`top_rows`, `format_top`), tested without a
server; `run_top` only samples, sleeps and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from jobworker.v1 import jobworker_pb2 as pb

from .client import JobClient
from .formatting import align, command_line, human_bytes
from .terminal import printable

FIRST_WINDOW_S = 1.0  # the most the first frame waits for its second sample
SHORT_ID_CHARS = 12  # as docker shows container ids: a prefix jobctl accepts as an id
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen: each frame redraws in place


@dataclass(frozen=True, slots=True)
class Sample:
    """Running jobs as one ListJobs answered them, and when (seconds, monotonic)."""

    at_s: float
    jobs: Sequence[pb.JobStatus]


@dataclass(frozen=True, slots=True)
class TopRow:
    job_id: str
    name: str
    owner: str
    cpu_percent: float | None  # of one core, as docker: 200 is two cores busy
    memory_bytes: int | None
    memory_limit_bytes: int | None
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    command: str


def top_rows(previous: Sample | None, current: Sample) -> list[TopRow]:
    """One row per job of `current`, in its order, with rates over the time since `previous`
    (None where the job has no earlier sample, or the server does not count that figure)."""
    before = {job.job_id: job.usage for job in previous.jobs} if previous is not None else {}
    elapsed_s = current.at_s - previous.at_s if previous is not None else 0.0
    rows: list[TopRow] = []
    for job in current.jobs:
        usage, then = job.usage, before.get(job.job_id)

        def rate(field: str, usage=usage, then=then) -> float | None:
            if then is None or elapsed_s <= 0:
                return None
            if not (usage.HasField(field) and then.HasField(field)):
                return None
            # A counter never goes back; if it seems to (a new cgroup), say nothing rather
            # than a negative rate.
            return max(0.0, getattr(usage, field) - getattr(then, field)) / elapsed_s

        cpu = rate("cpu_seconds")
        rows.append(
            TopRow(
                job_id=job.job_id,
                name=job.name,
                owner=job.owner,
                cpu_percent=None if cpu is None else cpu * 100,
                memory_bytes=usage.memory_bytes if usage.HasField("memory_bytes") else None,
                memory_limit_bytes=(
                    job.limits.memory_bytes if job.limits.HasField("memory_bytes") else None
                ),
                read_bytes_per_s=rate("io_read_bytes"),
                write_bytes_per_s=rate("io_write_bytes"),
                command=command_line(job),
            )
        )
    return rows


def format_top(rows: Sequence[TopRow], *, owners: bool) -> str:
    """The table: a header, then one line per job. `owners`: an OWNER column (--all)."""
    named = any(row.name for row in rows)
    header = [
        "JOB ID",
        *(["NAME"] if named else []),
        *(["OWNER"] if owners else []),
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "READ/s",
        "WRITE/s",
        "COMMAND",
    ]
    lines = [header]
    for row in rows:
        memory = "-" if row.memory_bytes is None else human_bytes(row.memory_bytes)
        limit = "-" if row.memory_limit_bytes is None else human_bytes(row.memory_limit_bytes)
        share = (
            f"{100 * row.memory_bytes / row.memory_limit_bytes:.1f}%"
            if row.memory_bytes is not None and row.memory_limit_bytes
            else "-"
        )
        lines.append(
            [
                row.job_id[:SHORT_ID_CHARS],
                *([printable(row.name) or "-"] if named else []),
                *([printable(row.owner) or "-"] if owners else []),
                "-" if row.cpu_percent is None else f"{row.cpu_percent:.1f}%",
                f"{memory} / {limit}",
                share,
                _rate(row.read_bytes_per_s),
                _rate(row.write_bytes_per_s),
                row.command,
            ]
        )
    first_figure = 1 + named + owners
    return align(lines, right=frozenset(range(first_figure, first_figure + 5)))


def _rate(bytes_per_s: float | None) -> str:
    return "-" if bytes_per_s is None else f"{human_bytes(round(bytes_per_s))}/s"


async def sample(client: JobClient, *, all_jobs: bool) -> Sample:
    request = pb.ListJobsRequest(all=all_jobs, states=[pb.JOB_STATE_RUNNING])
    jobs = await client.list(request)
    return Sample(trio.current_time(), jobs)


async def run_top(
    client: JobClient,
    *,
    all_jobs: bool,
    interval_s: float,
    stream: bool,
    terminal: bool,
    write: Callable[[str], None],
) -> None:
    """Write a frame every `interval_s` (one only unless `stream`): on a `terminal` over the
    last one, otherwise appended after a blank line (a log of frames)."""
    previous = await sample(client, all_jobs=all_jobs)
    await trio.sleep(min(interval_s, FIRST_WINDOW_S))
    first = True
    while True:
        current = await sample(client, all_jobs=all_jobs)
        table = format_top(top_rows(previous, current), owners=all_jobs)
        if terminal:
            write(CLEAR_SCREEN + table)
        else:
            write(table if first else "\n" + table)
        if not stream:
            return
        first, previous = False, current
        await trio.sleep(interval_s)
