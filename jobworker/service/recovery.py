"""After a crash: the jobs the store still records as running, ended for real.

A server that stops cleanly records every job's end. One that is killed leaves records of jobs
that were running, and whatever those jobs left in their cgroups: isolated jobs die with the
server (the cage's lifeline), unisolated ones may run on as orphans. At its next start, before
anything else, the server runs `recover`:

- the plan (`plan_recovery`) is a pure function of the records, the runs that made them (and
  the cgroup subtrees each run made), and which of those directories still exist: testable
  without a kernel;
- the executor kills what is left in each lost job's groups, removes the groups and the runs'
  subtrees, removes the lost jobs' working directories, and records each job as ended: state
  failed, exit code unknown, "lost: the server stopped while it ran". Their output stays.

Only what the store names is touched: another server's cgroups (several may share a machine)
are never swept. Reattaching to a job that still runs is not attempted: its exit code could
never be known for real (its parent, the old server, is gone).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from jobworker.supervisor import OutputLog
from jobworker.supervisor.cgroups import fs
from jobworker.supervisor.cgroups.group import CgroupGroup, left_behind
from jobworker.supervisor.errors import CgroupError
from jobworker.v1 import jobworker_pb2 as pb

from . import convert
from .store import JobStore, Record, Run

log = logging.getLogger("jobworker.service")

LOST = "lost: the server stopped while it ran"
# How long the processes of one lost job get to die after SIGKILL before we give up on them.
_KILL_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    lost: tuple[Record, ...]  # records to end as lost
    groups: tuple[Path, ...]  # their cgroup directories still present: kill, then remove
    subtrees: tuple[Path, ...]  # the crashed runs' subtrees still present: remove once empty
    runs: tuple[int, ...]  # runs to mark over (and forget, once no record refers to them)


def plan_recovery(
    unfinished: list[Record], runs: dict[int, Run], exists: Callable[[Path], bool]
) -> RecoveryPlan:
    """What to do at a start: every unfinished record is lost (no job runs yet), with the
    groups its run made for it; every run's subtrees go (the runs are all over)."""
    groups: list[Path] = []
    for record in unfinished:
        run = runs.get(record.run_id)
        for subtree in run.subtrees if run else ():
            group = Path(subtree) / record.job_id
            if exists(group):
                groups.append(group)
    subtrees = [Path(s) for run in runs.values() for s in run.subtrees if exists(Path(s))]
    return RecoveryPlan(
        lost=tuple(unfinished),
        groups=tuple(groups),
        subtrees=tuple(subtrees),
        runs=tuple(runs),
    )


async def recover(store: JobStore, data_dir: Path) -> RecoveryPlan:
    """Carry out `plan_recovery` for the store of `data_dir`; the plan, for the caller's log."""
    plan = plan_recovery(await store.unfinished(), await store.runs(), lambda p: p.exists())
    for record in plan.lost:
        dirs = [group for group in plan.groups if group.name == record.job_id]
        if dirs:
            await _kill_and_remove(left_behind(dirs))
    for subtree in plan.subtrees:
        left = fs.subgroups(subtree)
        if left:
            log.error("recovery: cgroup %s left in place: it still holds %s", subtree, left)
            continue
        try:
            await fs.rmdir(subtree)
        except CgroupError as exc:
            log.error("recovery: %s", exc)
    now = time.time()
    for record in plan.lost:
        kept = await trio.to_thread.run_sync(_tidy_job_files, data_dir, record.job_id)
        await store.update(lost(record, now, kept))
        log.warning("recovery: job %s of %s %s", record.job_id, record.owner, LOST)
    await store.end_runs(plan.runs)
    return plan


def _tidy_job_files(data_dir: Path, job_id: str) -> tuple[int, int]:
    """Remove a lost job's working directory; (bytes stored, end offset) of its output."""
    shutil.rmtree(data_dir / "work" / job_id, ignore_errors=True)
    try:
        output = OutputLog.reopen(data_dir / "jobs" / job_id)
    except (FileNotFoundError, RuntimeError) as exc:
        log.error("recovery: the output of job %s cannot be read: %s", job_id, exc)
        return 0, 0
    return output.stored_bytes, output.end_offset


def lost(record: Record, now: float, kept: tuple[int, int] = (0, 0)) -> Record:
    """The record of a job whose server stopped while it ran: failed, exit code unknown. Its
    end time is unknown too: the status says none (the record keeps `now`, for retention).
    `kept`: what its output holds on disk, (bytes stored, end offset)."""
    status = convert.stored_status(record.status)
    status.state = pb.JOB_STATE_FAILED
    status.error = LOST
    status.ClearField("exit_code")
    status.ClearField("signal")
    status.ClearField("end_time")
    return Record(
        job_id=record.job_id,
        owner=record.owner,
        state=pb.JOB_STATE_FAILED,
        created_at=record.created_at,
        status=status.SerializeToString(),
        ended_at=now,
        output_bytes=kept[0],
        output_end=kept[1],
        run_id=record.run_id,
    )


async def _kill_and_remove(group: CgroupGroup) -> None:
    """Kill what a lost job left in its group, the way a live job's group is killed (the
    kernel's cgroup.kill, or the v1 freezer), wait until it is empty (bounded), remove it."""
    try:
        await group.kill()
        with trio.move_on_after(_KILL_WAIT_S) as waited:
            await group.wait_empty()
        if waited.cancelled_caught:
            left = sorted({p for f in group.procs_files for p in fs.pids(f)})
            log.error("recovery: processes %s outlived SIGKILL; %s stays", left, group.dirs)
            return
        await group.remove()
    except (CgroupError, OSError) as exc:
        log.error("recovery: %s", exc)
