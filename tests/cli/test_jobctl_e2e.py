"""jobctl against a real server: who sees what, output byte for byte, `run`, Ctrl-C, errors."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest

from ..supervisor.helpers import PYTHON  # an interpreter every job user can run
from .conftest import JOBCTL, Jobctl, Server, run

# Writes a known, mixed byte sequence: every byte value, on both streams, in many small writes.
# Half of it before it blocks on the FIFO named by argv[1] (the history a follower gets first),
# half after the test releases it (what followers must get live), then a final burst.
NOISY = r"""
import os, sys
def part(indices):
    for i in indices:
        os.write(1, bytes([i]) * 7 + b"out %d\n" % i + bytes(range(256)))
        os.write(2, b"err %d\x00\xff\n" % i)
part(range(30))
open(sys.argv[1], "rb").close()
part(range(30, 60))
os.write(1, b"\xfe" * 200_000)
os.write(2, b"done\n")
"""


def _out(i: int) -> bytes:
    return bytes([i]) * 7 + b"out %d\n" % i + bytes(range(256))


def expected_noise() -> tuple[bytes, bytes]:
    out = b"".join(_out(i) for i in range(60))
    err = b"".join(b"err %d\x00\xff\n" % i for i in range(60))
    return out + b"\xfe" * 200_000, err + b"done\n"


def read_exactly(pipe, size: int, timeout_s: float = 30) -> bytes:
    """`size` bytes from a subprocess pipe, failing (not hanging) after `timeout_s`."""
    got = b""
    deadline = time.monotonic() + timeout_s
    while len(got) < size:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([pipe], [], [], max(left, 0))
        assert ready, f"only {len(got)} of {size} bytes within {timeout_s} s"
        chunk = os.read(pipe.fileno(), size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return got


# --- who may see what ------------------------------------------------------------------------


def test_users_cannot_see_each_others_jobs(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sleep", "30")
    try:
        for command in (["status", job_id], ["logs", job_id], ["stop", job_id]):
            done = jobctl(*command, user="bob")
            assert done.returncode == 1, command
            assert done.stdout == b""
            assert done.stderr == f"jobctl: job {job_id} not found\n".encode()
        assert job_id not in jobctl.ok("list", user="bob")
        assert job_id in jobctl.ok("list", user="alice")
        # still running: bob's stop did nothing
        assert "Status:      running" in jobctl.ok("status", job_id)
    finally:
        jobctl.ok("stop", job_id, "--grace", "0")


def test_a_user_cannot_list_every_job(jobctl: Jobctl) -> None:
    done = jobctl("list", "--all", user="bob")
    assert done.returncode == 1
    assert done.stderr.startswith(b"jobctl: ") and b"\n" not in done.stderr[:-1]


def test_viewer_reads_everything_and_changes_nothing(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "echo from alice; sleep 30")
    try:
        listed = json.loads(jobctl.ok("list", "--all", "--json", user="vic"))
        assert job_id in [job["job_id"] for job in listed["jobs"]]
        assert "Owner:       alice" in jobctl.ok("status", job_id, user="vic")
        refused = jobctl("stop", job_id, user="vic")
        assert (refused.returncode, refused.stderr) == (
            1,
            b"jobctl: vic (role viewer) may not stop jobs\n",
        )
        refused = jobctl("start", "--", "true", user="vic")
        assert refused.returncode == 1
        assert refused.stderr.startswith(b"jobctl: vic (role viewer) may not start")
        assert "Status:      running" in jobctl.ok("status", job_id)
    finally:
        jobctl.ok("stop", job_id, "--grace", "0")
    assert jobctl.ok("logs", job_id, user="vic") == "from alice\n"


def test_admin_may_do_everything_to_every_job(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sleep", "30")
    assert job_id in jobctl.ok("list", "--all", user="carol")
    jobctl.ok("stop", job_id, user="carol")
    lines = jobctl.ok("status", job_id, user="carol").splitlines()
    assert "Status:      stopped" in lines
    assert "Reason:      stopped by carol" in lines
    assert "Owner:       alice" in lines


def test_list_shows_one_aligned_line_per_job(jobctl: Jobctl) -> None:
    first = jobctl.start("echo", "one")
    second = jobctl.start("sh", "-c", "exit 4")
    jobctl.wait_ended(second)
    lines = jobctl.ok("list").splitlines()
    assert lines[0].split() == ["JOB", "ID", "OWNER", "STATUS", "EXIT", "STARTED", "COMMAND"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows[second].split()[1:4] == ["alice", "failed", "4"]
    assert rows[second].endswith("  sh -c 'exit 4'")
    columns = {line.index("alice") for line in lines[1:]}
    assert len(columns) == 1  # aligned
    assert list(rows).index(first) < list(rows).index(second)  # oldest first


# --- output ----------------------------------------------------------------------------------


def test_three_followers_get_exactly_what_the_job_wrote(jobctl: Jobctl, shared_path: Path) -> None:
    gate = shared_path / "gate"
    os.mkfifo(gate, 0o666)
    gate.chmod(0o666)
    job_id = jobctl.start(PYTHON, "-c", NOISY, str(gate))
    followers = [jobctl.popen("logs", "-f", job_id) for _ in range(3)]
    # Each follower has the history before the job goes on, so the rest reaches it live.
    history = b"".join(_out(i) for i in range(30))
    firsts = [read_exactly(f.stdout, len(history)) for f in followers]
    with open(gate, "wb"):
        pass  # the job's open() returns: it writes the second half
    results = [f.communicate(timeout=30) for f in followers]
    out, err = expected_noise()
    for follower, first, (rest, stderr) in zip(followers, firsts, results, strict=True):
        assert follower.returncode == 0
        assert first == history
        assert first + rest == out
        assert stderr == err
    # and without -f, after the end: the same bytes
    done = jobctl("logs", job_id)
    assert (done.returncode, done.stdout, done.stderr) == (0, out, err)


def test_logs_follow_ends_cleanly_on_ctrl_c(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "echo ready; sleep 30")
    try:
        follower = jobctl.popen("logs", "-f", job_id)
        assert follower.stdout is not None and follower.stderr is not None
        assert follower.stdout.readline() == b"ready\n"
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130
        assert follower.stderr.read() == b""  # no traceback, nothing at all
        follower.stdout.close()
        follower.stderr.close()
        assert "Status:      running" in jobctl.ok("status", job_id)  # the job goes on
    finally:
        jobctl.ok("stop", job_id, "--grace", "0")


def test_run_exits_with_the_jobs_exit_code(jobctl: Jobctl) -> None:
    done = jobctl("run", "--memory", "64M", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")


def test_run_of_a_command_that_cannot_start(jobctl: Jobctl) -> None:
    done = jobctl("run", "--", "foobar-no-such-command")
    assert done.returncode == 127
    assert done.stderr.startswith(b"jobctl: job ")
    assert b"could not be created: cannot run 'foobar-no-such-command'" in done.stderr


def test_ctrl_c_during_run_stops_the_job(jobctl: Jobctl) -> None:
    runner = jobctl.popen("run", "--", "sh", "-c", "echo ready; sleep 30")
    assert runner.stdout is not None and runner.stderr is not None
    assert runner.stdout.readline() == b"ready\n"
    runner.send_signal(signal.SIGINT)
    assert runner.wait(15) == 143  # stopped by SIGTERM: 128 + 15
    stderr = runner.stderr.read().decode()
    runner.stdout.close()
    runner.stderr.close()
    assert stderr.startswith("jobctl: stopping job ")
    assert len(stderr.splitlines()) == 1


def test_start_passes_limits_env_and_working_directory(jobctl: Jobctl, shared_path: Path) -> None:
    tmp_path = shared_path
    job_id = jobctl.ok(
        "start", "--cpu", "0.25", "--memory", "256M", "--io-read", "10M", "--io-write", "20M",
        "--pids", "64", "--io-read-iops", "500", "--io-write-iops", "600",
        "-e", "GREETING=hi there", "--env", "EMPTY=", "--cwd", str(tmp_path),
        "--", "sh", "-c", 'echo "$GREETING|$EMPTY|$(pwd)"',
    ).strip()  # fmt: skip
    jobctl.wait_ended(job_id)
    assert jobctl.ok("logs", job_id) == f"hi there||{tmp_path}\n"
    status = json.loads(jobctl.ok("status", job_id, "--json"))
    assert status["limits"] == {
        "cpu": 0.25,
        "memory_bytes": str(256 * 2**20),
        "io_read_bytes_per_second": str(10 * 2**20),
        "io_write_bytes_per_second": str(20 * 2**20),
        "pids": 64,
        "io_read_iops": "500",
        "io_write_iops": "600",
    }
    shown = jobctl.ok("status", job_id)
    assert "io write 20M/s, pids 64, io read 500 IOPS, io write 600 IOPS" in shown


# --- errors ----------------------------------------------------------------------------------


def test_unknown_job_is_exit_1(jobctl: Jobctl) -> None:
    unknown = "5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a51"
    done = jobctl("status", unknown)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == f"jobctl: job {unknown} not found\n".encode()


def test_server_down_is_exit_2_cannot_connect(jobctl: Jobctl) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        done = jobctl("--server", f"127.0.0.1:{port}", "list")
    assert done.returncode == 2
    assert (
        done.stderr == f"jobctl: cannot connect to 127.0.0.1:{port}: connection refused\n".encode()
    )


def test_certificate_from_another_ca_is_exit_2(
    jobctl: Jobctl, server: Server, other_certs_dir: Path
) -> None:
    mallory = Jobctl(other_certs_dir, server.address)
    env = mallory.env("mallory")
    env["JOBCTL_CA"] = str(jobctl.certs / "ca.crt")  # mallory trusts our server...
    done = run([*JOBCTL, "list"], env=env)
    assert done.returncode == 2  # ...but our server does not trust mallory
    assert done.stderr.startswith(b"jobctl: certificate not accepted by server")
    assert done.stderr.count(b"\n") == 1


def test_server_from_another_ca_is_exit_2(
    jobctl: Jobctl, server: Server, other_certs_dir: Path
) -> None:
    done = jobctl("--ca", str(other_certs_dir / "ca.crt"), "list")
    assert done.returncode == 2
    assert b"server certificate not accepted" in done.stderr
    assert done.stderr.count(b"\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--memory", "lots", "--", "true"], b"jobctl: --memory: not a size: 'lots'"),
        (["stop", "x", "--grace", "soon"], b"jobctl: --grace: not a duration: 'soon'"),
        (["start", "--env", "NOEQUALS", "--", "true"], b"jobctl: --env: expected KEY=VALUE"),
        (["run", "--frob", "--", "true"], b"jobctl: Unknown option: --frob (jobctl's options go"),
        (["frobnicate"], b"jobctl: Unknown command"),
        (["--cert", "/nonexistent/alice.crt", "list"], b"jobctl: cannot read certificate file"),
    ],
)
def test_usage_and_setup_errors_are_exit_2_in_one_line(
    jobctl: Jobctl, args: list[str], message: bytes
) -> None:
    done = jobctl(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count(b"\n") == 1


def test_missing_default_files_name_where_they_were_looked_for(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": ""}
    done = run([*JOBCTL, "list"], env=env)
    assert done.returncode == 2
    expected = f"jobctl: no client cert and key and ca file: looked for {tmp_path}/.config/jobctl/"
    assert done.stderr.startswith(expected.encode())
    assert done.stderr.count(b"\n") == 1
