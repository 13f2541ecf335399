"""Conversions between the supervisor's values and the API's messages, and request validation.

Everything that reads a request field or fills a response field is here, so the handlers deal
in supervisor values only. Validation failures raise `InvalidRequest` (INVALID_ARGUMENT) with a
message that names the field as the API spells it.
"""

from __future__ import annotations

import signal
from datetime import datetime

# The well-known types' conversions live in jobworker.api, which jobctl shares; the names stay
# importable from here, where the handlers use them.
from jobworker.api import duration_to_proto as duration_to_proto
from jobworker.api import timestamp_from_proto as timestamp_from_proto
from jobworker.api import timestamp_to_proto as timestamp_to_proto
from jobworker.supervisor import (
    JobState,
    JobStatus,
    LimitOverrides,
    LimitPolicy,
    Limits,
    OutputChunk,
    OutputStream,
    RunAs,
    Usage,
)
from jobworker.v1 import jobworker_pb2 as pb

from . import references
from .errors import InvalidRequest, shown

# One hour: a stop that waits longer than that for a job to clean up is a typo (60h for 60s),
# and StopJob holds the caller until the job has ended.
MAX_GRACE_PERIOD_S = 3600.0

# --- requests ------------------------------------------------------------------------------


def job_id_of(text: str) -> str:
    """A job reference that may name a job (references.py): a full id in canonical form, else
    the name or id prefix as given; InvalidRequest for one that never can. Which job it is,
    the handlers resolve (`JobService._find`)."""
    ref = references.parse(text)
    return ref.job_id or ref.text


def name_of(request: pb.StartJobRequest) -> str:
    """The job's name ("" for none), or InvalidRequest."""
    return references.name_of(request.name)


def signal_of(request: pb.SignalJobRequest) -> int:
    """A signal number a job may be sent (1-31, and the real-time ones libc leaves to
    programs), or InvalidRequest. 0 is no signal (kill(2) only checks the target)."""
    if request.signal not in signal.valid_signals():
        raise InvalidRequest(
            f"signal {request.signal} is not a signal number: Linux's are 1 to 31 and"
            f" {int(signal.SIGRTMIN)} to {int(signal.SIGRTMAX)}, e.g. 1 SIGHUP, 10 SIGUSR1,"
            " 15 SIGTERM"
        )
    return request.signal


_LIMIT_FIELDS = (
    # (API field, LimitOverrides / Limits field)
    ("cpu", "cpu"),
    ("memory_bytes", "memory_bytes"),
    ("io_read_bytes_per_second", "io_read_bps"),
    ("io_write_bytes_per_second", "io_write_bps"),
    ("pids", "pids"),
    ("io_read_iops", "io_read_iops"),
    ("io_write_iops", "io_write_iops"),
)
# Limits a job may run without (None in `Limits`): unset in a JobStatus means "no limit".
_OPTIONAL_LIMITS = frozenset({"io_read_iops", "io_write_iops"})


def overrides_of(request: pb.StartJobRequest, policy: LimitPolicy) -> LimitOverrides | None:
    """The limits the request asks for; None when it asks for none (all defaults).

    Each value is checked against `policy` (the Supervisor's: its maximums, and what the host
    has) here, before anything is recorded: out of range, LimitOutOfRange (INVALID_ARGUMENT)
    names the field and the allowed range.
    """
    if not request.HasField("limits"):
        return None
    given = {
        ours: getattr(request.limits, api)
        for api, ours in _LIMIT_FIELDS
        if request.limits.HasField(api)
    }
    for name, value in given.items():
        policy.check(name, value)
    return LimitOverrides(**given) if given else None


def env_of(request: pb.StartJobRequest) -> dict[str, str]:
    env = dict(request.env)
    for key, value in env.items():
        if not key:
            raise InvalidRequest("env: a variable has an empty name")
        if "=" in key or "\0" in key:
            raise InvalidRequest(f"env: invalid variable name {shown(key)} (contains '=' or NUL)")
        if "\0" in value:
            raise InvalidRequest(f"env: the value of {key} contains a NUL byte")
    return env


