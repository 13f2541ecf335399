"""`jobctl logs` and `run` against a real server: --tail, --since, --timestamps, one stream, and
output the server's retention dropped (said on stderr, and the rest shown) in `logs`, `logs -f`
and `run`. The server keeps 1 MiB of each job's output, so a few MiB show a drop."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import Jobctl, Server, start_server
from .test_jobctl_e2e import read_exactly

RETENTION = 2**20
STAMPED = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (.*)$")
NOTICE = re.compile(
    r"^jobctl: [\d.]+ (?:bytes?|KiB|MiB|GiB) of output dropped by the server's retention;"
    r" resuming at offset (\d+)$"
)


@pytest.fixture(scope="module")
def small_server(certs_dir: Path) -> Iterator[Server]:
    server = start_server(certs_dir, "--output-retention", "1M", "--grace-period", "5s")
    yield server
    assert server.terminate() == 0, server.stderr()


@pytest.fixture(scope="module")
def jobctl(certs_dir: Path, small_server: Server) -> Jobctl:
    return Jobctl(certs_dir, small_server.address)


def fifo(shared_path: Path) -> Path:
    path = shared_path / "gate"
    os.mkfifo(path, 0o666)
    path.chmod(0o666)
    return path


def release(path: Path) -> None:
    with open(path, "wb"):
        pass  # the job's read of the FIFO returns


def rfc3339(ns: int) -> str:
    seconds, nanos = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def ns_of(stamp: bytes) -> int:
    moment = datetime.strptime(stamp[:19].decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 10**9 + int(stamp[20:29])


@contextlib.contextmanager
def ended_on_the_way_out(process: subprocess.Popen) -> Iterator[None]:
    """A failed assertion must not leave a jobctl blocked on a pipe nobody reads."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def resume_offsets(stderr: bytes) -> list[int]:
    """The offsets each drop notice says output resumes at; every stderr line is one."""
    lines = stderr.decode().splitlines()
    matches = [NOTICE.match(line) for line in lines]
    assert all(matches), lines
    return [int(m.group(1)) for m in matches if m]


# --- selecting --------------------------------------------------------------------------------


def test_tail_picks_the_last_lines(jobctl: Jobctl) -> None:
    job_id = jobctl.start("seq", "1", "100")
    jobctl.wait_ended(job_id)
    assert jobctl.ok("logs", "--tail", "3", job_id) == "98\n99\n100\n"
    assert jobctl.ok("logs", "-n", "1", job_id) == "100\n"
    assert jobctl.ok("logs", "-n", "all", job_id) == "".join(f"{i}\n" for i in range(1, 101))
    assert jobctl.ok("logs", "-n", "0", job_id) == ""  # none of what was kept
    done = jobctl("logs", "-n", "many", job_id)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == b"jobctl: --tail: expected a number of lines or 'all', got 'many'\n"


