"""Isolation through the whole product: `jobworker serve` as root, jobs started with `jobctl`,
each trying from inside what issue 11 found an ordinary job could do to the server.

The server's TLS files, config file and data directory live outside /tmp here (where a real
server keeps them), and its keys are readable by everyone: only the cage keeps them out.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from ..supervisor.helpers import ESCAPE, PYTHON
from .conftest import JOBWORKER, USERS, Jobctl, Server, run, start_server, tls_flags

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root")


@pytest.fixture
def exposed_certs(shared_path: Path) -> Path:
    """The server's files where an operator keeps them, with keys anyone may read."""
    directory = shared_path / "etc-jobworker"
    argv = [*JOBWORKER, "certs", "init", str(directory)]
    for user in USERS:
        argv += ["--user", user]
    done = run(argv)
    assert done.returncode == 0, done.stderr.decode()
    for key in directory.rglob("*.key"):
        key.chmod(0o644)
    (directory / "jobworker.toml").write_text('grace-period = "2s"\n[run-as]\nbob = "nobody"\n')
    return directory


@pytest.fixture
def isolated_server(exposed_certs: Path, shared_path: Path):
    data = shared_path / "var-lib-jobworker"
    server = start_server(
        exposed_certs,
        "--config",
        str(exposed_certs / "jobworker.toml"),
        "--data-dir",
        str(data),
        "--run-as",
        "carol=root",
    )
    yield server, data
    server.terminate()


def test_a_job_can_harm_neither_the_server_nor_see_its_secrets(isolated_server, exposed_certs):
    server, data = isolated_server
    jobctl = Jobctl(exposed_certs, server.address)
    other = jobctl.start("sh", "-c", "echo bob-output; sleep 600", user="bob")
    secrets = [exposed_certs / name for name in ("server.key", "ca.key", "jobworker.toml")]
    assert all(p.read_text() for p in secrets)  # there, and readable by any local user
    script = f"""
        echo ran
        kill -9 {server.process.pid} $PPID
        cat {" ".join(map(str, secrets))}
        ls -A {data} {data}/work
        cat {data}/jobs/{other}/*
        ps -e -o comm=
    """
    for user in ("alice", "carol"):  # a transient user, and root (carol is mapped to root)
        done = jobctl("run", "--", "sh", "-c", script, user=user)
        out, err = done.stdout.decode(), done.stderr.decode()
        lines = out.splitlines()
        assert lines[0] == "ran"
        assert "PRIVATE KEY" not in out and "run-as" not in out and "bob-output" not in out
        assert "No such process" in err
        # The data directory shows its own working directory's way, and nothing else.
        assert lines[1:5] == [f"{data}:", "work", "", f"{data}/work:"]
        assert lines[6:] == ["jobworker-cage", "sh", "ps"]
    assert server.process.poll() is None  # alive, and answering:
    status = json.loads(jobctl.ok("status", other, "--json", user="bob"))
    assert status["state"] == "JOB_STATE_RUNNING"
    assert status["run_as"] == {"user": "nobody", "uid": 65534, "gid": 65534, "transient": False}
    jobctl.ok("stop", other, "--grace", "0", user="bob")


def test_identities_map_to_accounts_and_the_status_says_who_ran(isolated_server, exposed_certs):
    server, _ = isolated_server
    jobctl = Jobctl(exposed_certs, server.address)
    assert jobctl("run", "--", "id", "-un", user="bob").stdout == b"nobody\n"
    assert jobctl("run", "--", "id", "-un", user="carol").stdout == b"root\n"
    uid = int(jobctl("run", "--", "id", "-u", user="alice").stdout)
    assert 70000 <= uid < 80000  # a transient user of her own: she has no account here
    listed = json.loads(jobctl.ok("list", "--json", user="alice"))["jobs"]
    assert listed[-1]["run_as"] == {"user": "", "uid": uid, "gid": uid, "transient": True}
    assert listed[-1]["namespaces"] == ["pid", "mount", "ipc", "uts", "cgroup"]
    assert listed[-1]["network"] == "NETWORK_HOST"
    assert "jobs isolated (transient uids 70000-79999; run-as bob=nobody, carol=root" in (
        server.stderr()
    )


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("reached the server")
except OSError as exc:
    print("refused:", exc.strerror)
"""


def test_network_none_by_default_and_host_refused(server_factory, certs_dir: Path) -> None:
    server: Server = server_factory("--network", "none", "--no-allow-host-network")
    jobctl = Jobctl(certs_dir, server.address)
    done = jobctl("run", "--", PYTHON, "-c", CONNECT, str(server.port))
    assert done.stdout == b"refused: Connection refused\n", done.stderr
    done = jobctl("run", "--network", "host", "--", "true")
    assert done.returncode == 1
    assert done.stderr == (
        b"jobctl: this server does not let jobs use the host's network: ask for network none\n"
    )


def test_isolation_settings_that_cannot_work_are_refused_at_startup(
    certs_dir: Path, tmp_path: Path
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    for flags, message in [
        (["--isolation", "off", "--network", "none"], "need isolation, which is off"),
        (["--run-as", "alice=no-such-account"], "run-as: no local account 'no-such-account'"),
        (["--network", "host", "--no-allow-host-network"], "network: the default network"),
        (["--transient-uids", "5-1"], "--transient-uids: expected a range"),
    ]:
        done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir), *data,
                    *flags])  # fmt: skip
        assert done.returncode == 2, (flags, done.stderr)
        assert message in done.stderr.decode(), (flags, done.stderr)


# --- no hang, ever: a root job that left its cgroups ----------------------------------------


def _own_cgroup_procs(pid: int) -> str:
    """The cgroup.procs files of `pid`'s groups: where an escaping job of its moves to."""
    paths = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        name = controllers.split(",")[0].removeprefix("name=") if controllers else "unified"
        if name in ("cpu", "cpuacct", "memory", "blkio", "pids", "unified"):
            paths.append(f"/sys/fs/cgroup/{name}{path}/cgroup.procs")
    return " ".join(paths)


@pytest.mark.parametrize("second_signal", [False, True], ids=["sigterm", "sigterm-twice"])
def test_the_server_stops_although_a_job_left_its_cgroups(
    server_factory, certs_dir: Path, second_signal: bool
) -> None:
    # Unisolated, a root job can leave its groups: a first SIGTERM must still end the server
    # within its grace period plus a bound, and a second at once.
    # Once: the stop's grace period, then SIGKILL. Twice: at once, long before a 60 s grace.
    grace = "60s" if second_signal else "2s"
    server: Server = server_factory("--isolation", "off", "--grace-period", grace)
    jobctl = Jobctl(certs_dir, server.address)
    job_id = jobctl.start("sh", "-c", ESCAPE.format(procs=_own_cgroup_procs(server.process.pid)))
    follower = jobctl.popen("logs", "-f", job_id)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"escaped\n"
    leader = json.loads(jobctl.ok("status", job_id, "--json"))["pid"]
    server.process.send_signal(signal.SIGTERM)
    if second_signal:
        server.wait_for_log("SIGTERM: shutting down")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 128 + signal.SIGTERM  # not after the 60 s grace
    else:
        assert server.process.wait(30) == 0, server.stderr()
    follower.wait(30)
    follower.stdout.close()
    assert not Path(f"/proc/{leader}").exists()
    log = server.stderr()
    assert "still hold its output: killing" in log  # the escaped sleep, found by its pipe
