"""Suite-wide: each test session keeps to places of its own, and a session that leaves a
cgroup, a process or a temporary directory of its own behind fails, even when every test passed.

Several sessions may run on one machine at once (two `bash tools/test.sh`, or a plain `pytest`
beside one), and real servers may run there too. So at configure time each session takes:

- a private root, ``<tmp>/pytest-jobworker.XXXXXX``, removed at exit, holding pytest's base
  temporary directory (unless --basetemp names one: pytest's shared ``pytest-of-USER`` is pruned
  by whichever session starts next) and the session's TMPDIR. Every Supervisor the session
  starts, in this process or in a server it runs (which inherits the environment), makes its
  private data directory there. Jobs never see that variable (their environment is their own)
  nor the directory (their /tmp is private).
- a tag, JOBWORKER_CGROUP_TAG=testXXXXXX, which every such Supervisor puts into the name of its
  cgroup subtree (``jobworker-testXXXXXX-…``). Tests that make cgroups themselves take their
  names from `cgroup_name`.

The guard blames on the session only what bears its marks: cgroups named ``jobworker-<tag>-*``,
processes in them and children of this process, anything left in its TMPDIR, its shared
directories (``jobworker-tests-<tag>-*``), and the server's default data directory (which no
test's server may use; the one thing not told apart by a mark). Everything present before
the session started is ignored.

Also here: `shared_path`, a directory a test shares with its jobs. Jobs run isolated by default
(as root): their /tmp, /var/tmp and /dev/shm are private, so pytest's tmp_path (in /tmp) is out
of their sight.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

# The suite must give the same answer every run: property tests draw the same examples each
# time. To search wider for new failures: HYPOTHESIS_PROFILE=explore (random, more examples).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

CGROUP_ROOT = Path("/sys/fs/cgroup")
TAG_VARIABLE = "JOBWORKER_CGROUP_TAG"
# This session's mark; a fresh one for each session, even one started by a test of another.
SESSION_TAG = f"test{secrets.token_hex(3)}"
CGROUP_PREFIX = f"jobworker-{SESSION_TAG}-"

# Where shared directories go: a real disk (the IO tests need one) that every user may enter.
# In the cgroup v2 VM the root is 9p, so the runner's scratch disk.
SHARED_BASE = Path(os.environ.get("JOBWORKER_VM_DISK") or "/var/lib")
SHARED_PREFIX = f"jobworker-tests-{SESSION_TAG}-"

# `jobworker serve`'s default data directory as root: a real server's, never the suite's (every
# server a test starts names a directory of its own).
DEFAULT_DATA_DIR = Path("/var/lib/jobworker")


# --- the session's own places ----------------------------------------------------------------


@dataclass
class _Places:
    root: Path | None = None  # the private root, removed at exit
    tmp: Path | None = None  # the session's TMPDIR, inside it
    saved_env: dict[str, str | None] = field(default_factory=dict)  # as they were
    saved_tempdir: str | None = None


_session = _Places()


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    _session.root = Path(tempfile.mkdtemp(prefix="pytest-jobworker."))
    _session.tmp = _session.root / "tmp"
    _session.tmp.mkdir()
    # Open to every user, sticky, as /tmp is: some tests drop to another user first.
    _session.root.chmod(0o755)
    _session.tmp.chmod(0o1777)
    if config.option.basetemp is None:
        config.option.basetemp = str(_session.root / "pytest")
    _session.saved_env = {name: os.environ.get(name) for name in ("TMPDIR", TAG_VARIABLE)}
    _session.saved_tempdir = tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(_session.tmp)
    os.environ[TAG_VARIABLE] = SESSION_TAG


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _session.saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = _session.saved_tempdir
    if _session.root is not None:
        shutil.rmtree(_session.root, ignore_errors=True)
        _session.root = None


@pytest.fixture
def cgroup_name() -> str:
    """A fresh cgroup name of this session's own, for a test that makes a cgroup itself: the
    guard watches it, and no other session running beside this one can take it."""
    return CGROUP_PREFIX + secrets.token_hex(4)


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


# --- the guard -------------------------------------------------------------------------------


def _cgroups() -> set[str]:
    found = set()
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        for name in dirs:
            if name.startswith(CGROUP_PREFIX):
                found.add(os.path.join(top, name))
    return found


def _processes() -> set[str]:
    me = os.getpid()
    mark = "/" + CGROUP_PREFIX
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
        # A killed job's orphans stay zombies until PID 1 reaps them (about a second): dead,
        # not leaked. A zombie child of ours, though, is one we forgot to wait for.
        if int(ppid) == me or (mark in cgroup and state != b"Z"):
            found.add(f"pid {entry} ({comm})")
    return found


def _temp_dirs() -> set[str]:
    found = set()
    if _session.tmp is not None and _session.tmp.is_dir():
        found = {str(p) for p in _session.tmp.iterdir()}
    try:
        found |= {str(p) for p in SHARED_BASE.iterdir() if p.name.startswith(SHARED_PREFIX)}
    except OSError:
        pass
    return found


def _snapshot() -> dict[str, set[str]]:
    return {
        "cgroups": _cgroups(),
        "processes": _processes(),
        "temporary dirs": _temp_dirs(),
        "state": {str(DEFAULT_DATA_DIR)} if DEFAULT_DATA_DIR.exists() else set(),
    }


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
