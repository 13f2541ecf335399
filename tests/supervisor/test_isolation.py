"""Isolation, attacked from inside: each test starts a real job that tries what an ordinary job
could do before isolation, and asserts that the job ran, that the attack failed, and that
nothing outside changed.

The attacks are issue 11's list: kill the server, read another job's output, environment or
files, read the server's keys, leave the cgroups or lift the limits, regain root through a
setuid program, reach the host's loopback with network none, change the host's name or IPC.
They run as a transient user (the default) and, where being root changes the answer, as root.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import uuid
from functools import partial
from pathlib import Path

import pytest
import trio

import jobworker
from jobworker.supervisor import (
    InvalidJobSpec,
    Isolation,
    JobState,
    LimitOverrides,
    OutputStream,
    Supervisor,
    TransientUsersExhausted,
)
from jobworker.supervisor.cgroups import fs
from jobworker.supervisor.cgroups.discover import V1_CONTROLLERS, current_layout
from jobworker.supervisor.limits import MiB

from .helpers import (
    ESCAPE,
    IN_V2_VM,
    PYTHON,
    planned_groups,
    read_all,
    seen_from_inside,
    wait_for_output,
)

pytestmark = pytest.mark.cgroups

# A range of its own, outside the default one, so a test that counts uids is disturbed neither
# by other tests' jobs nor by a suite running beside this one (another pid, another range).
_SMALL_BASE = 90000 + 2 * (os.getpid() % 4000)
SMALL_RANGE = range(_SMALL_BASE, _SMALL_BASE + 2)


@pytest.fixture
async def iso(shared_path: Path):
    # The data directory where a server keeps it: not under /tmp, which jobs see fresh.
    async with Supervisor(data_dir=shared_path / "data", grace_period_s=5, isolation=True) as sup:
        yield sup


async def run(sup: Supervisor, script: str, **options) -> tuple[str, str, object]:
    """Run `sh -c script` as a job; (stdout, stderr, final status)."""
    job = await sup.start("sh", ["-c", textwrap.dedent(script)], **options)
    out = await read_all(job)
    status = await job.wait()
    return out[OutputStream.STDOUT].decode(), out[OutputStream.STDERR].decode(), status


# --- 1. not root by default ----------------------------------------------------------------


async def test_a_job_runs_as_a_transient_user_with_no_privileges(iso):
    out, err, status = await run(
        iso,
        """
        id -u; id -g; id -G
        grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status
        """,
    )
    assert status.state is JobState.FINISHED, err
    uid, gid, groups, *caps = out.splitlines()
    assert status.run_as.transient and status.run_as.uid == int(uid) == int(gid)
    assert int(uid) in iso.isolation.transient_uids
    assert groups.split() == [gid]  # its own group, and no supplementary one
    assert all(line.split()[1] == "0000000000000000" for line in caps if line.startswith("Cap"))
    assert "NoNewPrivs:\t1" in caps


async def test_a_setuid_program_does_not_bring_root_back(iso, shared_path):
    # A setuid-root copy of `id`: without no_new_privs it would print euid 0.
    setuid_id = shared_path / "setuid-id"
    setuid_id.write_bytes(Path("/usr/bin/id").read_bytes())
    os.chmod(setuid_id, 0o4755)
    assert os.stat(setuid_id).st_mode & 0o4000
    out, err, status = await run(iso, f"echo ran; {setuid_id} -u; su -c true root")
    assert status.state is JobState.FAILED  # su failed, as it must
    assert out.splitlines() == ["ran", str(status.run_as.uid)]
    assert "su:" in err


async def test_live_jobs_never_share_a_transient_uid_and_uids_come_back(tmp_path):
    isolation = Isolation(transient_uids=SMALL_RANGE)
    async with Supervisor(data_dir=tmp_path / "data", isolation=isolation) as sup:
        first = await sup.start("sleep", ["600"])
        second = await sup.start("sleep", ["600"])
        uids = {first.status().run_as.uid, second.status().run_as.uid}
        assert uids == set(SMALL_RANGE)  # two live jobs, two uids
        with pytest.raises(TransientUsersExhausted, match=f"{_SMALL_BASE}-{_SMALL_BASE + 1}"):
            await sup.start("true")
        assert len(sup.jobs()) == 2  # the refused start left no job behind
        ended = await first.stop(0)
        third = await sup.start("sleep", ["600"])
        assert third.status().run_as.uid == ended.run_as.uid  # released with the job
        for job in (second, third):
            await job.stop(0)


async def test_two_supervisors_never_hand_out_the_same_uid(tmp_path):
    # The uid locks are the machine's, not one Supervisor's: another server (here a second
    # Supervisor in this process, with a lock of its own) skips what the first holds.
    isolation = Isolation(transient_uids=SMALL_RANGE)
    async with (
        Supervisor(data_dir=tmp_path / "a", isolation=isolation) as a,
        Supervisor(data_dir=tmp_path / "b", isolation=isolation) as b,
    ):
        job_a = await a.start("sleep", ["600"])
        job_b = await b.start("sleep", ["600"])
        assert job_a.status().run_as.uid != job_b.status().run_as.uid
        with pytest.raises(TransientUsersExhausted):
            await a.start("true")
        await job_a.stop(0)
        await job_b.stop(0)


async def test_a_named_account_runs_with_its_own_ids_and_groups(iso):
    out, err, status = await run(iso, "id -un; id -u; id -gn", user="nobody")
    assert status.state is JobState.FINISHED, err
    assert out.splitlines()[:2] == ["nobody", "65534"]
    assert not status.run_as.transient and status.run_as.name == "nobody"


async def test_root_runs_only_when_asked_for_and_stays_caged(iso):
    out, err, status = await run(
        iso, "id -u; grep CapEff /proc/self/status; ps -e -o comm=", user=0
    )
    assert status.state is JobState.FINISHED, err
    uid, caps, *processes = out.splitlines()
    assert uid == "0" and caps.split()[1] != "0000000000000000"
    # Its own PID namespace even as root: the cage's init, the shell, ps.
    assert processes == ["jobworker-cage", "sh", "ps"]


async def test_unisolated_supervisors_refuse_users_and_network_none(tmp_path):
    async with Supervisor(data_dir=tmp_path / "data", isolation=False) as sup:
        with pytest.raises(InvalidJobSpec, match="needs isolation"):
            await sup.start("true", user="nobody")
        with pytest.raises(InvalidJobSpec, match="needs isolation"):
            await sup.start("true", network="none")
        job = await sup.start("true")
        status = await job.wait()
        assert status.namespaces == () and status.run_as.uid == os.getuid()


# --- 2. its own process view ----------------------------------------------------------------


@pytest.mark.parametrize("user", [None, 0], ids=["transient", "root"])
async def test_a_job_cannot_see_or_signal_the_supervisor(iso, user):
    me = os.getpid()
    out, err, status = await run(
        iso,
        f"""
        echo ran
        kill -9 {me}; echo "server: $?"
        kill -9 $PPID; echo "parent: $?"
        ps -e -o comm=
        echo ---; tr '\\0' '\\n' < /proc/1/cmdline
        """,
        user=user,
    )
    # The init's command line, which held the cage's plan, says nothing but its name.
    lines, init_cmdline = out.split("---\n")
    assert init_cmdline.split() == [
        os.fspath(Path(jobworker.__file__).parent / "supervisor" / "jobworker-cage")
    ]
    out = lines
    lines = out.splitlines()
    assert lines[0] == "ran"
    assert lines[1] == "server: 1"
    assert "No such process" in err  # the supervisor's pid does not exist in its namespace
    # PPID is the cage's init: a transient user may not signal it; root may, but an init
    # ignores every signal it has no handler for. Either way the job carried on.
    assert lines[2] == ("parent: 0" if user == 0 else "parent: 1")
    assert lines[3:] == ["jobworker-cage", "sh", "ps"]  # nothing of anyone else
    assert status.state is JobState.FINISHED


async def test_a_job_sees_neither_other_jobs_processes_nor_their_environment(iso):
    # The shell stays the job's leader (no exec): /proc/PID/environ read while the leader
    # is mid-exec returns nothing, which would make the "it is there" check race.
    secret = await iso.start("sh", ["-c", "echo started; sleep 600"], env={"SECRET": "hunter2"})
    await wait_for_output(secret, b"started")
    victim = secret.status().pid
    assert b"SECRET=hunter2" in Path(f"/proc/{victim}/environ").read_bytes()  # it is there
    out, err, _ = await run(
        iso,
        f"""
        echo ran
        cat /proc/{victim}/environ
        ps -e -o comm= | grep -c sleep
        kill -9 {victim}
        """,
    )
    assert out.splitlines() == ["ran", "0"]
    assert "hunter2" not in out + err
    assert secret.status().state is JobState.RUNNING
    await secret.stop(0)


# --- 3. its own view of the filesystem --------------------------------------------------------


async def test_data_directory_and_other_jobs_files_are_invisible(iso):
    other = await iso.start("sh", ["-c", "echo other-secret; echo mine > mine; exec sleep 600"])
    await wait_for_output(other, b"other-secret")
    data = iso.data_dir
    out, err, _ = await run(
        iso,
        f"""
        echo ran; pwd
        ls -A {data}; ls -A {data}/work
        cat {data}/jobs/{other.id}/* ; cat {other.status().run_as.home}/mine
        echo written > here && cat here
        """,
    )
    lines = out.splitlines()
    assert lines[0] == "ran"
    own = lines[1]
    assert own.startswith(f"{data}/work/") and own != other.status().run_as.home
    # The data directory shows only the way to its own working directory.
    assert lines[2:5] == ["work", Path(own).name, "written"]
    assert "other-secret" not in out and "mine" not in out
    assert "No such file or directory" in err
    assert (await other.stop(0)).state is JobState.STOPPED
    assert not Path(own).exists()  # its working directory went with it


async def test_hidden_paths_and_their_directories_are_covered(tmp_path, shared_path):
    # As the server hides its TLS and config files: the directory holding a key is covered
    # whole, so its neighbours (the CA's key) are gone too, even for a job run as root.
    secrets = shared_path / "tls"
    secrets.mkdir(mode=0o755)
    for name in ("server.key", "ca.key"):
        (secrets / name).write_text(f"{name} material")
        (secrets / name).chmod(0o644)  # readable by all: only the cage keeps them out
    isolation = Isolation(hide=(str(secrets / "server.key"),))
    async with Supervisor(data_dir=tmp_path / "data", isolation=isolation) as sup:
        for user in (None, 0):
            out, err, _ = await run(
                sup,
                f"echo ran; cat {secrets}/server.key {secrets}/ca.key; ls -A {secrets}",
                user=user,
            )
            assert out == "ran\n", (user, out)
            assert "material" not in out + err


async def test_tmp_is_private_and_gone_with_the_job(iso):
    note = f"jobworker-test-note-{uuid.uuid4().hex}"  # a name nobody else on the host uses
    first = await iso.start(
        "sh", ["-c", f"echo private > /tmp/{note}; echo x > /var/tmp/{note}; ls /tmp; sleep 600"]
    )
    assert note.encode() in await wait_for_output(first, note.encode())
    out, _, _ = await run(iso, f"echo ran; ls -A /tmp /var/tmp /dev/shm; cat /tmp/{note}")
    assert out.split() == ["ran", "/dev/shm:", "/tmp:", "/var/tmp:"]  # three empty listings
    assert not Path(f"/tmp/{note}").exists()  # the host's /tmp never saw it
    assert not Path(f"/var/tmp/{note}").exists()
    await first.stop(0)


async def test_a_transient_user_writes_only_its_own_directories(iso, shared_path):
    out, _, _ = await run(
        iso,
        f"""
        echo ran
        touch {shared_path}/x /etc/x /var/lib/x 2>&1 | sed 's/.*: //'
        touch here /tmp/x /var/tmp/x /dev/shm/x && echo own-places-ok
        """,
    )
    assert out.splitlines() == ["ran", *["Read-only file system"] * 3, "own-places-ok"]
    assert not (shared_path / "x").exists()  # world-writable, yet not for a transient user


async def test_the_cgroup_filesystem_is_read_only_even_for_root(iso):
    # What the kernel says for each attempt: read-only, whoever asks.
    attempts = " ; ".join(f"echo $$ > {path}/cgroup.procs" for path in _cgroup_mount_points())
    for user in (None, 0):
        out, err, _ = await run(iso, f"echo ran; {attempts}; cat /proc/self/cgroup", user=user)
        assert out.startswith("ran\n")
        assert err.count("Read-only file system") == len(_cgroup_mount_points()), err
        # Its cgroup namespace: its own group is its root, the host's tree out of sight.
        assert all(line.endswith(":/") for line in out.splitlines()[1:])


async def test_the_cgroup_filesystems_show_a_job_its_own_group_and_no_other(iso):
    # Its cgroup namespace and fresh read-only mounts: its own group is the root of each
    # hierarchy, so it reads its own limits where a container does, and no other job's id.
    other = await iso.start("sleep", ["600"])
    assert _job_groups(other.id)  # the other job's groups are there, on the host
    limits = LimitOverrides(memory_bytes=64 * MiB)
    out, err, status = await run(
        iso,
        f"""
        echo ran
        find /sys/fs/cgroup -name {other.id} | wc -l
        cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max
        """,
        limits=limits,
    )
    assert status.state is JobState.FINISHED, err
    assert out.split() == ["ran", "0", str(64 * MiB)]
    await other.stop(0)


def _cgroup_mount_points() -> list[str]:
    from jobworker.supervisor.cgroups.discover import cgroup_filesystems

    return [str(point) for point, _, _ in cgroup_filesystems()]


@pytest.mark.parametrize("user", [None, 0], ids=["transient", "root"])
async def test_a_job_cannot_leave_its_cgroups_or_lift_its_limits(iso, user, monkeypatch):
    # The job's id is chosen here, so the test knows its groups before it runs. The job tries
    # what it can name: its own groups (the root of each hierarchy as it sees them) and their
    # limit files, and the supervisor's groups by their paths on the host.
    job_id = uuid.uuid4()
    monkeypatch.setattr(uuid, "uuid4", lambda: job_id)
    groups = planned_groups(iso, str(job_id))
    views = [seen_from_inside(g) for g in groups]
    limits = [(g / n, v / n) for g, v in zip(groups, views, strict=True) for n in _LIMIT_FILES]
    limits = [(host, seen) for host, seen in limits if (host.parent.parent / host.name).exists()]
    attempts = [f"echo $$ > {v}/cgroup.procs" for v in views]  # "into" its own root
    attempts += [f"echo {_LIMIT_FILES[seen.name]} > {seen}" for _, seen in limits]
    attempts += [f"echo $$ > {procs}" for procs in _own_cgroup_files()]  # out, to ours
    script = "echo ran; " + "; ".join(attempts) + "; echo tried >&2; exec sleep 600"
    job = await iso.start("sh", ["-c", script], user=user)
    err = b""
    async for chunk in job.output(follow=True):
        if chunk.stream is OutputStream.STDERR:
            err += chunk.data
        if err.endswith(b"tried\n"):
            break
    # Every attempt failed: read-only wherever the path exists in its view, and the paths
    # that lead out of its group do not exist in it. Nothing moved, nothing changed.
    assert err.count(b"cannot create") == len(attempts), err
    assert err.count(b"Read-only file system") >= len(views) + len(limits), err
    for group in groups:
        assert str(job.status().pid) in (group / "cgroup.procs").read_text().split(), group
    assert len(limits) >= 3  # memory, cpu and pids limits were there to lift
    applied = {"memory.limit_in_bytes", "memory.max", "pids.max"}
    for host, _ in limits:
        if host.name in applied:
            assert host.read_text().strip() not in ("max", "-1", "9223372036854771712"), host
    await job.stop(0)


_LIMIT_FILES = {
    "memory.limit_in_bytes": "-1",
    "cpu.cfs_quota_us": "-1",
    "pids.max": "max",
    "memory.max": "max",
    "cpu.max": "max",
}


def _own_cgroup_files() -> list[Path]:
    layout = current_layout()
    dirs = [layout.v1[c] for c in V1_CONTROLLERS if c in layout.v1]
    if layout.unified is not None:
        dirs.append(layout.unified)
    return [d / "cgroup.procs" for d in dirs]


def _job_groups(job_id: str) -> list[Path]:
    return [Path(top) / job_id for top, dirs, _ in os.walk("/sys/fs/cgroup") if job_id in dirs]


# --- 4. network, IPC, UTS -----------------------------------------------------------------------


CONNECT = """
import socket, sys
port = int(sys.argv[1])
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    print("reached the host")
except OSError as exc:
    print("refused:", exc.strerror)
own = socket.socket()
own.bind(("127.0.0.1", 0))
own.listen()
socket.create_connection(own.getsockname(), timeout=5).close()
print("own loopback works")
"""


async def test_network_none_reaches_only_its_own_loopback(iso):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        job = await iso.start(PYTHON, ["-c", CONNECT, str(port)], network="none")
        out = (await read_all(job))[OutputStream.STDOUT].decode().splitlines()
        status = await job.wait()
        assert status.namespaces[-1] == "net" and status.network == "none"
        assert out == ["refused: Connection refused", "own loopback works"]
        # And with the host's network the same job does reach it: the listener is real.
        job = await iso.start(PYTHON, ["-c", CONNECT, str(port)])
        out = (await read_all(job))[OutputStream.STDOUT].decode().splitlines()
        assert out == ["reached the host", "own loopback works"]


async def test_hostname_and_ipc_changes_stay_inside_the_job(iso):
    host_name = os.uname().nodename
    out, err, status = await run(
        iso,
        """
        hostname jobworker-test-name && hostname
        ipcmk -M 4096 >/dev/null && ipcs -m | grep -c '^0x'
        """,
        user=0,  # root may change them, in its own namespaces
    )
    assert status.state is JobState.FINISHED, err
    assert out.splitlines() == ["jobworker-test-name", "1"]
    assert os.uname().nodename == host_name
    out, _, _ = await run(iso, "echo ran; ipcs -m | grep -c '^0x'")
    assert out.splitlines() == ["ran", "0"]  # the segment died with its job's namespace


# --- 6. no hang, ever --------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can leave its cgroups")
async def test_an_unisolated_root_job_that_left_its_cgroups_is_still_stopped(tmp_path):
    # Without isolation a root job can move itself and its children out of every group: the
    # stop must still end within the grace period plus a bound, and kill what the job owned
    # (its leader, and a process in a session of its own still holding its output).
    procs = " ".join(str(p) for p in _own_cgroup_files())
    async with Supervisor(data_dir=tmp_path / "data", isolation=False, grace_period_s=1) as sup:
        job = await sup.start("sh", ["-c", ESCAPE.format(procs=procs)])
        await wait_for_output(job, b"escaped")
        leader = job.status().pid
        assert str(leader) not in "".join(p.read_text() for p in _job_groups_files(job.id))
        with trio.fail_after(30):  # a backstop against the hang this test is about
            status = await job.stop(0.5)
        assert status.state is JobState.STOPPED and status.escalated
        assert status.signal == 9 and status.survivors == ()
        assert not Path(f"/proc/{leader}").exists()


def _job_groups_files(job_id: str) -> list[Path]:
    return [g / "cgroup.procs" for g in _job_groups(job_id)]


@pytest.mark.skipif(IN_V2_VM, reason="the v1 hierarchies name the escape targets here")
async def test_the_supervisor_exits_even_when_a_job_escaped(tmp_path):
    procs = " ".join(str(p) for p in _own_cgroup_files())
    with trio.fail_after(60):
        async with Supervisor(data_dir=tmp_path / "data", isolation=False, grace_period_s=1) as sup:
            job = await sup.start("sh", ["-c", ESCAPE.format(procs=procs)])
            await wait_for_output(job, b"escaped")
            leader = job.status().pid
    assert job.status().state is JobState.STOPPED
    assert not Path(f"/proc/{leader}").exists()


# --- when the supervisor dies ---------------------------------------------------------------

CRASHING_SUPERVISOR = """
import sys, trio
from jobworker.supervisor import Supervisor

async def main():
    async with Supervisor(data_dir=sys.argv[1], isolation=True) as sup:
        job = await sup.start("sh", ["-c", "trap '' TERM HUP; echo up; sleep 600; exit 0"])
        async for _ in job.output(follow=True):
            break
        print(job.status().pid, job.id, sup._backend._subtrees[0].name, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_jobs_die_with_a_supervisor_that_was_killed(tmp_path):
    # SIGKILL gives the supervisor no chance to stop anything: each cage's keeper notices its
    # lifeline close and kills its job's whole PID namespace. No orphan runs on unsupervised.
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", CRASHING_SUPERVISOR, str(tmp_path / "data")],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1000)
        pid, _, subtree = line.decode().split()
        try:
            job = os.pidfd_open(int(pid))
            try:
                # The job's leader, alive. It is a shell that never execs: a leader caught
                # mid-exec has an empty cmdline, so this read would be a race.
                assert b"sleep 600" in Path(f"/proc/{pid}/cmdline").read_bytes()
                process.kill()
                with trio.fail_after(30):  # a backstop: the kill is immediate
                    await trio.lowlevel.wait_readable(job)  # readable once it has exited
            finally:
                os.close(job)
            assert not Path(f"/proc/{pid}").exists()
        finally:
            process.kill()
            await _remove_dead_supervisors_groups(subtree)


async def _remove_dead_supervisors_groups(subtree: str) -> None:
    # Its groups outlive it (nobody removed them); empty once its jobs' processes are gone.
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if subtree in dirs:
            base = Path(top) / subtree
            for group in [p for p in base.iterdir() if p.is_dir()]:
                await fs.rmdir(group)  # retries while the kernel still counts exiting tasks
            await fs.rmdir(base)


@pytest.mark.skipif(IN_V2_VM, reason="the v1 freezer holds SIGKILL back until the thaw")
@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "unisolated"])
async def test_a_leader_that_outlives_sigkill_does_not_hold_the_stop(
    tmp_path, monkeypatch, isolation, cgroup_name
):
    # A process frozen by the v1 freezer cannot act on SIGKILL until it is thawed: as one in
    # uninterruptible sleep, it outlives every kill. The stop must still return, bounded, and
    # say which process it gave up on; the process is reaped once it does go.
    from jobworker.supervisor import job as job_module

    monkeypatch.setattr(job_module, "_KILL_WAIT_S", 1.0)
    freezer = current_layout().v1["freezer"] / cgroup_name
    freezer.mkdir()
    try:
        async with Supervisor(data_dir=tmp_path / "data", isolation=isolation) as sup:
            job = await sup.start("sleep", ["600"])
            leader = job.status().pid
            try:
                (freezer / "cgroup.procs").write_text(str(leader))
                (freezer / "freezer.state").write_text("FROZEN")
                # No notification for this state: poll, as the v1 kill path does.
                backoff = fs.Backoff()
                while (freezer / "freezer.state").read_text().strip() != "FROZEN":
                    await backoff.wait()
                with trio.fail_after(30):  # a backstop against the hang this test is about
                    status = await job.stop(0)
                assert status.state is JobState.FAILED and status.escalated
                assert leader in status.survivors
                assert Path(f"/proc/{leader}").exists()  # still there: given up on, not killed
            finally:
                (freezer / "freezer.state").write_text("THAWED")  # the pending SIGKILL lands
            with trio.fail_after(30):
                await job.released()  # reaped at last, its group removed
            assert not Path(f"/proc/{leader}").exists()
            assert _job_groups(job.id) == []
    finally:
        freezer.rmdir()


async def test_groups_a_root_job_makes_beneath_its_own_are_removed_with_it(iso):
    # Root may make groups in its own (it sees only that one); they must not keep the job's
    # group from being removed, nor leave anything behind.
    point = seen_from_inside(planned_groups(iso, "x")[0].parent / "x")
    script = f"mount -o remount,bind,rw {point} && mkdir -p {point}/mine/deeper && echo made"
    out, err, status = await run(iso, script, user=0)
    assert out == "made\n", err
    assert _job_groups(status.id) == []
