"""Discovery and planning: pure, on captured files."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from jobworker.supervisor import Limits
from jobworker.supervisor.cgroups.discover import (
    disks_for,
    parse_mountinfo,
    parse_proc_cgroup,
    read_layout,
)
from jobworker.supervisor.cgroups.plan import (
    parse_flat_keyed,
    parse_v1_io_service_bytes,
    parse_v2_io_stat,
    v1_settings,
    v1_usage,
    v2_settings,
    v2_usage,
)

# Captured on one of our machines (hybrid: v1 controllers, cgroup2 without controllers).
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
4:memory:/process_api/1dc8
2:cpuacct:/
1:cpu:/
0::/
"""
# A systemd v2 host, and a container that sees only its own subtree mounted at the root.
V2_MOUNTINFO = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
CONTAINER_MOUNTINFO = "30 25 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"


def test_hybrid_layout():
    layout = read_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP)
    assert layout.v1["memory"] == Path("/sys/fs/cgroup/memory/process_api/1dc8")
    assert layout.v1["cpu"] == Path("/sys/fs/cgroup/cpu")
    assert "cpuset" not in layout.v1  # not mounted in this capture
    assert layout.unified == Path("/sys/fs/cgroup/unified")


def test_v2_layout_and_a_mount_of_a_subtree():
    own = "0::/system.slice/jobworker.service\n"
    assert read_layout(V2_MOUNTINFO, own).unified == Path(
        "/sys/fs/cgroup/system.slice/jobworker.service"
    )
    inside = "0::/kubepods/pod1/app\n"
    assert read_layout(CONTAINER_MOUNTINFO, inside).unified == Path("/sys/fs/cgroup/app")
    # Outside the mounted subtree nothing of ours is reachable: no unified hierarchy.
    assert read_layout(CONTAINER_MOUNTINFO, "0::/elsewhere\n").unified is None
    assert read_layout(V2_MOUNTINFO, own).v1 == {}


def test_mountinfo_escapes_and_noise():
    text = r"1 2 0:3 / /mnt/with\040space rw - cgroup2 none rw" + "\n" + "garbage line\n"
    (mount,) = parse_mountinfo(text)
    assert mount.mount_point == Path("/mnt/with space") and mount.version == 2


def test_proc_cgroup_with_comounted_controllers():
    v1, v2 = parse_proc_cgroup("3:cpu,cpuacct:/a\n0::/b\n")
    assert v1 == {"cpu": PurePosixPath("/a"), "cpuacct": PurePosixPath("/a")}
    assert v2 == PurePosixPath("/b")


def _fake_sys(tmp_path: Path, st_dev: int) -> Path:
    """A /sys with disk 8:0 (partition 8:1 holding our file) and a virtual loop0."""
    sys_root = tmp_path / "sys"
    disk = sys_root / "devices/pci0000:00/block/sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sda1/dev").write_text("8:1\n")
    (disk / "sda1/partition").write_text("1\n")
    loop = sys_root / "devices/virtual/block/loop0"
    loop.mkdir(parents=True)
    (loop / "dev").write_text("7:0\n")
    (sys_root / "block").mkdir()
    (sys_root / "block/sda").symlink_to(disk)
    (sys_root / "block/loop0").symlink_to(loop)
    (sys_root / "dev/block").mkdir(parents=True)
    (sys_root / "dev/block/8:1").symlink_to(disk / "sda1")
    own = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    if own != "8:1":
        (sys_root / "dev/block" / own).symlink_to(disk / "sda1")
    return sys_root


def test_a_partition_resolves_to_its_whole_disk(tmp_path):
    sys_root = _fake_sys(tmp_path, os.stat(tmp_path).st_dev)
    assert disks_for(tmp_path, sys_root=sys_root) == ["8:0"]


