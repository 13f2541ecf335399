"""`jobctl run -i` against a real `jobworker serve`: the caller's stdin reaches the job byte for
byte, EOF included, from a file or a pipe; without -i the job reads /dev/null and run says so
once when something was piped in."""

from __future__ import annotations

import hashlib
import os
import subprocess

from .conftest import JOBCTL, TIMEOUT_S, Jobctl

NOT_PASSED = b"jobctl: stdin is not passed to the job (its stdin is /dev/null); run -i passes it\n"


def test_run_i_passes_a_binary_file_byte_exact(jobctl: Jobctl, tmp_path) -> None:
    data = os.urandom(5 * 2**20 + 3)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    with source.open("rb") as stdin:
        done = subprocess.run(
            [*JOBCTL, "run", "-i", "sha256sum"], stdin=stdin, capture_output=True,
            env=jobctl.env("alice"), timeout=TIMEOUT_S,
        )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    # sha256sum prints once it has read EOF: our EOF reached the job
    assert done.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()


def test_run_i_passes_a_pipe_and_the_jobs_exit_code(jobctl: Jobctl) -> None:
    producer = subprocess.Popen(["printf", "one\\ntwo\\n"], stdout=subprocess.PIPE)
    done = subprocess.run(
        [*JOBCTL, "run", "-i", "--", "sh", "-c", "wc -l; exit 5"], stdin=producer.stdout,
        capture_output=True, env=jobctl.env("alice"), timeout=TIMEOUT_S,
    )  # fmt: skip
    producer.wait()
    assert done.stdout.strip() == b"2" and done.returncode == 5


def test_a_job_that_stops_reading_early_is_no_error(jobctl: Jobctl) -> None:
    """`yes | jobctl run -i head -n 2`: endless input, a job that takes two lines and ends."""
    producer = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        done = subprocess.run(
            [*JOBCTL, "run", "-i", "head", "-n", "2"], stdin=producer.stdout,
            capture_output=True, env=jobctl.env("alice"), timeout=TIMEOUT_S,
        )  # fmt: skip
    finally:
        producer.kill()
        producer.wait()
    assert (done.returncode, done.stdout, done.stderr) == (0, b"y\ny\n", b"")


def test_without_i_the_job_reads_nothing_and_run_says_so_once(jobctl: Jobctl) -> None:
    done = subprocess.run(
        [*JOBCTL, "run", "cat"], input=b"hello\n", capture_output=True,
        env=jobctl.env("alice"), timeout=TIMEOUT_S,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", NOT_PASSED)
    # nothing to say when stdin holds nothing meant for the job
    done = subprocess.run(
        [*JOBCTL, "run", "cat"], stdin=subprocess.DEVNULL, capture_output=True,
        env=jobctl.env("alice"), timeout=TIMEOUT_S,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_run_i_with_stdin_closed_gives_the_job_eof_and_its_exit_code(jobctl: Jobctl) -> None:
    done = subprocess.run(
        [*JOBCTL, "run", "-i", "--", "sh", "-c", "cat; echo got-eof; exit 3"],
        stdin=None, capture_output=True, env=jobctl.env("alice"), timeout=TIMEOUT_S,
        preexec_fn=lambda: os.close(0),  # `<&-`
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (3, b"got-eof\n")
    assert done.stderr == b"jobctl: stdin is closed: the job reads EOF\n"
