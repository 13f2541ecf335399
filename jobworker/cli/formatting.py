"""How jobctl shows jobs: seed 000's aligned `status` layout, the `list` table, JSON.

Pure functions of `pb.JobStatus` values (and of "now" and a time zone, passed in), so every
layout is tested without a server.

`status` begins exactly as seed 000 shows it — Job, Status, Command, then Exit Code once the
job has ended with one — each label padded to 13 columns. The fields after those appear only
where they say something: Name, Owner, PID (running), Signal, Reason, Started, Ended, User,
Isolation, Limits, Note (a limit the kernel applies only in part), Usage.

Every human-oriented layout here passes its text through `terminal.printable` (commands
through `terminal.shell_word`): jobs are other people's, and their strings reach an admin's
terminal. `to_json` stays exact.

Sizes: limits are shown exactly (``1G``, ``1536K``: what was asked for); usage is rounded to a
readable figure (``1023.9M``, ``1G``) by `human_bytes`.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo

from google.protobuf import json_format
from google.protobuf.message import Message

from jobworker.units import format_bytes
from jobworker.v1 import jobworker_pb2 as pb

from .parsing import format_duration
from .terminal import printable, shell_word

LABEL_WIDTH = 13  # "Exit Code:" and three spaces, as in seed 000

STATE_NAMES = {
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_FINISHED: "finished",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_STOPPED: "stopped",
    pb.JOB_STATE_ERROR: "error",
}


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, "unknown")


def command_line(status: pb.JobStatus) -> str:
    """The command with its arguments, shell-quoted only where needed (as seed 000 shows it);
    a word with control characters in bash's $'...' quoting, visible and exact."""
    return " ".join(shell_word(word) for word in (status.command, *status.args))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_status(
    status: pb.JobStatus, *, now: datetime | None = None, tz: tzinfo | None = None
) -> str:
    """`jobctl status`: one aligned line per field, ending with a newline."""
    lines = [
        ("Job", status.job_id),
        ("Status", state_name(status.state)),
        ("Command", command_line(status)),
    ]
    if status.HasField("exit_code"):
        lines.append(("Exit Code", str(status.exit_code)))
    if status.name:
        lines.append(("Name", status.name))
    if status.owner:
        lines.append(("Owner", status.owner))
    if status.state == pb.JOB_STATE_RUNNING and status.HasField("pid"):
        lines.append(("PID", str(status.pid)))
    if status.HasField("signal"):
        lines.append(("Signal", signal_name(status.signal)))
    reason = describe_reason(status)
    if reason:
        lines.append(("Reason", reason))
    if status.HasField("start_time"):
        started = _timestamp(status.start_time)
        text = _clock(started, tz)
        if status.state == pb.JOB_STATE_RUNNING and now is not None:
            text += f" ({format_duration(max(0.0, (now - started).total_seconds()))} ago)"
        lines.append(("Started", text))
    if status.HasField("end_time") and status.state != pb.JOB_STATE_ERROR:
        ended = _timestamp(status.end_time)
        text = _clock(ended, tz)
        if status.HasField("start_time"):
            ran = (ended - _timestamp(status.start_time)).total_seconds()
            text += f" (ran {format_duration(max(0.0, ran))})"
        lines.append(("Ended", text))
    if status.HasField("run_as"):  # a server that says who ran the job says how it was kept
        lines.append(("User", describe_run_as(status.run_as)))
        lines.append(("Isolation", describe_isolation(status)))
    limits = describe_limits(status)
    if limits:
        lines.append(("Limits", limits))
    for caveat in status.limit_caveats:
        lines.append(("Note", caveat))
    usage = describe_usage(status.usage) if status.HasField("usage") else ""
    if usage:
        lines.append(("Usage", usage))
    return "".join(f"{label + ':':<{LABEL_WIDTH}}{printable(value)}\n" for label, value in lines)