def test_no_block_device_means_every_real_disk(tmp_path):
    sys_root = _fake_sys(tmp_path, os.stat(tmp_path).st_dev)
    for link in (sys_root / "dev/block").iterdir():
        link.unlink()  # as for tmpfs, overlay or 9p: st_dev names no block device
    assert disks_for(tmp_path, sys_root=sys_root) == ["8:0"]  # loop0 is virtual


def test_this_machines_disk_is_found():
    disks = disks_for("/")
    assert len(disks) >= 1 and all(":" in d for d in disks)


def test_v2_settings():
    limits = Limits(cpu=1.5, memory_bytes=2**30, io_read_bps=10, io_write_bps=20, pids=64)
    assert v2_settings(limits, ["8:0", "254:0"], swap_file=True) == [
        ("cpu.max", "150000 100000"),
        ("memory.max", "1073741824"),
        ("memory.swap.max", "0"),
        ("memory.oom.group", "1"),
        ("io.max", "8:0 rbps=10 wbps=20"),
        ("io.max", "254:0 rbps=10 wbps=20"),
        ("pids.max", "64"),
    ]
    assert "default" not in str(v2_settings(limits, ["8:0"], swap_file=False))


def test_v1_settings_write_memory_before_memsw():
    limits = Limits(memory_bytes=2**30, io_read_bps=10, io_write_bps=20)
    settings = v1_settings(limits, ["254:0"], memsw_file=True)
    files = [name for _, name, _ in settings]
    assert files.index("memory.limit_in_bytes") < files.index("memory.memsw.limit_in_bytes")
    assert ("blkio", "blkio.throttle.read_bps_device", "254:0 10") in settings
    assert ("blkio", "blkio.throttle.write_bps_device", "254:0 20") in settings
    assert ("cpu", "cpu.cfs_quota_us", "50000") in settings
    assert "memory.memsw.limit_in_bytes" not in str(v1_settings(limits, [], memsw_file=False))
    assert "iops" not in str(settings)  # none asked for: the kernel's "no limit" stays


def test_v1_settings_write_iops_limits_per_disk():
    limits = Limits(io_read_iops=30, io_write_iops=40)
    settings = v1_settings(limits, ["254:0", "8:0"], memsw_file=False)
    for disk in ("254:0", "8:0"):
        assert ("blkio", "blkio.throttle.read_iops_device", f"{disk} 30") in settings
        assert ("blkio", "blkio.throttle.write_iops_device", f"{disk} 40") in settings


def test_usage_parsers():
    io_stat = "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=1 wbytes=2\n"
    assert parse_v2_io_stat(io_stat) == (101, 202)
    service = "254:0 Read 4096\n254:0 Write 8192\n254:0 Sync 0\n254:0 Total 12288\nTotal 12288\n"
    assert parse_v1_io_service_bytes(service) == (4096, 8192)
    usage = v2_usage("usage_usec 1500000\nthrottled_usec 250000\n", "4096\n", io_stat)
    assert (usage.cpu_s, usage.cpu_throttled_s, usage.memory_peak_bytes) == (1.5, 0.25, 4096)
    assert v2_usage("usage_usec 1\n", None, None).memory_peak_bytes is None
    usage = v1_usage("2000000000\n", "nr_periods 3\nthrottled_time 500000000\n", "8192\n", service)
    assert (usage.cpu_s, usage.cpu_throttled_s, usage.io_write_bytes) == (2.0, 0.5, 8192)
    # Memory in use now: memory.current (v2), memory.usage_in_bytes (v1).
    assert v2_usage("usage_usec 1\n", None, None, "1024\n").memory_bytes == 1024
    assert v1_usage("1\n", "", "8192\n", "", "2048\n").memory_bytes == 2048
    assert v2_usage("usage_usec 1\n", None, None).memory_bytes is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("max 3\n", {"max": 3}),
        (
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2},
        ),
        ("populated 1\nfrozen 0\nweird line\n", {"populated": 1, "frozen": 0}),
    ],
)
def test_flat_keyed(text, expected):
    assert parse_flat_keyed(text) == expected
