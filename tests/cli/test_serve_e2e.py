"""`jobworker serve` as a real process: shutdown leaves nothing behind; startup problems are one
line and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from .conftest import JOBWORKER, Jobctl, Server, run, tls_flags

CGROUP_ROOT = Path("/sys/fs/cgroup")


def job_pid_and_subtree(jobctl: Jobctl, job_id: str) -> tuple[int, str]:
    """A running job's pid and the server's own cgroup subtree (jobworker-XXXX) it sits in."""
    pid = json.loads(jobctl.ok("status", job_id, "--json"))["pid"]
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        paths = [line.split(":", 2)[2] for line in f.read().splitlines()]
    subtrees = {part for path in paths for part in path.split("/") if part.startswith("jobworker-")}
    assert len(subtrees) == 1, paths
    return pid, subtrees.pop()


def cgroups_named(name: str) -> list[str]:
    return [top for top, dirs, _ in os.walk(CGROUP_ROOT) if os.path.basename(top) == name]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != b"Z"


def test_sigterm_stops_every_job_removes_every_cgroup_and_exits_0(
    server_factory, certs_dir: Path
) -> None:
    server: Server = server_factory("--grace-period", "1s")
    jobctl = Jobctl(certs_dir, server.address)
    polite = jobctl.start("sleep", "30")
    stubborn = jobctl.start("sh", "-c", "trap '' TERM; echo ready; sleep 30")
    follower = jobctl.popen("logs", "-f", stubborn)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"ready\n"  # the trap is set
    polite_pid, subtree = job_pid_and_subtree(jobctl, polite)
    pids = [polite_pid, job_pid_and_subtree(jobctl, stubborn)[0]]
    assert cgroups_named(subtree)

    assert server.terminate() == 0, server.stderr()
    assert follower.wait(10) == 0  # the follower saw its job end, then the stream close
    follower.stdout.close()
    assert not [pid for pid in pids if alive(pid)]
    assert cgroups_named(subtree) == []
    log = server.stderr()
    assert "SIGTERM: shutting down" in log
    assert f"job={polite}" in log and "stopped by server shutdown" in log
    assert "escalated to SIGKILL" in log  # the stubborn one, after its grace period


def test_a_second_signal_kills_every_job_at_once(server_factory, certs_dir: Path) -> None:
    server: Server = server_factory("--grace-period", "60s")
    jobctl = Jobctl(certs_dir, server.address)
    job_id = jobctl.start("sh", "-c", "trap '' TERM; echo ready; sleep 60")
    follower = jobctl.popen("logs", "-f", job_id)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"ready\n"
    pid, subtree = job_pid_and_subtree(jobctl, job_id)

    server.process.send_signal(signal.SIGINT)
    server.wait_for_log("SIGINT: shutting down")
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(15) == 128 + signal.SIGINT  # long before the 60 s grace period
    assert not alive(pid)
    assert cgroups_named(subtree) == []
    follower.wait(10)
    follower.stdout.close()
    server.terminate()


def test_startup_port_in_use(certs_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run([*JOBWORKER, "serve", "--listen", f"127.0.0.1:{port}", *tls_flags(certs_dir),
                    "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.endswith(
        f"jobworker: cannot listen on 127.0.0.1:{port}: address already in use\n".encode()
    )
    assert done.stdout == b""


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"cert": "missing.crt"},
            "jobworker: cannot use the TLS files: cannot read certificate file {d}/missing.crt",
        ),
        (
            {"cert": "ca.key"},
            "jobworker: cannot use the TLS files: certificate file {d}/ca.key holds no PEM "
            "certificate",
        ),
        (
            {"key": "alice/client.key"},
            "jobworker: cannot use the TLS files: private key does not match the certificate",
        ),
    ],
)
def test_startup_bad_tls_files(certs_dir: Path, files: dict[str, str], message: str) -> None:
    paths = {"cert": "server.crt", "key": "server.key", "ca": "ca.crt", **files}
    flags = [arg for name, f in paths.items() for arg in (f"--{name}", str(certs_dir / f))]
    done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *flags])
    assert done.returncode == 2
    assert done.stderr.startswith(message.format(d=certs_dir).encode()), done.stderr
    assert done.stderr.count(b"\n") == 1
    assert done.stdout == b""


def test_startup_bad_config(certs_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "jobworker.toml"
    config.write_text('listen = "127.0.0.1:0"\nmemroy = "1G"\n')
    done = run([*JOBWORKER, "serve", "--config", str(config), *tls_flags(certs_dir)])
    assert done.returncode == 2
    assert (
        done.stderr
        == (
            f"jobworker: config file {config}: unknown key 'memroy' (did you mean 'memory'?)\n"
        ).encode()
    )


def test_config_file_and_flags(server_factory, certs_dir: Path, tmp_path: Path) -> None:
    """The file sets limits and a maximum; a flag overrides the file."""
    config = tmp_path / "jobworker.toml"
    config.write_text('memory = "256M"\nmax-memory = "512M"\npids = 100\ngrace-period = "2s"\n')
    server: Server = server_factory("--config", str(config), "--pids", "50")
    jobctl = Jobctl(certs_dir, server.address)
    job_id = jobctl.start("true")
    limits = json.loads(jobctl.ok("status", job_id, "--json"))["limits"]
    assert (limits["memory_bytes"], limits["pids"]) == (str(256 * 2**20), 50)
    refused = jobctl("start", "--memory", "1G", "--", "true")
    assert refused.returncode == 2  # the request was invalid: a usage error, as docker's
    assert b"above the maximum" in refused.stderr


def test_iops_defaults_and_maximums_from_the_file_and_flags(
    server_factory, certs_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "jobworker.toml"
    config.write_text("io-read-iops = 300\nmax-io-read-iops = 1000\n")
    server: Server = server_factory("--config", str(config), "--io-write-iops", "50")
    jobctl = Jobctl(certs_dir, server.address)
    limits = json.loads(jobctl.ok("status", jobctl.start("true"), "--json"))["limits"]
    assert (limits["io_read_iops"], limits["io_write_iops"]) == ("300", "50")
    asked = jobctl.ok("start", "--io-read-iops", "1000", "--io-write-iops", "7", "true").strip()
    limits = json.loads(jobctl.ok("status", asked, "--json"))["limits"]
    assert (limits["io_read_iops"], limits["io_write_iops"]) == ("1000", "7")
    refused = jobctl("start", "--io-read-iops", "1001", "--", "true")
    assert refused.returncode == 2
    assert refused.stderr == (
        b"jobctl: limits.io_read_iops 1001 is above the maximum 1000 (allowed: 1 to 1000)\n"
    )


def _unavailable_cgroup_mode() -> str | None:
    """A --cgroups mode this machine cannot serve: v1 on a pure v2 host, v2 on a host whose
    unified hierarchy has no controllers (ours: v1 hybrid)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "v1"
    unified = CGROUP_ROOT / "unified" / "cgroup.controllers"
    if not unified.exists() or "memory" not in unified.read_text().split():
        return "v2"
    return None


