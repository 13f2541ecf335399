"""`jobworker serve`'s configuration as operators use it, with real processes and certificates:
CPU as a percentage of one core, log formats and levels, the allow-list of identities, and
SIGHUP reloading the file under open connections and running jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import JOBWORKER, Jobctl, Server, run, tls_flags


def fails(done, code: int, line: bytes) -> None:
    """`done` exited with `code` and said exactly one line on stderr, starting with `line`."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.startswith(line), done.stderr
    assert done.stderr.count(b"\n") == 1, done.stderr


def test_cpu_as_a_percentage_of_one_core_end_to_end(server_factory, certs_dir: Path) -> None:
    server: Server = server_factory("--cpu", "20%", "--max-cpu", "150%")
    jobctl = Jobctl(certs_dir, server.address)
    default = jobctl.start("true")
    assert json.loads(jobctl.ok("status", default, "--json"))["limits"]["cpu"] == 0.2
    asked = jobctl.ok("start", "--cpu", "25%", "--", "true").strip()
    assert json.loads(jobctl.ok("status", asked, "--json"))["limits"]["cpu"] == 0.25
    above = jobctl("start", "--cpu", "160%", "--", "true")
    fails(above, 2, b"jobctl: ")
    assert b"above the maximum 1.5" in above.stderr


@pytest.mark.parametrize("cpu", ["0%", "-50%", "nan", "lots", "%"])
def test_cpu_that_is_no_positive_amount_is_one_line_and_exit_2(
    certs_dir: Path, cpu: str, tmp_path: Path
) -> None:
    # --cpu=VALUE: cyclopts takes "-50%" after a space for an option, as argparse would
    message = f"--cpu: must be a positive number of cores or a percentage of one core, got {cpu!r}"
    done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
                "--data-dir", str(tmp_path), f"--cpu={cpu}"])  # fmt: skip
    fails(done, 2, f"jobworker: {message}".encode())
    done = Jobctl(certs_dir, "127.0.0.1:1")("start", f"--cpu={cpu}", "--", "true")
    fails(done, 2, f"jobctl: {message}".encode())
