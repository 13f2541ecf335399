"""Recovery after a crash: the plan (pure), and the executor against a real orphaned job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from jobworker.service.recovery import LOST, plan_recovery, recover
from jobworker.service.store import Record, Run, open_store
from jobworker.supervisor import OutputLog, OutputStream
from jobworker.supervisor.cgroups.discover import current_layout
from jobworker.v1 import jobworker_pb2 as pb

JOB = "5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a51"
OTHER = "6d2c8a2f-4b0e-4a7f-8c3b-1e5d9f8a7b62"


def running(job_id: str, run_id: int) -> Record:
    status = pb.JobStatus(job_id=job_id, owner="alice", state=pb.JOB_STATE_RUNNING, pid=42)
    return Record(
        job_id, "alice", pb.JOB_STATE_RUNNING, 1.0, status.SerializeToString(), run_id=run_id
    )


def test_the_plan_names_only_what_the_records_name() -> None:
    runs = {
        1: Run(1, 100, 0.0, None, ("/cg/pids/jobworker-aa", "/cg/memory/jobworker-aa")),
        2: Run(2, 200, 5.0, 9.0, ("/cg/pids/jobworker-bb",)),  # ended cleanly: empty, removed
    }
    present = {
        Path("/cg/pids/jobworker-aa"),
        Path(f"/cg/pids/jobworker-aa/{JOB}"),
        Path("/cg/memory/jobworker-aa"),  # the job's memory group is already gone
        Path(f"/cg/pids/jobworker-zz/{OTHER}"),  # another server's: never named, never touched
    }
    plan = plan_recovery([running(JOB, 1)], runs, present.__contains__)
    assert [r.job_id for r in plan.lost] == [JOB]
    assert plan.groups == (Path(f"/cg/pids/jobworker-aa/{JOB}"),)
    assert plan.subtrees == (Path("/cg/pids/jobworker-aa"), Path("/cg/memory/jobworker-aa"))
    assert plan.runs == (1, 2)


def test_a_record_whose_run_is_unknown_is_still_ended() -> None:
    plan = plan_recovery([running(JOB, 7)], {}, lambda _: True)
    assert [r.job_id for r in plan.lost] == [JOB] and plan.groups == ()


@pytest.mark.cgroups
@pytest.mark.skipif(os.geteuid() != 0, reason="real cgroups need root")
@pytest.mark.parametrize(
    "unified",
    # With the unified leaf, cgroup.kill does the killing; without it (the leaf already
    # removed when the server died, and no freezer among the groups), a kill loop does.
    [True, False],
    ids=["cgroup.kill", "half-removed"],
)
async def test_an_orphan_of_a_crashed_run_is_killed_its_groups_removed_its_record_lost(
    tmp_path: Path, unified: bool, cgroup_name: str
) -> None:
    # What a crashed server leaves: a subtree per hierarchy, a job group in it, a process in
    # that group still running, a record that says "running", a run that never ended.
    layout = current_layout()
    name = cgroup_name
    own = [layout.v1[c] for c in ("pids", "memory") if c in layout.v1]
    if unified and layout.unified is not None:
        own.append(layout.unified)
    if not own:
        pytest.skip("no v1 hierarchies here to leave a group in")
    subtrees = [d / name for d in own]
    groups = [s / JOB for s in subtrees]
    for directory in (*subtrees, *groups):
        directory.mkdir()
    procs = [os.fsencode(g / "cgroup.procs") for g in groups]

    def enter() -> None:  # the orphan's own placement, before exec
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)

    orphan = await trio.lowlevel.open_process(
        ["sleep", "600"], preexec_fn=enter, start_new_session=True
    )
    data_dir = tmp_path / "data"
    output = OutputLog(data_dir / "jobs" / JOB)  # what it wrote before the crash
    output.append(OutputStream.STDOUT, b"before the crash\n")
    output.close()
    (data_dir / "work" / JOB).mkdir(parents=True)
    store = await open_store(data_dir / "jobworker.db")
    try:
        run_id = await store.begin_run(99999, [str(s) for s in subtrees])
        await store.insert(running(JOB, run_id))
        assert str(orphan.pid) in groups[0].joinpath("cgroup.procs").read_text().split()

        plan = await recover(store, data_dir)

        assert [r.job_id for r in plan.lost] == [JOB]
        with trio.fail_after(10):
            assert await orphan.wait() == -9
        assert not any(d.exists() for d in (*groups, *subtrees))
        assert not (data_dir / "work" / JOB).exists()  # its working directory too
        record = await store.get(JOB)
        status = pb.JobStatus.FromString(record.status)
        assert (status.state, status.error) == (pb.JOB_STATE_FAILED, LOST)
        assert not status.HasField("exit_code") and not status.HasField("end_time")
        assert record.ended_at is not None  # for retention
        assert await store.unfinished() == []
        assert (await store.runs())[run_id].ended_at is not None
        # Its output up to the crash stays readable, and the record knows how much there is.
        assert record.output_end == len(b"before the crash\n") == record.output_bytes
        kept = OutputLog.reopen(data_dir / "jobs" / JOB)
        assert [c.data async for c in kept.reader()] == [b"before the crash\n"]
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()
        for directory in (*groups, *subtrees):
            if directory.exists():
                directory.rmdir()
        await store.aclose()