def working_dir_of(request: pb.StartJobRequest) -> str | None:
    if not request.working_dir:
        return None
    if "\0" in request.working_dir:
        raise InvalidRequest("working_dir contains a NUL byte")
    if not request.working_dir.startswith("/"):
        # Relative to what? The caller's directory is on another machine, the server's is none
        # of its business (docker -w and systemd's WorkingDirectory= refuse it too).
        raise InvalidRequest(f"working_dir must be absolute, got {shown(request.working_dir)}")
    return request.working_dir


_NETWORK_TO_PROTO = {"host": pb.NETWORK_HOST, "none": pb.NETWORK_NONE}
_NETWORK_FROM_PROTO = {value: name for name, value in _NETWORK_TO_PROTO.items()}


def network_of(request: pb.StartJobRequest) -> str | None:
    """ "host" or "none"; None when unspecified (the server's default)."""
    if request.network == pb.NETWORK_UNSPECIFIED:
        return None
    try:
        return _NETWORK_FROM_PROTO[request.network]
    except KeyError:
        raise InvalidRequest(f"network: unknown value {request.network}") from None


def network_to_proto(network: str) -> pb.Network.ValueType:
    return _NETWORK_TO_PROTO[network]


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# AIP-132 spells the field as the API does (create_time); clients from before the API was
# settled said created_at, which still means the same.
_ORDERS = {
    f"{field}{direction}": direction == " desc"
    for field in ("", "create_time", "created_at")
    for direction in ("", " asc", " desc")
    if field or not direction
}


def page_size_of(request: pb.ListJobsRequest) -> int:
    if request.page_size < 0:
        raise InvalidRequest(f"page_size must not be negative, got {request.page_size}")
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def newest_first_of(request: pb.ListJobsRequest) -> bool:
    order = " ".join(request.order_by.split()).lower()
    if order not in _ORDERS:
        raise InvalidRequest(
            f'order_by must be "create_time" or "create_time desc", not {shown(request.order_by)}'
        )
    return _ORDERS[order]


def states_of(request: pb.ListJobsRequest) -> tuple[int, ...]:
    for value in request.states:
        if value not in _STATE_FROM_PROTO:
            raise InvalidRequest(f"states: unknown job state {value}")
    return tuple(sorted(set(request.states)))


def created_after_of(request: pb.ListJobsRequest) -> float | None:
    if not request.HasField("create_time_after"):
        return None
    return timestamp_from_proto(request.create_time_after).timestamp()


def older_than_of(request: pb.PruneJobsRequest) -> float:
    """Seconds; 0 when unset (every ended job)."""
    if not request.HasField("older_than"):
        return 0.0
    seconds = request.older_than.seconds + request.older_than.nanos / 1e9
    if seconds < 0:
        raise InvalidRequest(f"older_than must not be negative, got {seconds:g}s")
    return seconds


def grace_period_of(
    request: pb.StopJobRequest, maximum_s: float = MAX_GRACE_PERIOD_S
) -> float | None:
    """The requested grace period in seconds; None when unset (the server's default)."""
    if not request.HasField("grace_period"):
        return None
    duration = request.grace_period
    seconds, nanos = duration.seconds, duration.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (
        seconds and nanos and (seconds < 0) != (nanos < 0)
    ):
        raise InvalidRequest(
            f"grace_period is not a valid Duration (seconds={seconds}, nanos={nanos})"
        )
    grace_s = seconds + nanos / 1e9
    if grace_s < 0:
        raise InvalidRequest(f"grace_period must not be negative, got {grace_s:g}s")
    if grace_s > maximum_s:
        raise InvalidRequest(f"grace_period {grace_s:g}s is above the maximum {maximum_s:g}s")
    return grace_s


# --- responses -----------------------------------------------------------------------------

_STATE_TO_PROTO = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.FINISHED: pb.JOB_STATE_FINISHED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.STOPPED: pb.JOB_STATE_STOPPED,
    JobState.ERROR: pb.JOB_STATE_ERROR,
}
_STATE_FROM_PROTO = {value: state for state, value in _STATE_TO_PROTO.items()}

