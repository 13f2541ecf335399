"""Every `jobctl status` example of seed 000, reproduced against a real server and real jobs.

The first lines must be exactly seed 000's (13-column labels); the fields we add follow them.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from .conftest import Jobctl

# A job that says it is ready once its TERM handling is in place, then idles.
IGNORES_TERM = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
EXITS_0_ON_TERM = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done"


def status_lines(jobctl: Jobctl, job_id: str, user: str = "alice") -> list[str]:
    return jobctl.ok("status", job_id, user=user).splitlines()


def fields(lines: list[str]) -> dict[str, str]:
    parsed = {}
    for line in lines:
        label, value = line[:13], line[13:]
        assert re.fullmatch(r"[A-Z][A-Za-z ]*: *", label), line
        parsed[label.rstrip().rstrip(":")] = value
    return parsed


def follower_once_ready(jobctl: Jobctl, job_id: str) -> subprocess.Popen:
    """`jobctl logs -f`, returned once the job has printed "ready" (its handler is set)."""
    follower = jobctl.popen("logs", "-f", job_id)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"ready\n"
    return follower


def test_running(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sleep", "30")
    try:
        lines = status_lines(jobctl, job_id)
        assert lines[:3] == [
            f"Job:         {job_id}",
            "Status:      running",
            "Command:     sleep 30",
        ]
        extra = fields(lines[3:])
        v1 = extra["Limits"].endswith("(cgroup v1)")
        assert list(extra) == [
            "Owner", "PID", "Started", "User", "Isolation", "Limits", *["Note"] * v1, "Usage"
        ]  # fmt: skip
        assert extra["Owner"] == "alice"
        assert int(extra["PID"]) > 1
        # alice has no account on the server: a transient user of its own ran her job.
        assert re.fullmatch(r"transient uid \d+ \(gid \d+, no account\)", extra["User"])
        assert extra["Isolation"] == ("namespaces pid, mount, ipc, uts, cgroup; network host")
        assert extra["Limits"].startswith("cpu 0.5, memory 1G, io read 100M/s, io write 100M/s")
        if v1:  # the io write limit does not reach buffered writes, and the status says so
            assert extra["Note"].startswith("io write limit: cgroup v1 throttles direct and synced")
    finally:
        jobctl.ok("stop", job_id, "--grace", "0")


def test_finished(jobctl: Jobctl) -> None:
    job_id = jobctl.start("echo", "hello")
    jobctl.wait_ended(job_id)
    lines = status_lines(jobctl, job_id)
    assert lines[:4] == [
        f"Job:         {job_id}",
        "Status:      finished",
        "Command:     echo hello",
        "Exit Code:   0",
    ]
    extra = fields(lines[4:])
    v1 = extra["Limits"].endswith("(cgroup v1)")
    assert list(extra) == [
        "Owner", "Started", "Ended", "User", "Isolation", "Limits", *["Note"] * v1, "Usage"
    ]  # fmt: skip


def test_failed(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "exit 1")
    jobctl.wait_ended(job_id)
    lines = status_lines(jobctl, job_id)
    assert lines[:4] == [
        f"Job:         {job_id}",
        "Status:      failed",
        "Command:     sh -c 'exit 1'",
        "Exit Code:   1",
    ]
    assert "Reason" not in fields(lines[4:])


def test_stopped_by_sigterm_reports_128_plus_15(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sleep", "30")
    jobctl.ok("stop", job_id)
    lines = status_lines(jobctl, job_id)
    assert lines[:4] == [
        f"Job:         {job_id}",
        "Status:      stopped",
        "Command:     sleep 30",
        "Exit Code:   143",
    ]
    extra = fields(lines[4:])
    assert extra["Signal"] == "SIGTERM"
    assert extra["Reason"] == "stopped by alice"


def test_stopped_job_that_handles_sigterm_reports_its_own_exit_code(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", EXITS_0_ON_TERM)
    follower = follower_once_ready(jobctl, job_id)
    jobctl.ok("stop", job_id)
    assert follower.wait(10) == 0
    lines = status_lines(jobctl, job_id)
    assert lines[:4] == [
        f"Job:         {job_id}",
        "Status:      stopped",
        f"Command:     sh -c {shlex.quote(EXITS_0_ON_TERM)}",
        "Exit Code:   0",
    ]
    extra = fields(lines[4:])
    assert "Signal" not in extra
    assert extra["Reason"] == "stopped by alice"


def test_stopped_by_sigkill_after_the_grace_period(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", IGNORES_TERM)
    follower = follower_once_ready(jobctl, job_id)
    jobctl.ok("stop", job_id, "--grace", "300ms")
    assert follower.wait(10) == 0
    lines = status_lines(jobctl, job_id)
    assert lines[:4] == [
        f"Job:         {job_id}",
        "Status:      stopped",
        f"Command:     sh -c {shlex.quote(IGNORES_TERM)}",
        "Exit Code:   137",
    ]
    extra = fields(lines[4:])
    assert extra["Signal"] == "SIGKILL"
    assert extra["Reason"] == "stopped by alice; killed with SIGKILL after the grace period"


def test_creation_error(jobctl: Jobctl) -> None:
    started = jobctl("start", "--", "foobar-no-such-command")
    assert started.returncode == 127  # the job exists (its id), though it never ran
    job_id = started.stdout.decode().strip()
    lines = status_lines(jobctl, job_id)
    assert lines[:3] == [
        f"Job:         {job_id}",
        "Status:      error",
        "Command:     foobar-no-such-command",
    ]
    extra = fields(lines[3:])
    assert "Exit Code" not in extra and "Ended" not in extra
    assert "foobar-no-such-command" in extra["Reason"]


def test_status_json_is_the_job_status_message(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "exit 3")
    jobctl.wait_ended(job_id)
    status = json.loads(jobctl.ok("status", job_id, "--json"))
    assert status["job_id"] == job_id
    assert status["state"] == "JOB_STATE_FAILED"
    assert status["exit_code"] == 3
    assert status["command"] == "sh" and status["args"] == ["-c", "exit 3"]
    assert status["owner"] == "alice"