def test_one_stream_or_both(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    jobctl.wait_ended(job_id)
    out = jobctl("logs", "--stdout", job_id)
    assert (out.returncode, out.stdout, out.stderr) == (0, b"out1\nout2\n", b"")
    err = jobctl("logs", "--stderr", "-n", "1", job_id)
    assert (err.returncode, err.stdout, err.stderr) == (0, b"", b"err2\n")
    both = jobctl("logs", "--stdout", "--stderr", job_id)
    assert (both.returncode, both.stdout, both.stderr) == (0, b"out1\nout2\n", b"err1\nerr2\n")


def test_since_a_time_or_a_duration_ago(jobctl: Jobctl, shared_path: Path) -> None:
    gate = fifo(shared_path)
    job_id = jobctl.start("sh", "-c", f"echo early; cat {gate}; echo late >&2")
    follower = jobctl.popen("logs", "-f", job_id)
    assert read_exactly(follower.stdout, len(b"early\n")) == b"early\n"
    between_ns = time.time_ns()  # after "early" was read, before "late" is written
    release(gate)
    assert follower.communicate(timeout=30) == (b"", b"late\n")

    since = jobctl("logs", "--since", rfc3339(between_ns), job_id)
    assert (since.returncode, since.stdout, since.stderr) == (0, b"", b"late\n")
    hour_ago = datetime.fromtimestamp(between_ns / 1e9 - 3600).strftime("%Y-%m-%d %H:%M:%S")
    everything = jobctl("logs", "--since", hour_ago, job_id)  # local time, as typed
    assert (everything.stdout, everything.stderr) == (b"early\n", b"late\n")
    assert jobctl("logs", "--since", "1h", job_id).stdout == b"early\n"
    later = jobctl("logs", "--since", "0s", job_id)  # from now on: nothing, the job has ended
    assert (later.returncode, later.stdout, later.stderr) == (0, b"", b"")
    bad = jobctl("logs", "--since", "yesterday", job_id)
    assert bad.returncode == 2 and bad.stdout == b""
    assert bad.stderr.startswith(b"jobctl: --since: not a time: 'yesterday' (examples: 10m")
    assert bad.stderr.count(b"\n") == 1


def test_timestamps_begin_each_line_once(jobctl: Jobctl, shared_path: Path) -> None:
    gate = fifo(shared_path)
    before_ns = time.time_ns()
    # A line begun in one chunk and ended in a later one: stamped once, when it began.
    job_id = jobctl.start("sh", "-c", f"printf 'par'; cat {gate}; printf 'tial\\nnext\\n'")
    follower = jobctl.popen("logs", "-f", job_id)
    assert read_exactly(follower.stdout, 3) == b"par"
    release(gate)
    assert follower.communicate(timeout=30)[0] == b"tial\nnext\n"
    after_ns = time.time_ns()

    stamped = jobctl.ok("logs", "-t", job_id).encode()
    matches = [STAMPED.match(line) for line in stamped.splitlines()]
    assert all(matches), stamped
    assert [m.group(2) for m in matches if m] == [b"partial", b"next"]
    first, second = (ns_of(m.group(1)) for m in matches if m)
    assert before_ns <= first <= second <= after_ns
    # Without -t the bytes are the job's own, exactly.
    assert jobctl.ok("logs", job_id) == "partial\nnext\n"


# --- what retention dropped -------------------------------------------------------------------


def test_logs_of_more_than_is_kept_says_so_and_shows_the_rest(jobctl: Jobctl) -> None:
    total = 8 * RETENTION + 4
    job_id = jobctl.start("sh", "-c", f"head -c {8 * RETENTION} /dev/zero; echo END")
    jobctl.wait_ended(job_id)
    done = jobctl("logs", job_id)
    assert done.returncode == 0
    [resumed] = resume_offsets(done.stderr)  # one gap, said once
    assert len(done.stdout) == total - resumed
    assert RETENTION * 7 // 8 < len(done.stdout) <= RETENTION
    assert done.stdout.endswith(b"\0END\n")
    # The same with a tail reaching back beyond what is kept, and with timestamps.
    tail = jobctl("logs", "-t", "-n", "5", job_id)
    assert tail.returncode == 0 and resume_offsets(tail.stderr) == [resumed]
    assert tail.stdout.count(b"\n") == 1 and tail.stdout.endswith(b"\0END\n")


def test_a_follower_that_falls_behind_is_told_and_goes_on(
    jobctl: Jobctl, shared_path: Path
) -> None:
    gate = fifo(shared_path)
    size = 64 * RETENTION  # far more than what is kept plus every buffer on the way
    job_id = jobctl.start("sh", "-c", f"echo first; cat {gate}; head -c {size} /dev/zero; echo END")
    follower = jobctl.popen("logs", "-f", job_id)
    with ended_on_the_way_out(follower):
        assert read_exactly(follower.stdout, 6) == b"first\n"
        release(gate)
        # We read nothing more until the job has ended: jobctl blocks writing to its stdout,
        # the server's stream waits for it, and the job's output goes on past retention.
        jobctl.wait_ended(job_id)
        rest, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 0
    resumed = resume_offsets(stderr)
    assert resumed, stderr
    total = 6 + size + 4
    assert len(rest) >= total - resumed[-1]  # everything from the last resume on arrived
    assert rest.endswith(b"\0END\n") and set(rest[:-4]) == {0}


def test_run_of_a_job_writing_far_more_than_is_kept_exits_with_its_code(jobctl: Jobctl) -> None:
    name = f"flood-{uuid.uuid4().hex[:8]}"
    size = 64 * RETENTION
    runner = jobctl.popen(
        "run", "--name", name, "--", "sh", "-c", f"head -c {size} /dev/zero; echo END; exit 3"
    )
    with ended_on_the_way_out(runner):
        first = read_exactly(runner.stdout, 1)  # the job runs
        # As above: `run` falls behind while its stdout is not read, until the job has ended.
        waited = jobctl("wait", name)
        assert waited.returncode == 3, waited.stderr
        out, err = runner.communicate(timeout=60)
    out = first + out
    assert runner.returncode == 3  # the job's code, not a failure of jobctl's
    resumed = resume_offsets(err)
    assert resumed, err
    assert len(out) >= size + 4 - resumed[-1]
    assert out.endswith(b"\0END\n")
