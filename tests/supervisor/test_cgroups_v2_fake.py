"""The cgroup v2 backend against a fake cgroup2 tree: which files get which contents.

The fake kernel does one thing the real one does: mkdir populates the control files. Real v2
enforcement is tested in a VM (tools/cgroup2_vm.sh runs this suite on a v2-only kernel).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.supervisor import CgroupsUnavailable, Limits
from jobworker.supervisor.cgroups.backends import V2Backend
from jobworker.supervisor.cgroups.discover import disks_for

CONTROL_FILES = {
    "cgroup.procs": "",
    "cgroup.controllers": "cpu io memory pids",
    "cgroup.subtree_control": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.kill": "",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 0\nthrottled_usec 0\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.oom.group": "0\n",
    "memory.events": "oom 0\noom_kill 0\n",
    "memory.peak": "0\n",
    "memory.current": "0\n",
    "io.max": "",
    "io.stat": "",
    "pids.max": "max\n",
    "pids.events": "max 0\n",
}


class FakeKernelV2Backend(V2Backend):
    def _mkdir(self, path: Path) -> None:
        os.mkdir(path)
        for name, content in CONTROL_FILES.items():
            (path / name).write_text(content)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, content in CONTROL_FILES.items():
        (root / name).write_text(content)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    return root


def read(path: Path) -> str:
    return path.read_text()


def test_supervisor_moves_into_a_leaf_then_delegates_controllers(root):
    backend = FakeKernelV2Backend(root, "jobworker-test")
    # "No internal processes": this process now lives in a leaf, and the controllers flow down.
    assert read(root / "jobworker-supervisor/cgroup.procs") == str(os.getpid())
    assert read(root / "cgroup.subtree_control") == "+cpu +memory +io +pids"
    assert read(root / "jobworker-test/cgroup.subtree_control") == "+cpu +memory +io +pids"
    assert backend.subtree == root / "jobworker-test"


def test_job_leaf_gets_its_limits(root, tmp_path):
    backend = FakeKernelV2Backend(root, "jobworker-test")
    limits = Limits(cpu=0.5, memory_bytes=64 * 2**20, io_read_bps=1000, io_write_bps=2000, pids=32)
    group = backend.create("job-1", limits, str(tmp_path))
    leaf = root / "jobworker-test/job-1"
    (disk,) = disks_for(tmp_path)
    assert read(leaf / "cpu.max") == "50000 100000"
    assert read(leaf / "memory.max") == str(64 * 2**20)
    assert read(leaf / "memory.swap.max") == "0"
    assert read(leaf / "memory.oom.group") == "1"
    assert read(leaf / "io.max") == f"{disk} rbps=1000 wbps=2000"
    assert read(leaf / "pids.max") == "32"
    assert group.procs_files == (leaf / "cgroup.procs",)


@pytest.mark.parametrize(
    ("iops", "line"),
    [
        ({"io_read_iops": 30, "io_write_iops": 40}, "rbps=1000 wbps=2000 riops=30 wiops=40"),
        ({"io_write_iops": 40}, "rbps=1000 wbps=2000 wiops=40"),  # riops stays "max"
    ],
)
def test_iops_limits_join_the_io_max_line(root, tmp_path, iops, line):
    backend = FakeKernelV2Backend(root, "jobworker-test")
    backend.create("job-1", Limits(io_read_bps=1000, io_write_bps=2000, **iops), str(tmp_path))
    (disk,) = disks_for(tmp_path)
    assert read(root / "jobworker-test/job-1/io.max") == f"{disk} {line}"


def test_counters_and_usage_are_read_from_the_leaf(root, tmp_path):
    backend = FakeKernelV2Backend(root, "jobworker-test")
    group = backend.create("job-1", Limits(), str(tmp_path))
    leaf = root / "jobworker-test/job-1"
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    (leaf / "pids.events").write_text("max 4\n")
    (leaf / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\nthrottled_usec 500000\n")
    (leaf / "memory.peak").write_text("12345\n")
    (leaf / "memory.current").write_text("4096\n")
    (leaf / "io.stat").write_text("254:0 rbytes=10 wbytes=20 rios=1 wios=1\n")
    assert group.oom_kills() == 1 and group.pids_limit_hits() == 4
    usage = group.usage()
    assert (usage.cpu_s, usage.cpu_throttled_s, usage.memory_peak_bytes) == (2.5, 0.5, 12345)
    assert usage.memory_bytes == 4096
    assert (usage.io_read_bytes, usage.io_write_bytes) == (10, 20)


async def test_kill_writes_cgroup_kill_and_remove_removes(root, tmp_path):
    backend = FakeKernelV2Backend(root, "jobworker-test")
    group = backend.create("job-1", Limits(), str(tmp_path))
    leaf = root / "jobworker-test/job-1"
    await group.kill()
    assert read(leaf / "cgroup.kill") == "1"
    await group.wait_empty()  # "populated 0" already
    for name in CONTROL_FILES:  # the real kernel's files vanish with rmdir
        (leaf / name).unlink()
    await group.remove()
    assert not leaf.exists()


def test_a_second_supervisor_in_the_same_process_reuses_the_leaf(root):
    FakeKernelV2Backend(root, "jobworker-one")
    # /proc/self/cgroup now names the leaf; the next Supervisor starts from there.
    second = FakeKernelV2Backend(root / "jobworker-supervisor", "jobworker-two")
    assert second.subtree == root / "jobworker-two"


def test_missing_controllers_are_refused_with_the_fix(root):
    (root / "cgroup.controllers").write_text("cpu pids\n")
    with pytest.raises(CgroupsUnavailable, match=r"memory io .*Delegate=yes"):
        FakeKernelV2Backend(root, "jobworker-test")
    assert not (root / "jobworker-test").exists()