def test_startup_without_usable_cgroups(certs_dir: Path, tmp_path: Path) -> None:
    # As root, cgroup access cannot be taken away here; asking for a hierarchy the machine
    # lacks takes the same path (the Supervisor refuses to start) to the same one line.
    mode = _unavailable_cgroup_mode()
    if mode is None:
        pytest.skip("both cgroup versions are usable here")
    done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", "--cgroups", mode,
                *tls_flags(certs_dir), "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert done.returncode == 2
    said = done.stderr.decode()
    assert said.count("\n") == 1 and said.startswith("jobworker: cannot use cgroups: "), said
    assert done.stdout == b""


def test_a_connection_cap_flag_reaches_the_transport(server_factory, certs_dir: Path) -> None:
    """While alice holds one connection (a follower), her next one is refused with a status
    that names the cap; bob is unaffected."""
    server: Server = server_factory("--max-connections-per-user", "1")
    jobctl = Jobctl(certs_dir, server.address)
    job_id = jobctl.start("sh", "-c", "echo ready; exec sleep 300")
    follower = jobctl.popen("logs", "-f", job_id)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"ready\n"  # alice's one connection is up
        refused = jobctl("list")
        assert refused.returncode != 0
        assert b"max_connections_per_identity" in refused.stderr, refused.stderr.decode()
        assert jobctl("list", user="bob").returncode == 0
    finally:
        follower.kill()
        follower.wait()
        jobctl("stop", job_id)
