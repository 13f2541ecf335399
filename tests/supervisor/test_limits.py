from __future__ import annotations

import math

import pytest

from jobworker.supervisor import InvalidJobSpec, LimitOverrides, LimitPolicy, Limits
from jobworker.supervisor.limits import GiB, MiB, format_bytes, parse_bytes


def test_defaults_are_seed_000s_plus_a_pids_cap():
    limits = Limits()
    assert (limits.cpu, limits.memory_bytes) == (0.5, GiB)
    assert (limits.io_read_bps, limits.io_write_bps, limits.pids) == (100 * MiB, 100 * MiB, 4096)
    assert limits.cpu_quota_us == 50_000


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
    ],
)
def test_nonsense_limits_are_refused_with_their_name(bad):
    (name,) = bad
    for cls in (Limits, LimitOverrides):
        with pytest.raises(InvalidJobSpec, match=name):
            cls(**bad)


def test_overrides_fill_from_defaults_and_respect_maximums():
    policy = LimitPolicy(
        defaults=Limits(cpu=0.25), maximums=LimitOverrides(cpu=1, memory_bytes=2 * GiB)
    )
    assert policy.resolve(None) == Limits(cpu=0.25)
    assert policy.resolve(LimitOverrides(memory_bytes=512 * MiB)) == Limits(
        cpu=0.25, memory_bytes=512 * MiB
    )
    assert policy.resolve(LimitOverrides(cpu=1)).cpu == 1  # at the maximum is fine
    with pytest.raises(InvalidJobSpec, match="requested memory_bytes 3G is above the maximum 2G"):
        policy.resolve(LimitOverrides(memory_bytes=3 * GiB))
    with pytest.raises(InvalidJobSpec, match="cpu"):
        policy.resolve(Limits(cpu=2))  # a complete Limits is checked too


def test_defaults_above_maximums_are_refused():
    with pytest.raises(InvalidJobSpec, match="default pids 4096 is above the maximum 100"):
        LimitPolicy(maximums=LimitOverrides(pids=100))


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
