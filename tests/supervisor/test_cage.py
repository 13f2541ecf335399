"""The cage's plan (pure: sandbox.py), the uid pool, and the cage program itself."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from jobworker.supervisor import RunAs, TransientUsersExhausted
from jobworker.supervisor.sandbox import (
    CagePlan,
    UidPool,
    cage_argv,
    cage_program,
    parse_subordinate_ranges,
    paths_to_hide,
)

CAGE_SOURCE = Path(__file__).parents[2] / "jobworker" / "supervisor" / "cage" / "cage.c"
TRANSIENT = RunAs(uid=70001, gid=70001, transient=True, home="/w")


def plan(**changes) -> CagePlan:
    fields = dict(
        argv=("sh", "-c", "true"),
        cwd="/data/work/j",
        run_as=TRANSIENT,
        network="host",
        cgroup_procs=(Path("/cg/memory/j/cgroup.procs"),),
        cgroupfs=((Path("/sys/fs/cgroup/memory"), "cgroup", "memory"),),
        hide=("/data",),
        bind=("/data/work/j",),
        private_dirs=("/tmp", "/no/such/private/dir"),
    )
    fields.update(changes)
    return CagePlan(**fields)


def options(argv: list[str]) -> list[str]:
    return argv[1 : argv.index("--")]


def test_a_transient_user_gets_its_ids_no_groups_and_a_read_only_root() -> None:
    argv = cage_argv(plan(), report_fd=3, env_fd=4, lifeline_fd=5)
    assert argv[0] == str(cage_program())
    assert argv[argv.index("--") :] == ["--", "sh", "-c", "true"]
    # In the order the cage applies them; only private directories that exist get a tmpfs.
    assert options(argv) == [
        "--report-fd", "3", "--env-fd", "4", "--lifeline-fd", "5", "--chdir", "/data/work/j",
        "--uid", "70001", "--gid", "70001", "--groups", "", "--readonly-root",
        "--tmpfs", "/tmp", "--hide", "/data", "--bind", "/data/work/j",
        "--cgroup", "/cg/memory/j/cgroup.procs",
        "--cgroupfs", "cgroup:memory:/sys/fs/cgroup/memory",
    ]  # fmt: skip


def test_root_keeps_root_and_an_account_keeps_its_groups_and_its_filesystem() -> None:
    root = options(cage_argv(plan(run_as=RunAs(uid=0, gid=0, name="root")), report_fd=3,
                             env_fd=4, lifeline_fd=5))  # fmt: skip
    assert "--uid" not in root and "--readonly-root" not in root
    alice = RunAs(uid=1000, gid=100, name="alice", groups=(27, 44))
    got = options(cage_argv(plan(run_as=alice, network="none"), report_fd=3, env_fd=4,
                            lifeline_fd=5))  # fmt: skip
    assert got[got.index("--groups") + 1] == "27,44"
    assert "--readonly-root" not in got and "--net-none" in got


def test_what_is_hidden() -> None:
    hidden = paths_to_hide(
        Path("/var/lib/jobworker"),
        [
            "/etc/jobworker/server.key",  # its directory goes with it (ca.key is there too)
            "/etc/jobworker/ca.crt",
            "/etc/jobworker.toml",  # /etc is shared: only the file
            "/var/lib/jobworker/inside.key",  # inside the data directory: covered already
            "/srv/tls/server.crt",
        ],
    )
    assert hidden == ["/srv/tls", "/etc/jobworker", "/var/lib/jobworker", "/etc/jobworker.toml"]


def test_subordinate_ranges_are_read_as_useradd_writes_them() -> None:
    text = "alice:100000:65536\n# a comment\nbroken line\nbob:165536:65536\n"
    assert parse_subordinate_ranges(text) == [(100000, 65536), (165536, 65536)]


def test_the_pool_skips_named_ids_and_shares_its_locks_with_other_pools(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid  # 65534: named, so never handed out
    uids = range(nobody, nobody + 3)
    lock = tmp_path / "uids.lock"
    first, second = UidPool(uids, lock), UidPool(uids, lock)
    first.open()
    second.open()
    try:
        a, b = first.acquire(), first.acquire()
        assert {a, b} == {nobody + 1, nobody + 2}
        with pytest.raises(TransientUsersExhausted):
            second.acquire()  # another pool (another server) finds both locked
        first.release(a)
        assert second.acquire() == a
    finally:
        first.close()
        second.close()


def test_the_program_is_built_from_the_current_source() -> None:
    # An editable install builds it once: after a change to cage.c, reinstall (tools/test.sh).
    done = subprocess.run(
        [cage_program(), "--source-sha256"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == hashlib.sha256(CAGE_SOURCE.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("arguments", "report"),
    [
        (["--bogus", "x"], "error usage 22\tunknown option --bogus"),
        (["--chdir", "/"], "error usage 22\tno command after -- "),
        (["--chdir", "/", "--tmpfs", "relative", "--", "true"], "error usage 22\tnot an absolute"),
        (["--chdir", "/", "--uid", "-1", "--", "true"], "error usage 22\tbad number: -1"),
    ],
)
def test_a_plan_it_cannot_carry_out_is_refused_before_anything_runs(arguments, report) -> None:
    read_end, write_end = os.pipe()
    try:
        done = subprocess.run(
            [cage_program(), "--report-fd", str(write_end), *arguments],
            pass_fds=(write_end,),
            capture_output=True,
            check=False,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            text = reader.read().decode()
    finally:
        for fd in (write_end,):
            try:
                os.close(fd)
            except OSError:
                pass
    assert done.returncode == 127
    assert text.startswith(report), text