_STREAM_TO_PROTO = {
    OutputStream.STDOUT: pb.LOG_STREAM_STDOUT,
    OutputStream.STDERR: pb.LOG_STREAM_STDERR,
}
STREAM_FROM_PROTO = {value: stream for stream, value in _STREAM_TO_PROTO.items()}


def state_to_proto(state: JobState) -> pb.JobState.ValueType:
    return _STATE_TO_PROTO[state]


def state_from_proto(value: pb.JobState.ValueType) -> JobState:
    try:
        return _STATE_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown job state {value}") from None


def limits_to_proto(limits: Limits) -> pb.Limits:
    return pb.Limits(
        **{
            api: value
            for api, ours in _LIMIT_FIELDS
            if (value := getattr(limits, ours)) is not None
        }
    )


def limits_from_proto(message: pb.Limits) -> Limits:
    """A complete Limits (as a JobStatus carries them): every field must be set but the
    optional ones (IOPS), whose absence means the job had no such limit."""
    missing = [
        api for api, _ in _LIMIT_FIELDS if api not in _OPTIONAL_LIMITS and not message.HasField(api)
    ]
    if missing:
        raise ValueError(f"limits lack {', '.join(missing)}")
    return Limits(
        **{ours: getattr(message, api) for api, ours in _LIMIT_FIELDS if message.HasField(api)}
    )


_USAGE_FIELDS = (
    ("cpu_seconds", "cpu_s"),
    ("memory_bytes", "memory_bytes"),
    ("cpu_throttled_seconds", "cpu_throttled_s"),
    ("memory_peak_bytes", "memory_peak_bytes"),
    ("io_read_bytes", "io_read_bytes"),
    ("io_write_bytes", "io_write_bytes"),
)


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(
        **{
            api: getattr(usage, ours)
            for api, ours in _USAGE_FIELDS
            if getattr(usage, ours) is not None
        }
    )


def usage_from_proto(message: pb.Usage) -> Usage:
    return Usage(
        **{ours: getattr(message, api) for api, ours in _USAGE_FIELDS if message.HasField(api)}
    )


def status_to_proto(status: JobStatus) -> pb.JobStatus:
    message = pb.JobStatus(
        job_id=status.id,
        owner=status.owner,
        command=status.command,
        args=status.args,
        state=state_to_proto(status.state),
        pid=status.pid,
        exit_code=status.exit_code,
        signal=status.signal,
        error=status.error or "",
        stop_requested_by=status.stop_requested_by or "",
        escalated=status.escalated,
        oom_killed=status.oom_killed,
        pids_limit_hit=status.pids_limit_hit,
        create_time=timestamp_to_proto(status.created_at),
        cgroup_version=_CGROUPS_TO_PROTO[status.cgroups],
        usage=usage_to_proto(status.usage),
        namespaces=status.namespaces,
        network=network_to_proto(status.network),
        limit_caveats=status.limit_caveats,
        survivors=status.survivors,
        output_lost_bytes=status.output_lost_bytes,
        name=status.name,
    )
    if status.run_as is not None:
        message.run_as.CopyFrom(
            pb.RunAs(
                user=status.run_as.name,
                uid=status.run_as.uid,
                gid=status.run_as.gid,
                transient=status.run_as.transient,
            )
        )
    if status.started_at is not None:
        message.start_time.CopyFrom(timestamp_to_proto(status.started_at))
    if status.ended_at is not None:
        message.end_time.CopyFrom(timestamp_to_proto(status.ended_at))
    if status.limits is not None:
        message.limits.CopyFrom(limits_to_proto(status.limits))
    return message


_CGROUPS_TO_PROTO = {
    "off": pb.CGROUP_VERSION_NONE,
    "v1": pb.CGROUP_VERSION_V1,
    "v2": pb.CGROUP_VERSION_V2,
}
_CGROUPS_FROM_PROTO = {value: name for name, value in _CGROUPS_TO_PROTO.items()}
# Before the v1 API was settled, JobStatus field 18 was `string cgroups` ("v2", "v1", "off");
# it is reserved now, and statuses stored then still carry it.
_LEGACY_CGROUPS_FIELD = 18