def describe_reason(status: pb.JobStatus) -> str:
    """Why the job is in its state, beyond the exit code; "" when there is nothing to add."""
    parts: list[str] = []
    if status.error and status.state in (pb.JOB_STATE_ERROR, pb.JOB_STATE_FAILED):
        parts.append(status.error)  # could not be created, or lost with its server
    if status.stop_requested_by:
        parts.append(f"stopped by {status.stop_requested_by}")
    if status.escalated:
        parts.append("killed with SIGKILL after the grace period")
    if status.oom_killed:
        parts.append("out of memory (killed by the kernel's OOM killer)")
    if status.pids_limit_hit:
        parts.append("reached its pids limit (a fork failed)")
    if status.output_lost_bytes:
        lost = _bytes(status.output_lost_bytes)
        parts.append(f"output incomplete: disk full ({lost} lost)")
    if status.output_removed:
        parts.append("output removed (the server's output budget)")
    if status.survivors:
        pids = ", ".join(map(str, status.survivors))
        parts.append(f"processes {pids} outlived its kill and were given up on")
    return "; ".join(parts)


def describe_run_as(run_as: pb.RunAs) -> str:
    """``alice (uid 1000, gid 1000)``, ``transient uid 70012``."""
    if run_as.transient:
        return f"transient uid {run_as.uid} (gid {run_as.gid}, no account)"
    who = run_as.user or "(no account)"
    return f"{who} (uid {run_as.uid}, gid {run_as.gid})"


def describe_isolation(status: pb.JobStatus) -> str:
    if not status.namespaces:
        return "none (the server runs jobs unisolated, in its own namespaces)"
    network = "none (loopback only)" if status.network == pb.NETWORK_NONE else "host"
    return f"namespaces {', '.join(status.namespaces)}; network {network}"


_CGROUP_VERSIONS = {pb.CGROUP_VERSION_V1: "v1", pb.CGROUP_VERSION_V2: "v2"}


def describe_limits(status: pb.JobStatus) -> str:
    if status.cgroup_version == pb.CGROUP_VERSION_NONE:
        return "none (the server runs without cgroups)"
    if not status.HasField("limits"):
        return ""
    limits = status.limits
    parts: list[str] = []
    if limits.HasField("cpu"):
        parts.append(f"cpu {limits.cpu:g}")
    if limits.HasField("memory_bytes"):
        parts.append(f"memory {_bytes(limits.memory_bytes)}")
    if limits.HasField("io_read_bytes_per_second"):
        parts.append(f"io read {_bytes(limits.io_read_bytes_per_second)}/s")
    if limits.HasField("io_write_bytes_per_second"):
        parts.append(f"io write {_bytes(limits.io_write_bytes_per_second)}/s")
    if limits.HasField("pids"):
        parts.append(f"pids {limits.pids}")
    # Unset: the job has no IOPS limit (they are opt-in).
    if limits.HasField("io_read_iops"):
        parts.append(f"io read {limits.io_read_iops} IOPS")
    if limits.HasField("io_write_iops"):
        parts.append(f"io write {limits.io_write_iops} IOPS")
    text = ", ".join(parts)
    version = _CGROUP_VERSIONS.get(status.cgroup_version)
    if text and version:
        text += f" (cgroup {version})"
    return text


def describe_usage(usage: pb.Usage) -> str:
    parts: list[str] = []
    if usage.HasField("cpu_seconds"):
        cpu = f"cpu {usage.cpu_seconds:.2f}s"
        if usage.HasField("cpu_throttled_seconds") and usage.cpu_throttled_seconds > 0:
            cpu += f" (throttled {usage.cpu_throttled_seconds:.2f}s)"
        parts.append(cpu)
    if usage.HasField("memory_bytes"):
        parts.append(f"memory {human_bytes(usage.memory_bytes)}")
    if usage.HasField("memory_peak_bytes"):
        parts.append(f"memory peak {human_bytes(usage.memory_peak_bytes)}")
    if usage.HasField("io_read_bytes"):
        parts.append(f"io read {human_bytes(usage.io_read_bytes)}")
    if usage.HasField("io_write_bytes"):
        parts.append(f"io write {human_bytes(usage.io_write_bytes)}")
    return ", ".join(parts)


LIST_COLUMNS = ("JOB ID", "OWNER", "STATUS", "EXIT", "STARTED", "COMMAND")


