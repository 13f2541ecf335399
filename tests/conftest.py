"""Suite-wide guard: a test run that leaves a cgroup, a process or a temporary directory behind
fails, even when every test passed.

What counts as ours: any cgroup directory named ``jobworker-*`` (every Supervisor's subtree is),
any process sitting in such a cgroup, any child of this pytest process, any ``jobworker-*``
entry in the temporary directory (a Supervisor's private data_dir), and any
``jobworker-tests-*`` directory that `shared_path` makes, and the server's default data directory.
Everything present before the session started is ignored.

Also here: `shared_path`, a directory a test shares with its jobs. Jobs run isolated by default
(as root): their /tmp, /var/tmp and /dev/shm are private, so pytest's tmp_path (in /tmp) is out
of their sight.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# The suite must give the same answer every run: property tests draw the same examples each
# time. To search wider for new failures: HYPOTHESIS_PROFILE=explore (random, more examples).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

CGROUP_ROOT = Path("/sys/fs/cgroup")
# On cgroup v2 the supervisor moves itself into this leaf, and it stays there while it lives.
SUPERVISOR_LEAF = "jobworker-supervisor"


def _cgroups() -> set[str]:
    found = set()
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        for name in dirs:
            if name.startswith("jobworker-") and name != SUPERVISOR_LEAF:
                found.add(os.path.join(top, name))
    return found


def _processes() -> set[str]:
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cgroup", encoding="utf-8") as f:
                cgroup = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command may contain spaces and parentheses: fields resume after the last ')'.
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        in_job_group = any(
            "/jobworker-" in line and SUPERVISOR_LEAF not in line for line in cgroup.splitlines()
        )
        # A killed job's orphans stay zombies until PID 1 reaps them (about a second): dead,
        # not leaked. A zombie child of ours, though, is one we forgot to wait for.
        if int(ppid) == me or (in_job_group and state != b"Z"):
            found.add(f"pid {entry} ({comm})")
    return found


def _temp_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {os.path.join(tmp, n) for n in os.listdir(tmp) if n.startswith("jobworker-")}


# Where shared directories go: a real disk (the IO tests need one) that every user may enter.
# In the cgroup v2 VM the root is 9p, so the runner's scratch disk.
SHARED_BASE = Path(os.environ.get("JOBWORKER_VM_DISK") or "/var/lib")
SHARED_PREFIX = "jobworker-tests-"


def _shared_dirs() -> set[str]:
    try:
        return {str(p) for p in SHARED_BASE.iterdir() if p.name.startswith(SHARED_PREFIX)}
    except OSError:
        return set()


# `jobworker serve`'s default data directory as root: a real server's, never the suite's (every
# server a test starts names a directory of its own).
DEFAULT_DATA_DIR = Path("/var/lib/jobworker")


def _snapshot() -> dict[str, set[str]]:
    return {
        "cgroups": _cgroups(),
        "processes": _processes(),
        "temporary dirs": _temp_dirs() | _shared_dirs(),
        "state": {str(DEFAULT_DATA_DIR)} if DEFAULT_DATA_DIR.exists() else set(),
    }


@pytest.fixture(scope="session")
def _shared_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=SHARED_PREFIX, dir=SHARED_BASE))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture
def shared_path(_shared_root: Path, request: pytest.FixtureRequest) -> Path:
    """An empty directory this test shares with its jobs: outside the jobs' private /tmp, on a
    real disk, and writable by any user (a job's transient uid included)."""
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=_shared_root))
    path.chmod(0o1777)
    return path


_before: dict[str, set[str]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_snapshot())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    after = _snapshot()
    leaks = {kind: sorted(after[kind] - _before.get(kind, set())) for kind in after}
    leaks = {kind: items for kind, items in leaks.items() if items}
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the test session left things behind:"]
    for kind, items in leaks.items():
        lines += [f"  {kind}:", *(f"    {item}" for item in items)]
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