def stored_status(blob: bytes) -> pb.JobStatus:
    """A JobStatus the store kept, brought up to this API: a status stored before the API was
    settled says its cgroup version in the legacy field, which becomes `cgroup_version`."""
    from google.protobuf import unknown_fields

    status = pb.JobStatus.FromString(blob)
    if status.cgroup_version == pb.CGROUP_VERSION_UNSPECIFIED:
        for field in unknown_fields.UnknownFieldSet(status):
            if field.field_number == _LEGACY_CGROUPS_FIELD and isinstance(field.data, bytes):
                name = field.data.decode("utf-8", "replace")
                status.cgroup_version = _CGROUPS_TO_PROTO.get(name, pb.CGROUP_VERSION_UNSPECIFIED)
        # Dropped, so that the status goes out as the settled API has it.
        status.DiscardUnknownFields()
    return status


def status_from_proto(message: pb.JobStatus) -> JobStatus:
    """The inverse of `status_to_proto` (for clients that want the supervisor's helpers)."""

    def optional(name: str) -> int | None:
        return getattr(message, name) if message.HasField(name) else None

    def moment(name: str) -> datetime | None:
        return timestamp_from_proto(getattr(message, name)) if message.HasField(name) else None

    created_at = moment("create_time")
    if created_at is None:
        raise ValueError("a JobStatus without create_time")
    run_as = None
    if message.HasField("run_as"):
        given = message.run_as
        run_as = RunAs(uid=given.uid, gid=given.gid, name=given.user, transient=given.transient)
    return JobStatus(
        id=message.job_id,
        owner=message.owner,
        command=message.command,
        args=tuple(message.args),
        state=state_from_proto(message.state),
        created_at=created_at,
        pid=optional("pid"),
        started_at=moment("start_time"),
        ended_at=moment("end_time"),
        exit_code=optional("exit_code"),
        signal=optional("signal"),
        error=message.error or None,
        stop_requested_by=message.stop_requested_by or None,
        escalated=message.escalated,
        oom_killed=message.oom_killed,
        pids_limit_hit=message.pids_limit_hit,
        limits=limits_from_proto(message.limits) if message.HasField("limits") else None,
        cgroups=_CGROUPS_FROM_PROTO.get(message.cgroup_version, "off"),
        usage=usage_from_proto(message.usage),
        run_as=run_as,
        namespaces=tuple(message.namespaces),
        network=_NETWORK_FROM_PROTO.get(message.network, "host"),
        limit_caveats=tuple(message.limit_caveats),
        survivors=tuple(message.survivors),
        output_lost_bytes=message.output_lost_bytes,
        name=message.name,
    )


def chunk_to_proto(chunk: OutputChunk) -> pb.GetJobLogsResponse:
    message = pb.GetJobLogsResponse(
        data=chunk.data,
        stream=_STREAM_TO_PROTO.get(chunk.stream, pb.LOG_STREAM_UNSPECIFIED),  # a drop: None
        offset=chunk.offset,
        lost=chunk.lost,
        dropped=chunk.dropped,
    )
    if chunk.time_ns is not None:
        message.read_time.FromNanoseconds(chunk.time_ns)
    return message


def chunk_from_proto(message: pb.GetJobLogsResponse) -> OutputChunk:
    """The chunk a GetJobLogsResponse stands for; ValueError for a stream that is not one (a
    drop has none)."""
    if message.dropped:
        stream = None
    else:
        try:
            stream = STREAM_FROM_PROTO[message.stream]
        except KeyError:
            raise ValueError(f"unknown output stream {message.stream}") from None
    time_ns = message.read_time.ToNanoseconds() if message.HasField("read_time") else None
    return OutputChunk(
        stream, message.offset, message.data, message.lost, message.dropped, time_ns=time_ns
    )
