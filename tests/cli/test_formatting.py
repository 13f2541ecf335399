"""jobctl's layouts as pure functions of JobStatus messages: seed 000 exactly, then our fields;
terminal safety, sizes, exit causes and `top`'s arithmetic."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.cli.formatting import (
    ended_summary,
    exit_cause,
    format_list,
    format_status,
    human_bytes,
    to_json,
)
from jobworker.cli.terminal import printable, shell_word
from jobworker.cli.top import Sample, format_top, top_rows
from jobworker.v1 import jobworker_pb2 as pb

ID = "0b8e3c57-6f1d-4c5e-9a39-3f0f6d2c9a11"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def job(**fields) -> pb.JobStatus:
    status = pb.JobStatus(job_id=ID, owner="alice", cgroup_version=pb.CGROUP_VERSION_V2, **fields)
    status.create_time.FromDatetime(T0)
    return status


def started(status: pb.JobStatus, ran_s: float | None = None) -> pb.JobStatus:
    status.start_time.FromDatetime(T0)
    if ran_s is not None:
        status.end_time.FromDatetime(T0 + timedelta(seconds=ran_s))
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


def test_iops_limits_show_when_set_and_their_absence_says_nothing() -> None:
    status = started(job(command="yes", state=pb.JOB_STATE_RUNNING, pid=4242))
    status.limits.pids = 64
    status.limits.io_write_iops = 600
    lines = format_status(status, now=T0 + timedelta(seconds=5), tz=UTC).splitlines()
    assert "Limits:      pids 64, io write 600 IOPS (cgroup v2)" in lines
    status.limits.io_read_iops = 500
    lines = format_status(status, now=T0 + timedelta(seconds=5), tz=UTC).splitlines()
    assert "Limits:      pids 64, io read 500 IOPS, io write 600 IOPS (cgroup v2)" in lines


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
    status.end_time.FromDatetime(T0)
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
    status.cgroup_version = pb.CGROUP_VERSION_NONE
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
    status.cgroup_version, status.limits.pids = pb.CGROUP_VERSION_V1, 64
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


# --- terminal safety -------------------------------------------------------------------------

HOSTILE = "\x1b]0;pwned\x07\x1b[2J"  # retitles the terminal, then clears it


def test_printable_shows_control_characters_as_escapes() -> None:
    assert printable(HOSTILE) == "\\e]0;pwned\\a\\e[2J"
    assert printable("a\nb\tc\rd\x00e\x7ff") == "a\\nb\\tc\\rd\\x00e\\x7ff"
    assert printable("\x9b31m \u0085") == "\\u009b31m \\u0085"  # C1: 8-bit CSI, NEL
    assert printable("ab\u202ecd\u2028") == "ab\\u202ecd\\u2028"  # bidi override, line sep.
    assert printable("dir\udcff") == "dir\\xff"  # a byte that was not UTF-8, as that byte
    assert printable("naïve → ok 日本") == "naïve → ok 日本"  # printable text is left alone


@given(st.text())
def test_printable_output_holds_nothing_a_terminal_acts_on(text: str) -> None:
    shown = printable(text)
    assert not any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in shown
    )
    assert shown.count("\n") == 0
    if shown == text:
        assert "\x1b" not in text


@pytest.mark.parametrize(
    "word", ["plain", "two words", "it's", HOSTILE, "a\nb", "back\\slash\x07", "\u0085", "\t'"]
)
def test_shell_word_is_what_bash_reads_back(word: str) -> None:
    quoted = shell_word(word)
    assert printable(quoted) == quoted  # visible
    done = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True, timeout=10
    )
    assert done.stdout == word.encode()  # and exact


def test_status_and_list_escape_another_users_strings() -> None:
    status = started(job(command="sh", args=["-c", f"printf '{HOSTILE}'\n"],
                         state=pb.JOB_STATE_RUNNING, pid=7))  # fmt: skip
    status.owner = "eve\x1b[31m"
    status.name = "n1"
    text = format_status(status, now=T0, tz=UTC)
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert "Command:     sh -c $'printf \\'\\e]0;pwned\\a\\e[2J\\'\\n'" in lines
    assert "Owner:       eve\\e[31m" in lines
    assert "Name:        n1" in lines
    listing = format_list([status], tz=UTC)
    assert "\x1b" not in listing
    assert len(listing.splitlines()) == 2  # the newline in the command forges no row
    assert listing.splitlines()[0].split()[:4] == ["JOB", "ID", "NAME", "OWNER"]
    assert json.loads(to_json(status))["owner"] == "eve\x1b[31m"  # JSON stays exact


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0B"), (1023, "1023B"), (1024, "1K"), (1536, "1.5K"), (2**30, "1G"),
     (2**30 - 1, "1G"), (1023 * 2**20 + 900 * 1024, "1023.9M"), (1031880 * 1024, "1007.7M"),
     (2**64 - 1, "16E"), (3 * 2**20, "3M")],
)  # fmt: skip
def test_human_bytes(value: int, text: str) -> None:
    assert human_bytes(value) == text


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_human_bytes_is_short_close_and_never_an_exponent(value: int) -> None:
    text = human_bytes(value)
    match = re.fullmatch(r"(\d+)(?:\.(\d))?([BKMGTPE])", text)
    assert match, text
    number = float(text[:-1])
    assert number < 1024 or match.group(3) == "E"  # 1024M is written 1G
    scale = 1024 ** "BKMGTPE".index(match.group(3))
    assert abs(number * scale - value) <= 0.05 * scale + 1e-9 * value  # rounded, not wrong
    if match.group(3) == "B":
        assert int(match.group(1)) == value


def test_peak_memory_reads_as_a_size() -> None:
    status = started(job(command="x", state=pb.JOB_STATE_FINISHED, exit_code=0), ran_s=1)
    status.usage.memory_peak_bytes = 1031880 * 1024
    assert "Usage:       memory peak 1007.7M\n" in format_status(status, tz=UTC)


# --- why a job ended -------------------------------------------------------------------------


def ended(**fields) -> pb.JobStatus:
    return started(job(command="x", **fields), ran_s=1)


def test_exit_causes() -> None:
    oom = ended(state=pb.JOB_STATE_FAILED, exit_code=137, signal=9, oom_killed=True)
    oom.limits.memory_bytes = 2**30
    assert (
        exit_cause(oom) == "was killed by the kernel's OOM killer at its 1G memory limit (exit 137)"
    )
    pids = ended(state=pb.JOB_STATE_FAILED, exit_code=1, pids_limit_hit=True)
    pids.limits.pids = 16
    assert exit_cause(pids) == "reached its pids limit of 16: a fork failed (exit 1)"
    stop = ended(state=pb.JOB_STATE_STOPPED, exit_code=143, signal=15, stop_requested_by="carol")
    assert exit_cause(stop) == "was stopped by carol (SIGTERM, exit 143)"
    stop.escalated, stop.exit_code, stop.signal = True, 137, 9
    assert exit_cause(stop) == ("was stopped by carol (SIGKILL after the grace period, exit 137)")
    segv = ended(state=pb.JOB_STATE_FAILED, exit_code=139, signal=11)
    assert exit_cause(segv) == "was killed by SIGSEGV (exit 139)"
    lost = ended(state=pb.JOB_STATE_FAILED, error="lost: the server stopped while it ran")
    assert exit_cause(lost) == (
        "ended unobserved: lost: the server stopped while it ran (exit code unknown)"
    )
    error = job(command="nope", state=pb.JOB_STATE_ERROR, error="cannot run 'nope'")
    assert exit_cause(error) == "could not be created: cannot run 'nope'"


def test_no_cause_when_the_code_says_it_all() -> None:
    assert exit_cause(ended(state=pb.JOB_STATE_FINISHED, exit_code=0)) == ""
    assert exit_cause(ended(state=pb.JOB_STATE_FAILED, exit_code=7)) == ""
    assert exit_cause(ended(state=pb.JOB_STATE_FINISHED, exit_code=0, pids_limit_hit=True)) == ""
    assert exit_cause(started(job(command="x", state=pb.JOB_STATE_RUNNING))) == ""
    assert ended_summary(ended(state=pb.JOB_STATE_FINISHED, exit_code=0)) == "finished, exit 0"


# --- top -------------------------------------------------------------------------------------


def running(job_id: str, *, cpu_s: float, read: int, written: int, memory: int) -> pb.JobStatus:
    status = started(job(command="yes", state=pb.JOB_STATE_RUNNING))
    status.job_id = job_id
    status.usage.cpu_seconds = cpu_s
    status.usage.io_read_bytes, status.usage.io_write_bytes = read, written
    status.usage.memory_bytes = memory
    status.limits.memory_bytes = 2**30
    return status


def test_top_rates_are_differences_over_the_time_between_samples() -> None:
    a0 = running("a" * 36, cpu_s=10.0, read=0, written=2**20, memory=2**29)
    a1 = running("a" * 36, cpu_s=13.0, read=4 * 2**20, written=2**20, memory=2**29)
    b1 = running("b" * 36, cpu_s=1.0, read=0, written=0, memory=0)  # new since the last sample
    rows = top_rows(Sample(100.0, [a0]), Sample(102.0, [a1, b1]))
    assert [row.job_id for row in rows] == ["a" * 36, "b" * 36]
    assert rows[0].cpu_percent == pytest.approx(150.0)  # 3 CPU-seconds in 2 s: 1.5 cores
    assert rows[0].read_bytes_per_s == pytest.approx(2 * 2**20)
    assert rows[0].write_bytes_per_s == 0
    assert rows[1].cpu_percent is None and rows[1].read_bytes_per_s is None
    lines = format_top(rows, owners=False).splitlines()
    assert lines[0].split() == [
        "JOB", "ID", "CPU", "%", "MEM", "USAGE", "/", "LIMIT", "MEM", "%", "READ/s", "WRITE/s",
        "COMMAND",
    ]  # fmt: skip
    assert lines[1].split() == ["a" * 12, "150.0%", "512M", "/", "1G", "50.0%", "2M/s", "0B/s",
                                "yes"]  # fmt: skip
    assert lines[2].split() == ["b" * 12, "-", "0B", "/", "1G", "0.0%", "-", "-", "yes"]


def test_top_escapes_and_shows_owners_with_all() -> None:
    status = running("c" * 36, cpu_s=0, read=0, written=0, memory=0)
    status.owner, status.name, status.args[:] = "eve\x1b[2J", "web", [HOSTILE]
    text = format_top(top_rows(None, Sample(0.0, [status])), owners=True)
    assert "\x1b" not in text
    assert text.splitlines()[0].split()[:4] == ["JOB", "ID", "NAME", "OWNER"]
    assert "eve\\e[2J" in text
