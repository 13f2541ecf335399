"""jobctl's layouts as pure functions of JobStatus messages: seed 000 exactly, then our fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from jobworker._pb.jobworker.v1 import jobworker_pb2 as pb
from jobworker.cli.formatting import format_list, format_status, to_json

ID = "0b8e3c57-6f1d-4c5e-9a39-3f0f6d2c9a11"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def job(**fields) -> pb.JobStatus:
    status = pb.JobStatus(job_id=ID, owner="alice", cgroups="v2", **fields)
    status.created_at.FromDatetime(T0)
    return status


def started(status: pb.JobStatus, ran_s: float | None = None) -> pb.JobStatus:
    status.started_at.FromDatetime(T0)
    if ran_s is not None:
        status.ended_at.FromDatetime(T0 + timedelta(seconds=ran_s))
    return status


def test_seed_running_layout_then_our_fields() -> None:
    status = started(job(command="yes", state=pb.JOB_STATE_RUNNING, pid=4242))
    status.limits.cpu = 0.5
    status.limits.memory_bytes = 2**30
    status.limits.io_read_bytes_per_second = 100 * 2**20
    status.limits.io_write_bytes_per_second = 100 * 2**20
    status.limits.pids = 4096
    status.usage.cpu_seconds = 1.234
    status.usage.memory_peak_bytes = 3 * 2**20
    text = format_status(status, now=T0 + timedelta(seconds=5), tz=UTC)
    assert text == (
        f"Job:         {ID}\n"
        "Status:      running\n"
        "Command:     yes\n"
        "Owner:       alice\n"
        "PID:         4242\n"
        "Started:     2025-03-01 12:00:00 UTC (5s ago)\n"
        "Limits:      cpu 0.5, memory 1G, io read 100M/s, io write 100M/s, pids 4096 (cgroup v2)\n"
        "Usage:       cpu 1.23s, memory peak 3M\n"
    )


def test_seed_finished_and_failed() -> None:
    finished = started(job(command="echo", args=["hello"], state=pb.JOB_STATE_FINISHED,
                           exit_code=0), ran_s=0.25)  # fmt: skip
    assert format_status(finished, tz=UTC).splitlines() == [
        f"Job:         {ID}",
        "Status:      finished",
        "Command:     echo hello",
        "Exit Code:   0",
        "Owner:       alice",
        "Started:     2025-03-01 12:00:00 UTC",
        "Ended:       2025-03-01 12:00:00 UTC (ran 250ms)",
    ]
    failed = started(job(command="curl", args=["http://localhost"], state=pb.JOB_STATE_FAILED,
                         exit_code=1), ran_s=1)  # fmt: skip
    assert format_status(failed, tz=UTC).splitlines()[:4] == [
        f"Job:         {ID}",
        "Status:      failed",
        "Command:     curl http://localhost",
        "Exit Code:   1",
    ]


def test_seed_stopped_by_sigterm_and_by_sigkill() -> None:
    term = started(job(command="curl", args=["http://localhost"], state=pb.JOB_STATE_STOPPED,
                       exit_code=143, signal=15, stop_requested_by="alice"), ran_s=2)  # fmt: skip
    lines = format_status(term, tz=UTC).splitlines()
    assert lines[3:6] == ["Exit Code:   143", "Owner:       alice", "Signal:      SIGTERM"]
    assert "Reason:      stopped by alice" in lines
    kill = started(job(command="curl", args=["http://localhost"], state=pb.JOB_STATE_STOPPED,
                       exit_code=137, signal=9, stop_requested_by="carol", escalated=True),
                   ran_s=12)  # fmt: skip
    lines = format_status(kill, tz=UTC).splitlines()
    assert lines[:4] == [
        f"Job:         {ID}",
        "Status:      stopped",
        "Command:     curl http://localhost",
        "Exit Code:   137",
    ]
    assert "Signal:      SIGKILL" in lines
    assert "Reason:      stopped by carol; killed with SIGKILL after the grace period" in lines
    assert "Ended:       2025-03-01 12:00:12 UTC (ran 12s)" in lines


def test_seed_creation_error() -> None:
    status = job(command="foobar", state=pb.JOB_STATE_ERROR,
                 error="cannot run 'foobar': No such file or directory")  # fmt: skip
    status.ended_at.FromDatetime(T0)
    assert format_status(status, tz=UTC).splitlines() == [
        f"Job:         {ID}",
        "Status:      error",
        "Command:     foobar",
        "Owner:       alice",
        "Reason:      cannot run 'foobar': No such file or directory",
    ]


def test_oom_pids_and_no_cgroups() -> None:
    status = started(job(command="sh", args=["-c", "x=$(yes)"], state=pb.JOB_STATE_FAILED,
                         exit_code=137, signal=9, oom_killed=True, pids_limit_hit=True),
                     ran_s=3)  # fmt: skip
    status.cgroups = "off"
    lines = format_status(status, tz=UTC).splitlines()
    assert "Command:     sh -c 'x=$(yes)'" in lines
    assert (
        "Reason:      out of memory (killed by the kernel's OOM killer); "
        "reached its pids limit (a fork failed)"
    ) in lines
    assert "Limits:      none (the server runs without cgroups)" in lines


def test_list_is_aligned_with_a_header() -> None:
    short = started(job(command="sleep", args=["1"], state=pb.JOB_STATE_RUNNING))
    other = started(job(command="sh", args=["-c", "exit 4"], state=pb.JOB_STATE_FAILED,
                        exit_code=4), ran_s=1)  # fmt: skip
    other.job_id, other.owner = "x", "bartholomew"
    lines = format_list([short, other], tz=UTC).splitlines()
    assert lines == [
        "JOB ID" + " " * 32 + "OWNER        STATUS   EXIT  STARTED              COMMAND",
        f"{ID}  alice        running  -     2025-03-01 12:00:00  sleep 1",
        "x" + " " * 37 + "bartholomew  failed   4     2025-03-01 12:00:00  sh -c 'exit 4'",
    ]
    assert format_list([]) == "JOB ID  OWNER  STATUS  EXIT  STARTED  COMMAND\n"


def test_json_uses_proto_field_names_and_writes_every_field() -> None:
    status = json.loads(to_json(job(command="true", state=pb.JOB_STATE_RUNNING)))
    assert status["job_id"] == ID
    assert status["state"] == "JOB_STATE_RUNNING"
    assert status["args"] == [] and status["escalated"] is False
    assert "exit_code" not in status  # unset until the job ends


def test_who_ran_it_how_it_was_kept_and_what_the_kernel_does_not_enforce() -> None:
    status = started(job(command="make", state=pb.JOB_STATE_RUNNING, pid=4242))
    status.run_as.uid = status.run_as.gid = 70012
    status.run_as.transient = True
    status.namespaces.extend(["pid", "mount", "ipc", "uts", "cgroup", "net"])
    status.network = pb.NETWORK_NONE
    status.limit_caveats.append("io write limit: buffered writes are not throttled")
    status.cgroups, status.limits.pids = "v1", 64
    lines = format_status(status, now=T0, tz=UTC).splitlines()
    assert lines[-4:] == [
        "User:        transient uid 70012 (gid 70012, no account)",
        "Isolation:   namespaces pid, mount, ipc, uts, cgroup, net; network none (loopback only)",
        "Limits:      pids 64 (cgroup v1)",
        "Note:        io write limit: buffered writes are not throttled",
    ]
    status.run_as.Clear()
    status.run_as.user, status.run_as.uid, status.run_as.gid = "alice", 1000, 100
    del status.namespaces[:]
    assert format_status(status, now=T0, tz=UTC).splitlines()[-4:-2] == [
        "User:        alice (uid 1000, gid 100)",
        "Isolation:   none (the server runs jobs unisolated, in its own namespaces)",
    ]


def test_survivors_are_named_in_the_reason() -> None:
    status = started(job(command="sh", state=pb.JOB_STATE_STOPPED, exit_code=137), ran_s=1)
    status.survivors.extend([311, 312])
    status.stop_requested_by = "alice"
    reason = "Reason:      stopped by alice; processes 311, 312 outlived its kill and were given up"
    assert f"{reason} on\n" in format_status(status, tz=UTC)