def format_list(jobs: Sequence[pb.JobStatus], *, tz: tzinfo | None = None) -> str:
    """`jobctl list`: a header, then one aligned line per job, oldest first. A NAME column
    follows JOB ID when some job listed has a name (scripts read --json or -q, not columns)."""
    named = any(job.name for job in jobs)
    header = (*LIST_COLUMNS[:1], "NAME", *LIST_COLUMNS[1:]) if named else LIST_COLUMNS
    rows = [header]
    for job in jobs:
        when = job.start_time if job.HasField("start_time") else job.create_time
        row = (
            job.job_id,
            *((printable(job.name) or "-",) if named else ()),
            printable(job.owner) or "-",
            state_name(job.state),
            str(job.exit_code) if job.HasField("exit_code") else "-",
            _clock(_timestamp(when), tz, zone=False) if when.seconds else "-",
            command_line(job),
        )
        rows.append(row)
    return align(rows)


def align(rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()) -> str:
    """Rows of cells as aligned lines, two spaces apart; the last column is not padded. The
    cells must be printable already (no control characters: one row, one line)."""
    columns = len(rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(columns - 1)]
    return "".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        )
        + "  "
        + row[-1]
        + "\n"
        for row in rows
    )


def exit_cause(job: pb.JobStatus) -> str:
    """Why an ended job ended, when its exit code alone does not say it: words to follow
    "job ID " ("was killed by the kernel's OOM killer at its 1G memory limit (exit 137)").
    "" for a job that exited on its own with nothing more to tell, or that has not ended."""
    code = f"exit {job.exit_code}" if job.HasField("exit_code") else "exit code unknown"
    if job.state == pb.JOB_STATE_ERROR:
        return f"could not be created: {job.error or 'no reason given'}"
    if job.state == pb.JOB_STATE_RUNNING or job.state == pb.JOB_STATE_UNSPECIFIED:
        return ""
    if not job.HasField("exit_code"):
        return f"ended unobserved: {job.error or 'the server did not see its end'} ({code})"
    if job.oom_killed:
        limit = (
            f" at its {_bytes(job.limits.memory_bytes)} memory limit"
            if job.limits.HasField("memory_bytes")
            else ""
        )
        return f"was killed by the kernel's OOM killer{limit} ({code})"
    if job.stop_requested_by:
        how = (
            "SIGKILL after the grace period, "
            if job.escalated
            else (f"{signal_name(job.signal)}, " if job.HasField("signal") else "")
        )
        return f"was stopped by {job.stop_requested_by} ({how}{code})"
    if job.HasField("signal"):
        return f"was killed by {signal_name(job.signal)} ({code})"
    if job.pids_limit_hit and job.exit_code != 0:
        limit = f" of {job.limits.pids}" if job.limits.HasField("pids") else ""
        return f"reached its pids limit{limit}: a fork failed ({code})"
    return ""


def ended_summary(job: pb.JobStatus) -> str:
    """``finished, exit 0``; ``stopped, exit 143``; ``error``: a job's end in a few words."""
    if job.HasField("exit_code"):
        return f"{state_name(job.state)}, exit {job.exit_code}"
    return state_name(job.state)


_UNITS = ("B", "K", "M", "G", "T", "P", "E")


def human_bytes(value: int) -> str:
    """A byte count rounded for reading, in binary units with at most one decimal: 512 →
    ``512B``, 1536 → ``1.5K``, 2**30 - 1 → ``1G`` (never ``1024M``: the unit is chosen after
    rounding), and never an exponent."""
    if value < 1024:
        return f"{value}B"
    for power, unit in enumerate(_UNITS[1:], start=1):
        shown = round(value / 1024**power, 1)
        if shown < 1024 or unit == _UNITS[-1]:
            return f"{shown:.1f}".removesuffix(".0") + unit
    raise AssertionError("unreachable")


def to_json(message: Message) -> str:
    """The proto3 JSON mapping, with the .proto's field names (job_id, exit_code, ...) and
    every field without presence written out, so a reader need not know proto defaults."""
    return (
        json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=2,
        )
        + "\n"
    )


def _timestamp(value) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def _clock(when: datetime, tz: tzinfo | None, *, zone: bool = True) -> str:
    local = when.astimezone(tz)
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if zone else "%Y-%m-%d %H:%M:%S").strip()


def _bytes(value: int) -> str:
    text = format_bytes(value)
    return text + "B" if text.isdigit() else text
