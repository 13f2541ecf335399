from __future__ import annotations

import math
import os

import pytest

from jobworker.supervisor import (
    HostCapacity,
    InvalidJobSpec,
    LimitOutOfRange,
    LimitOverrides,
    LimitPolicy,
    Limits,
)
from jobworker.supervisor.limits import (
    MAX_IO_BPS,
    MAX_IOPS,
    PID_MAX_LIMIT,
    GiB,
    MiB,
    format_bytes,
    parse_bytes,
    usable_cpus,
)

HOST = HostCapacity(cpus=2, memory_bytes=4 * GiB, pids=32768)


def test_defaults_are_seed_000s_plus_a_pids_cap():
    limits = Limits()
    assert (limits.cpu, limits.memory_bytes) == (0.5, GiB)
    assert (limits.io_read_bps, limits.io_write_bps, limits.pids) == (100 * MiB, 100 * MiB, 4096)
    assert limits.cpu_quota_us == 50_000
    assert (limits.io_read_iops, limits.io_write_iops) == (None, None)  # IOPS: opt-in


@pytest.mark.parametrize(
    "bad",
    [
        {"cpu": 0},
        {"cpu": -1},
        {"cpu": math.nan},
        {"cpu": math.inf},
        {"cpu": 0.001},
        {"cpu": True},
        {"memory_bytes": -1},
        {"memory_bytes": 1000},
        {"memory_bytes": 1.5 * GiB},
        {"io_read_bps": 0},
        {"io_write_bps": -5},
        {"pids": 1},
        {"pids": "10"},
        {"io_read_iops": 0},
        {"io_write_iops": -1},
        {"io_read_iops": 1.5},
        {"io_write_iops": True},
    ],
)
def test_nonsense_limits_are_refused_with_their_name(bad):
    (name,) = bad
    for cls in (Limits, LimitOverrides):
        with pytest.raises(InvalidJobSpec, match=name):
            cls(**bad)


def test_overrides_fill_from_defaults_and_respect_maximums():
    policy = LimitPolicy(
        defaults=Limits(cpu=0.25), maximums=LimitOverrides(cpu=1, memory_bytes=2 * GiB), host=HOST
    )
    assert policy.resolve(None) == Limits(cpu=0.25)
    assert policy.resolve(LimitOverrides(memory_bytes=512 * MiB)) == Limits(
        cpu=0.25, memory_bytes=512 * MiB
    )
    assert policy.resolve(LimitOverrides(cpu=1)).cpu == 1  # at the maximum is fine
    with pytest.raises(
        LimitOutOfRange,
        match=r"^requested memory_bytes 3G is above the maximum 2G \(allowed: 1M to 2G\)$",
    ):
        policy.resolve(LimitOverrides(memory_bytes=3 * GiB))
    with pytest.raises(InvalidJobSpec, match="cpu"):
        policy.resolve(Limits(cpu=2))  # a complete Limits is checked too


def test_defaults_above_maximums_are_refused():
    with pytest.raises(
        LimitOutOfRange, match=r"^default pids 4096 is above the maximum 100 \(allowed: 2 to"
    ):
        LimitPolicy(maximums=LimitOverrides(pids=100), host=HOST)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # What a typo asks for, and what the kernel would refuse (a job in ERROR, not a refusal).
        (LimitOverrides(cpu=1e300), "cpu 1e+300 is above this host's 2 CPUs"),
        (LimitOverrides(cpu=3), "cpu 3 is above this host's 2 CPUs (allowed: 0.01 to 2)"),
        (
            LimitOverrides(memory_bytes=5 * GiB),
            "memory_bytes 5G is above this host's 4G of RAM",
        ),
        (LimitOverrides(pids=2**32 - 1), "pids 4294967295 is above this host's pid_max 32768"),
        (LimitOverrides(io_read_bps=2**64 - 1), "io_read_bps 18446744073709551615 is above"),
        (LimitOverrides(io_write_bps=2**70), "io_write_bps 1073741824T is above the largest"),
        # The kernel keeps IOPS in 32 bits: 2^32 - 1 means "no limit", 2^32 would read back 0.
        (
            LimitOverrides(io_read_iops=2**32 - 1),
            "io_read_iops 4294967295 is above the largest IOPS limit the kernel takes "
            "(allowed: 1 to 4294967294)",
        ),
        (LimitOverrides(io_write_iops=2**32), "io_write_iops 4294967296 is above the largest"),
    ],
)
def test_without_a_maximum_the_host_is_the_maximum(overrides, message):
    policy = LimitPolicy(host=HOST)
    with pytest.raises(LimitOutOfRange) as caught:
        policy.resolve(overrides)
    assert str(caught.value).startswith(f"requested {message}")


