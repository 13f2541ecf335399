"""Supervisor values <-> API messages, request validation, and the error -> status table."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime

import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import given
from hypothesis import strategies as st

from jobworker.purgatory import Status
from jobworker.service import STATUS_OF, InvalidRequest, PermissionDenied, as_grpc_error, convert
from jobworker.service.errors import (
    JobNameTaken,
    NoSuchJob,
    ShuttingDown,
    StdinUnavailable,
    TooManyJobs,
    TooManyLogStreams,
    Unavailable,
)
from jobworker.service.store import StoreUnavailable
from jobworker.supervisor import (
    HostCapacity,
    InvalidJobSpec,
    JobEnded,
    JobNotEnded,
    JobNotFound,
    JobState,
    JobStatus,
    LimitOutOfRange,
    LimitOverrides,
    LimitPolicy,
    Limits,
    OutputChunk,
    OutputStream,
    TransientUsersExhausted,
    Usage,
)
from jobworker.v1 import jobworker_pb2 as pb

U64 = 2**64 - 1
moments = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
)
limits = st.builds(
    Limits,
    cpu=st.floats(min_value=0.01, max_value=1e6),
    memory_bytes=st.integers(2**20, U64),
    io_read_bps=st.integers(1, U64),
    io_write_bps=st.integers(1, U64),
    pids=st.integers(2, 2**32 - 1),
    io_read_iops=st.none() | st.integers(1, 2**32 - 2),  # None: no IOPS limit, unset on the wire
    io_write_iops=st.none() | st.integers(1, 2**32 - 2),
)
usage = st.builds(
    Usage,
    cpu_s=st.none() | st.floats(min_value=0, max_value=1e9),
    cpu_throttled_s=st.none() | st.floats(min_value=0, max_value=1e9),
    memory_peak_bytes=st.none() | st.integers(0, U64),
    io_read_bytes=st.none() | st.integers(0, U64),
    io_write_bytes=st.none() | st.integers(0, U64),
)
int32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
statuses = st.builds(
    JobStatus,
    id=st.uuids(version=4).map(str),
    owner=text,
    command=text.filter(bool),
    args=st.lists(text, max_size=4).map(tuple),
    state=st.sampled_from(JobState),
    created_at=moments,
    pid=st.none() | st.integers(1, 2**32 - 1),
    started_at=st.none() | moments,
    ended_at=st.none() | moments,
    exit_code=st.none() | int32,
    signal=st.none() | int32,
    error=st.none() | text.filter(bool),
    stop_requested_by=st.none() | text.filter(bool),
    escalated=st.booleans(),
    oom_killed=st.booleans(),
    pids_limit_hit=st.booleans(),
    limits=st.none() | limits,
    cgroups=st.sampled_from(["v1", "v2", "off"]),
    usage=usage,
)


@given(statuses)
def test_a_status_survives_the_wire_unchanged(status: JobStatus) -> None:
    message = pb.JobStatus.FromString(convert.status_to_proto(status).SerializeToString())
    assert convert.status_from_proto(message) == status


def test_every_state_has_its_own_api_value() -> None:
    values = {convert.state_to_proto(state) for state in JobState}
    assert len(values) == len(JobState) and pb.JOB_STATE_UNSPECIFIED not in values
    assert {pb.JobState.Name(convert.state_to_proto(s)) for s in JobState} == {
        f"JOB_STATE_{s.name}" for s in JobState
    }


def test_a_status_of_a_running_job_leaves_the_end_unset() -> None:
    status = JobStatus("id", "alice", "yes", (), JobState.RUNNING, datetime.now(UTC), pid=7)
    message = convert.status_to_proto(status)
    for name in ("exit_code", "signal", "end_time", "limits"):
        assert not message.HasField(name), name
    assert message.pid == 7 and message.HasField("create_time")


def test_log_chunks_keep_stream_offset_and_bytes() -> None:
    for stream in OutputStream:
        chunk = OutputChunk(stream, 12345, b"\x00\xff data")
        message = convert.chunk_to_proto(chunk)
        assert message.stream != pb.LOG_STREAM_UNSPECIFIED
        assert convert.chunk_from_proto(message) == chunk


# --- requests ------------------------------------------------------------------------------------


# A host of 2 CPUs, 4G of RAM and pid_max 32768; the server's maximum memory is 2G.
HOST = HostCapacity(cpus=2, memory_bytes=4 * 2**30, pids=32768)
POLICY = LimitPolicy(maximums=LimitOverrides(memory_bytes=2 * 2**30), host=HOST)


def test_limits_left_unset_are_none_and_set_ones_are_named_like_the_supervisor() -> None:
    assert convert.overrides_of(pb.StartJobRequest(command="x"), POLICY) is None
    assert convert.overrides_of(pb.StartJobRequest(command="x", limits=pb.Limits()), POLICY) is None
    request = pb.StartJobRequest(
        command="x",
        limits=pb.Limits(cpu=1.5, io_read_bytes_per_second=10, io_write_bytes_per_second=20),
    )
    assert convert.overrides_of(request, POLICY) == LimitOverrides(
        cpu=1.5, io_read_bps=10, io_write_bps=20
    )
    iops = pb.StartJobRequest(command="x", limits=pb.Limits(io_read_iops=30, io_write_iops=40))
    assert convert.overrides_of(iops, POLICY) == LimitOverrides(io_read_iops=30, io_write_iops=40)
    zero = pb.StartJobRequest(command="x", limits=pb.Limits(pids=0))  # set to 0 is not unset
    with pytest.raises(InvalidJobSpec):
        convert.overrides_of(zero, POLICY)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (pb.Limits(cpu=math.inf), "limits.cpu inf is not a finite number of cores"),
        (pb.Limits(cpu=math.nan), "limits.cpu nan is not a finite number of cores"),
        (pb.Limits(cpu=-1), "limits.cpu -1 is below the minimum 0.01"),
        (pb.Limits(cpu=0), "limits.cpu 0 is below the minimum 0.01"),
        (pb.Limits(cpu=1e300), "limits.cpu 1e+300 is above this host's 2 CPUs"),
        (pb.Limits(cpu=2.5), "limits.cpu 2.5 is above this host's 2 CPUs"),
        (pb.Limits(memory_bytes=1), "limits.memory_bytes 1 is below the minimum 1M"),
        (pb.Limits(memory_bytes=3 * 2**30), "limits.memory_bytes 3G is above the maximum 2G"),
        (
            pb.Limits(pids=2**32 - 1),
            "limits.pids 4294967295 is above this host's pid_max 32768",
        ),
        (
            pb.Limits(io_read_bytes_per_second=0),
            "limits.io_read_bytes_per_second 0 is below the minimum 1",
        ),
        (
            # U64_MAX is what the kernel reads as "max": no limit at all.
            pb.Limits(io_write_bytes_per_second=2**64 - 1),
            "limits.io_write_bytes_per_second 18446744073709551615 is above the largest"
            " rate the kernel takes",
        ),
        (pb.Limits(io_read_iops=0), "limits.io_read_iops 0 is below the minimum 1"),
        (
            # The kernel keeps IOPS in 32 bits: 2^32 - 1 is its "max", 2^32 would wrap to 0.
            pb.Limits(io_write_iops=2**32 - 1),
            "limits.io_write_iops 4294967295 is above the largest IOPS limit the kernel takes"
            " (allowed: 1 to 4294967294)",
        ),
        (pb.Limits(io_read_iops=2**64 - 1), "limits.io_read_iops 18446744073709551615 is above"),
    ],
)
def test_limits_out_of_range_are_invalid_argument_naming_the_field_and_the_range(
    limits: pb.Limits, message: str
) -> None:
    with pytest.raises(LimitOutOfRange) as caught:
        convert.overrides_of(pb.StartJobRequest(command="x", limits=limits), POLICY)
    error = as_grpc_error(caught.value)
    assert error is not None and error.status is Status.INVALID_ARGUMENT
    assert error.message.startswith(message), error.message
    assert "(allowed: " in error.message and "_bps" not in error.message


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [
        (pb.Limits(cpu=math.nan), "(allowed: 0.01 to 2)"),
        (pb.Limits(memory_bytes=2**40), "(allowed: 1M to 2G)"),
        (pb.Limits(pids=1), "(allowed: 2 to 32768)"),
        (pb.Limits(io_read_bytes_per_second=0), "(allowed: 1 to 18446744073709551614)"),
    ],
)
def test_the_allowed_range_is_the_servers_maximum_or_the_hosts(
    limits: pb.Limits, allowed: str
) -> None:
    with pytest.raises(LimitOutOfRange) as caught:
        convert.overrides_of(pb.StartJobRequest(command="x", limits=limits), POLICY)
    assert str(caught.value).endswith(allowed)


def test_limits_at_the_top_of_the_range_are_accepted() -> None:
    top = pb.Limits(
        cpu=2,
        memory_bytes=2 * 2**30,
        pids=32768,
        io_read_bytes_per_second=2**64 - 2,
        io_write_bytes_per_second=2**64 - 2,
        io_read_iops=2**32 - 2,
        io_write_iops=2**32 - 2,
    )
    overrides = convert.overrides_of(pb.StartJobRequest(command="x", limits=top), POLICY)
    assert POLICY.resolve(overrides).pids == 32768
    assert POLICY.resolve(overrides).io_write_iops == 2**32 - 2


def test_a_status_without_iops_limits_leaves_them_unset() -> None:
    # Unset in a JobStatus's limits means the job had no such limit; every other field is set.
    message = convert.limits_to_proto(Limits(io_write_iops=40))
    assert not message.HasField("io_read_iops") and message.io_write_iops == 40
    assert convert.limits_from_proto(message) == Limits(io_write_iops=40)
    message.ClearField("pids")
    with pytest.raises(ValueError, match="limits lack pids"):
        convert.limits_from_proto(message)


def test_job_references() -> None:
    # Full ids come out canonical; names and prefixes as given (test_references.py has more).
    job_id = str(uuid.uuid4())
    assert convert.job_id_of(job_id) == job_id
    assert convert.job_id_of(job_id.upper()) == job_id
    assert convert.job_id_of(job_id.replace("-", "")) == job_id
    assert convert.job_id_of(str(uuid.UUID(int=0))) == "00000000-0000-0000-0000-000000000000"
    assert convert.job_id_of("Build.2") == "Build.2"
    for bad in ("", "{" + job_id + "}", job_id + "\n", "-x"):
        with pytest.raises(InvalidRequest):
            convert.job_id_of(bad)
    with pytest.raises(InvalidRequest) as caught:
        convert.job_id_of("y" * 100_000)
    assert len(str(caught.value)) < 200  # the value is cut short in the message


@pytest.mark.parametrize("signum", [1, 9, 10, 15, 31, 34, 64])
def test_signals(signum: int) -> None:
    assert convert.signal_of(pb.SignalJobRequest(signal=signum)) == signum


@pytest.mark.parametrize("signum", [0, -9, 32, 33, 65, 2**31 - 1])
def test_numbers_that_are_no_signals(signum: int) -> None:
    with pytest.raises(InvalidRequest, match=f"signal {signum} is not a signal number"):
        convert.signal_of(pb.SignalJobRequest(signal=signum))


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [(None, None), (Duration(), 0.0), (Duration(seconds=2, nanos=500_000_000), 2.5)],
)
def test_grace_periods(duration: Duration | None, seconds: float | None) -> None:
    request = pb.StopJobRequest(job_id="x", grace_period=duration)
    assert convert.grace_period_of(request) == seconds


def test_the_longest_grace_period_is_the_maximum() -> None:
    at_most = pb.StopJobRequest(grace_period=Duration(seconds=int(convert.MAX_GRACE_PERIOD_S)))
    assert convert.grace_period_of(at_most) == convert.MAX_GRACE_PERIOD_S
    beyond = pb.StopJobRequest(grace_period=Duration(seconds=11))
    with pytest.raises(InvalidRequest, match="above the maximum 10s"):
        convert.grace_period_of(beyond, maximum_s=10)


@pytest.mark.parametrize(
    "env",
    [{"": "x"}, {"A=B": "x"}, {"A\0": "x"}, {"A": "x\0"}],
    ids=["empty", "eq", "nul", "value"],
)
def test_bad_environments(env: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest, match="env"):
        convert.env_of(pb.StartJobRequest(command="x", env=env))


def test_a_good_environment_passes_as_is() -> None:
    env = {"A": "", "B_2": "x=y z", "ünï": "☕"}
    assert convert.env_of(pb.StartJobRequest(command="x", env=env)) == env


# --- the error table -----------------------------------------------------------------------------

job_id = str(uuid.uuid4())
CASES = [
    (InvalidRequest("bad"), Status.INVALID_ARGUMENT),
    (InvalidJobSpec("requested io_read_bps 2M is above the maximum 1M"), Status.INVALID_ARGUMENT),
    (JobNotFound(job_id), Status.NOT_FOUND),
    (NoSuchJob('no job named "build"'), Status.NOT_FOUND),
    (JobNameTaken("build", job_id, "running"), Status.ALREADY_EXISTS),
    (JobEnded(job_id, "finished"), Status.FAILED_PRECONDITION),
    (PermissionDenied("vera may not stop jobs"), Status.PERMISSION_DENIED),
    (TooManyJobs(5, per_user=True), Status.RESOURCE_EXHAUSTED),
    (TooManyLogStreams(5, per_user=False), Status.RESOURCE_EXHAUSTED),
    (ShuttingDown("going"), Status.UNAVAILABLE),
    (TransientUsersExhausted("every transient uid is in use"), Status.RESOURCE_EXHAUSTED),
    (JobNotEnded("5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a51"), Status.FAILED_PRECONDITION),
    (Unavailable("the disk is full"), Status.UNAVAILABLE),
    (StdinUnavailable("its stdin has been written already"), Status.FAILED_PRECONDITION),
    (StoreUnavailable("job store: disk I/O error"), Status.UNAVAILABLE),
]


@pytest.mark.parametrize(("exc", "status"), CASES, ids=lambda x: type(x).__name__)
def test_each_domain_error_has_its_status(exc: Exception, status: Status) -> None:
    error = as_grpc_error(exc)
    assert error is not None and error.status is status and error.message


def test_the_table_is_covered_by_the_cases_above() -> None:
    assert {type(exc) for exc, _ in CASES} == set(STATUS_OF)


def test_anything_else_is_left_to_the_transport_as_a_bug() -> None:
    for exc in (RuntimeError("boom"), KeyError("x"), ValueError("v")):
        assert as_grpc_error(exc) is None


def test_messages_say_what_to_do() -> None:
    spec = as_grpc_error(InvalidJobSpec("requested io_read_bps 2M is above the maximum 1M"))
    assert spec is not None and "io_read_bytes_per_second 2M" in spec.message
    ended = as_grpc_error(JobEnded(job_id, "stopped"))
    assert ended is not None and job_id in ended.message and "stopped" in ended.message
    taken = as_grpc_error(JobNameTaken("build", job_id, "running"))
    assert taken is not None and job_id in taken.message and '"build"' in taken.message


@pytest.mark.parametrize(
    ("legacy", "version"),
    [
        (b"v1", pb.CGROUP_VERSION_V1),
        (b"v2", pb.CGROUP_VERSION_V2),
        (b"off", pb.CGROUP_VERSION_NONE),
    ],
)
def test_a_status_stored_before_the_api_was_settled_keeps_its_cgroup_version(
    legacy: bytes, version: int
) -> None:
    """Such a status says its cgroups in field 18, a string then, reserved now: what `jobctl
    status` showed of an ended job must survive the upgrade, and the legacy field must not go
    out to clients."""
    settled = pb.JobStatus(job_id="j", owner="alice", state=pb.JOB_STATE_FINISHED, exit_code=0)
    blob = settled.SerializeToString() + b"\x92\x01" + bytes([len(legacy)]) + legacy
    status = convert.stored_status(blob)
    assert status.cgroup_version == version
    assert (status.job_id, status.owner, status.exit_code) == ("j", "alice", 0)
    assert (
        status.SerializeToString()
        == pb.JobStatus(
            job_id="j",
            owner="alice",
            state=pb.JOB_STATE_FINISHED,
            exit_code=0,
            cgroup_version=version,
        ).SerializeToString()
    )


def test_a_status_stored_now_reads_back_unchanged() -> None:
    stored = pb.JobStatus(job_id="j", owner="bob", cgroup_version=pb.CGROUP_VERSION_V2)
    assert convert.stored_status(stored.SerializeToString()) == stored


@pytest.mark.parametrize(
    ("order_by", "newest_first"),
    [
        ("", False),
        ("create_time", False),
        ("create_time asc", False),
        (" Create_Time   DESC ", True),
        ("created_at desc", True),  # as clients from before the API was settled said it
    ],
)
def test_order_by_takes_the_field_as_the_api_names_it(order_by: str, newest_first: bool) -> None:
    assert convert.newest_first_of(pb.ListJobsRequest(order_by=order_by)) is newest_first


@pytest.mark.parametrize("order_by", ["desc", "owner", "create_time sideways", " asc"])
def test_order_by_refuses_anything_else(order_by: str) -> None:
    with pytest.raises(InvalidRequest, match='order_by must be "create_time" or'):
        convert.newest_first_of(pb.ListJobsRequest(order_by=order_by))
