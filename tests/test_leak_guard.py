"""The session guard of tests/conftest.py, run for real: a pytest session as a subprocess, on a
planted test file, with the guard as its plugin. It must fail a session that leaves a cgroup, a
process and a temporary directory of its own behind, and ignore what another session (or a
server) makes meanwhile — the two sides of running two suites on one machine at once."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from jobworker import Supervisor
from jobworker.supervisor.cgroups import fs
from jobworker.supervisor.errors import CgroupError

from .conftest import CGROUP_PREFIX, SESSION_TAG, SHARED_BASE, TAG_VARIABLE

REPO = Path(__file__).resolve().parent.parent
FOREIGN_TAG = "foreign" + SESSION_TAG  # another session's mark, seen from the inner one

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes real cgroups (run as root)")

# What a session leaves: a cgroup subtree with a group, a process in it that is nobody's child
# there, and a temporary directory. Each planted process and directory is written down, so the
# outer test can check the report and clean up.
PLANTED = textwrap.dedent(
    """
    import os, subprocess, tempfile
    from pathlib import Path

    from jobworker.supervisor.cgroups import open_backend
    from jobworker.supervisor.limits import Limits

    RECORD = Path(os.environ["PLANTED_RECORD"])


    def leave(side, tag, temp_parent):
        backend = open_backend("auto", f"jobworker-{tag}-planted")
        group = backend.create("job", Limits(), "/")

        def enter():
            for procs in group.procs_files:
                procs.write_text(str(os.getpid()))

        # The shell exits at once: its sleep is orphaned, attributable by its cgroup alone.
        shell = subprocess.run(
            ["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
            preexec_fn=enter, capture_output=True, check=True,
        )
        temp = tempfile.mkdtemp(prefix="jobworker-", dir=temp_parent)
        with RECORD.open("a") as f:
            for subtree in backend.subtrees:
                print(side, "cgroup", subtree, file=f)
            print(side, "pid", int(shell.stdout), file=f)
            print(side, "dir", temp, file=f)


    def test_another_session_makes_things_meanwhile():
        leave("foreign", os.environ["FOREIGN_TAG"], os.environ["FOREIGN_TMP"])
        shared = tempfile.mkdtemp(prefix=f"jobworker-tests-{os.environ['FOREIGN_TAG']}-",
                                  dir=os.environ["SHARED_BASE"])
        with RECORD.open("a") as f:
            print("foreign", "dir", shared, file=f)


    def test_this_session_leaks():
        if not os.environ.get("PLANT_LEAKS"):
            return
        leave("ours", os.environ["JOBWORKER_CGROUP_TAG"], None)
        child = subprocess.Popen(["sleep", "600"])  # a child never waited for
        with RECORD.open("a") as f:
            print("ours", "pid", child.pid, file=f)
    """
)


def run_session(where: Path, *, leak: bool) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """A pytest session on the planted file, the guard loaded as a plugin; what it printed, and
    what it planted as (side, kind, what) rows."""
    (where / "test_planted.py").write_text(PLANTED)
    (where / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    record = where / "record"
    foreign_tmp = where / "foreign-tmp"
    foreign_tmp.mkdir()
    env = {
        **os.environ,
        "PLANTED_RECORD": str(record),
        "FOREIGN_TAG": FOREIGN_TAG,
        "FOREIGN_TMP": str(foreign_tmp),
        "SHARED_BASE": str(SHARED_BASE),
        "PLANT_LEAKS": "1" if leak else "",
    }
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-c", str(where / "pytest.ini"),
            "--rootdir", str(where), "-q", str(where / "test_planted.py")]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = record.read_text().splitlines() if record.exists() else []
    return done, [line.split(" ", 2) for line in lines]


async def clean_up(rows: list[list[str]]) -> None:
    """Kill the planted processes and wait for them to go; then remove their cgroups and dirs."""
    for _, kind, what in rows:
        if kind != "pid":
            continue
        try:
            pidfd = os.pidfd_open(int(what))
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await trio.to_thread.run_sync(select.select, [pidfd], [], [], 30)  # readable: ended
        finally:
            os.close(pidfd)
    for _, kind, what in rows:
        if kind == "cgroup":
            for group in sorted(fs.subgroups(Path(what)), key=lambda p: -len(p.parts)):
                await fs.rmdir(group)
            await fs.rmdir(Path(what))
        elif kind == "dir":
            shutil.rmtree(what, ignore_errors=True)


@needs_root
@pytest.mark.parametrize("leak", [True, False], ids=["leaking", "clean"])
async def test_the_guard_blames_a_session_for_its_own_leaks_only(tmp_path: Path, leak: bool):
    rows: list[list[str]] = []
    try:
        done, rows = await trio.to_thread.run_sync(lambda: run_session(tmp_path, leak=leak))
        report = done.stdout.partition("the test session left things behind:")[2]
        ours = [(kind, what) for side, kind, what in rows if side == "ours"]
        foreign = [(kind, what) for side, kind, what in rows if side == "foreign"]
        # The other session's things were there to be seen: a cgroup, a process, two dirs.
        assert {kind for kind, _ in foreign} == {"cgroup", "pid", "dir"}, done.stdout
        for kind, what in foreign:
            assert Path(f"/proc/{what}" if kind == "pid" else what).exists()
            assert (f"pid {what} " if kind == "pid" else what) not in done.stdout
        if not leak:
            assert done.returncode == 0, done.stdout + done.stderr
            assert not report and not ours
            return
        assert done.returncode == 1, done.stdout + done.stderr
        # Two processes: the orphan found by its cgroup, the child by its parent.
        assert sorted(kind for kind, _ in ours if kind != "cgroup") == ["dir", "pid", "pid"]
        for kind, what in ours:
            assert (f"pid {what} " if kind == "pid" else what) in report, done.stdout
        assert not Path(next(what for kind, what in ours if kind == "dir")).exists()  # removed
    finally:
        with trio.CancelScope(shield=True):
            await clean_up(rows)


async def test_every_supervisor_of_the_session_bears_its_mark(monkeypatch: pytest.MonkeyPatch):
    assert os.environ[TAG_VARIABLE] == SESSION_TAG  # and so every server the session starts
    async with Supervisor(isolation=False) as sup:
        assert sup.data_dir.parent == Path(os.environ["TMPDIR"])
        assert all(path.name.startswith(CGROUP_PREFIX) for path in sup.cgroup_subtrees)
    monkeypatch.setenv(TAG_VARIABLE, "no/such")
    with pytest.raises(CgroupError, match="letters or digits"):
        async with Supervisor(isolation=False):
            pass