def test_the_top_of_each_range_is_accepted():
    top = Limits(
        cpu=2,
        memory_bytes=4 * GiB,
        io_read_bps=MAX_IO_BPS,
        io_write_bps=MAX_IO_BPS,
        pids=32768,
        io_read_iops=MAX_IOPS,
        io_write_iops=MAX_IOPS,
    )
    assert LimitPolicy(host=HOST).resolve(top) == top


def test_iops_limits_have_defaults_and_maximums_like_the_others():
    policy = LimitPolicy(
        defaults=Limits(io_read_iops=50, io_write_iops=60),
        maximums=LimitOverrides(io_read_iops=100, io_write_iops=200),
        host=HOST,
    )
    assert policy.resolve(None) == Limits(io_read_iops=50, io_write_iops=60)
    assert policy.resolve(LimitOverrides(io_write_iops=200)).io_write_iops == 200
    with pytest.raises(
        LimitOutOfRange,
        match=r"^requested io_read_iops 101 is above the maximum 100 \(allowed: 1 to 100\)$",
    ):
        policy.resolve(LimitOverrides(io_read_iops=101))
    assert Limits(io_read_iops=7).describe().endswith("pids=4096 io-read-iops=7")
    assert "iops" not in Limits().describe()


def test_a_maximum_iops_without_a_default_is_refused():
    # Without a default, a job asking nothing would run with no IOPS limit, above the maximum.
    with pytest.raises(
        LimitOutOfRange,
        match=r"^default io_read_iops unset \(no limit\) is above the maximum 100 "
        r"\(allowed: 1 to 100\)$",
    ):
        LimitPolicy(maximums=LimitOverrides(io_read_iops=100), host=HOST)


@pytest.mark.parametrize(
    ("maximums", "message"),
    [
        (LimitOverrides(cpu=64), "maximum cpu 64 is above this host's 2 CPUs"),
        (LimitOverrides(memory_bytes=8 * GiB), "maximum memory_bytes 8G is above this host's"),
        (LimitOverrides(pids=2**22), "maximum pids 4194304 is above this host's pid_max"),
    ],
)
def test_a_maximum_above_what_the_host_has_is_refused(maximums, message):
    with pytest.raises(LimitOutOfRange, match=f"^{message}"):
        LimitPolicy(maximums=maximums, host=HOST)


def test_the_check_names_the_limit_and_its_range():
    policy = LimitPolicy(maximums=LimitOverrides(cpu=1), host=HOST)
    with pytest.raises(LimitOutOfRange) as caught:
        policy.check("cpu", math.nan)
    assert (caught.value.name, caught.value.what) == ("cpu", "")
    assert caught.value.detail == "nan is not a finite number of cores (allowed: 0.01 to 1)"
    assert policy.maximum("cpu") == (1, "the maximum 1")
    assert policy.maximum("pids") == (32768, "this host's pid_max 32768")


def test_the_host_is_probed_from_the_kernel():
    host = HostCapacity.probe()
    assert 1 <= host.cpus <= len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        assert f"{host.memory_bytes // 1024} kB" in " ".join(f.read().split()[:3])
    with open("/proc/sys/kernel/pid_max") as f:
        assert host.pids == min(int(f.read()), PID_MAX_LIMIT)
    assert LimitPolicy().host == host  # the default policy's


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"),
    [(4, None, 4), (4, 2.0, 2), (4, 2.5, 3), (4, 0.25, 1), (2, 8.0, 2), (1, 0.001, 1)],
)
def test_a_cgroup_quota_caps_the_cpus_rounded_up(affinity, quota, cpus):
    assert usable_cpus(affinity, quota) == cpus


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512K", 512 * 1024),
        ("100M", 100 * MiB),
        ("1G", GiB),
        ("1GiB", GiB),
        ("1.5G", 3 * GiB // 2),
        (" 2 m ", 2 * MiB),
        ("1gb", GiB),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "1X", "1.1", "ten", "1e9"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="not a"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("value", "text"), [(GiB, "1G"), (1536, "1.5K"), (100 * MiB, "100M"), (1000, "1000"), (0, "0")]
)
def test_format_bytes_round_trips(value, text):
    assert format_bytes(value) == text
    assert parse_bytes(text) == value
