"""`jobworker serve --audit --metrics` as a real process: jobctl's calls become audit lines on
stderr and figures on the metrics listener (scraped over real HTTP, parsed by
prometheus_client); a stranger's failed handshake is named; `examples/jobworker.service`
matches the server's flags."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobworker.cli.config import load_config_file, resolve
from jobworker.cli.serve import DRAIN_MARGIN_S

from .conftest import JOBCTL, JOBWORKER, TIMEOUT_S, Jobctl, Server, run, tls_flags

UNIT_FILE = Path(__file__).parents[2] / "examples" / "jobworker.service"
EXAMPLE_CONFIG = Path(__file__).parents[2] / "examples" / "jobworker.toml"
METRICS_LINE = re.compile(rb"^jobworker: metrics on (http://\S+/metrics)$")


def metrics_url(server: Server) -> str:
    """The URL the server announced on stdout. It prints it right after its listening line,
    which the kit has read (so the line may be in the pipe's buffer already: no select), and
    a server that died instead gives EOF."""
    stdout = server.process.stdout
    assert stdout is not None
    match = METRICS_LINE.match(stdout.readline().rstrip(b"\n"))
    assert match, server.stderr()
    return match.group(1).decode()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


KINDS = {"GetJobLogs": "server_stream", "WriteJobInput": "client_stream"}


def handled(samples, method: str, code: str) -> float:
    labels = {
        "grpc_service": "jobworker.v1.JobService",
        "grpc_method": method,
        "grpc_type": KINDS.get(method, "unary"),
        "grpc_code": code,
    }
    return samples.get(("grpc_server_handled_total", frozenset(labels.items())), 0.0)


def test_calls_become_audit_lines_and_metrics(server_factory, certs_dir: Path, other_certs_dir):
    server: Server = server_factory("--audit", "--metrics", "0")  # a free port on loopback
    url = metrics_url(server)
    assert url.startswith("http://127.0.0.1:")
    jobctl = Jobctl(certs_dir, server.address)

    job_id = jobctl.start("sh", "-c", "echo hello")
    jobctl.wait_ended(job_id)
    piped = subprocess.run(
        [*JOBCTL, "run", "-i", "cat"], input=b"piped", capture_output=True,
        env=jobctl.env("alice"), timeout=TIMEOUT_S,
    )  # fmt: skip
    assert (piped.returncode, piped.stdout) == (0, b"piped")
    assert jobctl("stop", "nosuch").returncode != 0
    assert jobctl("list", "--all").returncode != 0  # alice is a plain user

    started = server.wait_for_log("method=/jobworker.v1.JobService/StartJob")
    assert f"identity=alice roles=user method=/jobworker.v1.JobService/StartJob job={job_id}" in (
        started
    )
    assert "code=OK duration_ms=" in started and "peer=127.0.0.1:" in started
    stop = server.wait_for_log("method=/jobworker.v1.JobService/StopJob")
    assert "job=nosuch code=NOT_FOUND" in stop
    listing = server.wait_for_log("method=/jobworker.v1.JobService/ListJobs")
    assert "code=PERMISSION_DENIED" in listing

    samples = scrape(url)
    assert samples[("jobworker_jobs_started_total", frozenset())] == 2
    finished = frozenset({("state", "finished")})
    assert samples[("jobworker_jobs_ended_total", finished)] == 2
    assert samples[("jobworker_output_bytes_total", frozenset())] == len("hello\npiped")
    assert handled(samples, "StartJob", "OK") == 2
    assert handled(samples, "WriteJobInput", "OK") == 1
    assert handled(samples, "StopJob", "NOT_FOUND") == 1
    assert handled(samples, "ListJobs", "PERMISSION_DENIED") == 1

    # A certificate of another CA (mallory trusts our server): the handshake fails, and the
    # line names the certificate.
    env = Jobctl(other_certs_dir, server.address).env("mallory")
    env["JOBCTL_CA"] = str(certs_dir / "ca.crt")
    assert run([*JOBCTL, "list"], env=env).returncode != 0
    failed = server.wait_for_log("TLS handshake with 127.0.0.1:")
    assert "CN=mallory" in failed and "certificate verify failed" in failed


def test_the_config_file_turns_both_on(server_factory, tmp_path: Path) -> None:
    config = tmp_path / "jobworker.toml"
    config.write_text('audit = true\nmetrics = "127.0.0.1:0"\n')
    server: Server = server_factory("--config", str(config))
    url = metrics_url(server)
    server.wait_for_log("audit: one line per call")
    samples = scrape(url)
    assert samples[("jobworker_jobs_running", frozenset())] == 0


def test_without_the_flags_there_is_neither(server_factory, certs_dir: Path) -> None:
    server: Server = server_factory()
    Jobctl(certs_dir, server.address).ok("list")
    assert server.terminate() == 0
    assert "jobworker.audit" not in server.stderr() and "metrics on" not in server.stderr()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nonsense", "jobworker: --metrics: not an address: 'nonsense' (expected HOST:PORT)\n"),
        ("127.0.0.1:99999", "jobworker: --metrics: not an address: '127.0.0.1:99999'"),
    ],
)
def test_a_bad_metrics_address_is_one_line(certs_dir: Path, value: str, message: str) -> None:
    done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
                "--metrics", value])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().startswith(message), done.stderr
    assert done.stderr.count(b"\n") == 1


def test_a_metrics_port_in_use_stops_the_start(certs_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
                    "--data-dir", str(tmp_path / "data"), "--metrics", str(port)])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode() == (
        f"jobworker: cannot listen for metrics on 127.0.0.1:{port}: address already in use\n"
    )
    assert done.stdout == b""  # nothing was served


# --- examples/jobworker.service ---------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(UNIT_FILE)
    return parser


def test_the_unit_file_lets_the_server_stop_its_jobs_itself() -> None:
    service = unit()["Service"]
    assert service["Delegate"] == "yes"  # the jobs' cgroups are the server's to manage
    assert service["KillMode"] == "mixed"  # SIGTERM to the server alone; SIGKILL to all last
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT")  # what serve handles
    assert "User" not in service  # root: cgroups, transient users, namespaces
    for forbidden in ("ProtectControlGroups", "RestrictNamespaces", "PrivateDevices"):
        assert service.get(forbidden, "no") == "no", forbidden
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/jobworker") and argv[1] == "serve"
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert service["StateDirectory"] == "jobworker"
    assert flags["--data-dir"] == "${STATE_DIRECTORY}"
    # Its settings are the example config file's, installed where --config points.
    assert flags["--config"] == "/etc/jobworker/jobworker.toml"
    settings = resolve({}, load_config_file(EXAMPLE_CONFIG))
    # Stopping takes the grace period plus the server's drain margin: systemd must wait longer.
    grace_s = settings.grace_period_s
    assert float(service["TimeoutStopSec"].removesuffix("s")) > grace_s + DRAIN_MARGIN_S
    assert service["TasksMax"] == "infinity"  # the jobs' own pids limits bind, not the unit's
    # `systemctl reload`: SIGHUP, which reads the config file again
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_unit_files_command_line_is_one_the_server_accepts(tmp_path: Path) -> None:
    """Its flags, with a data directory and TLS files of the test's own, pass the server's
    own parsing: run with --help they are all known (cyclopts refuses an unknown flag)."""
    argv = shlex.split(unit()["Service"]["ExecStart"])
    argv = [a.replace("${STATE_DIRECTORY}", str(tmp_path)) for a in argv[1:]]
    argv = [str(EXAMPLE_CONFIG) if a == "/etc/jobworker/jobworker.toml" else a for a in argv]
    done = run([*JOBWORKER, *argv, "--help"])
    assert done.returncode == 0, done.stderr
    for flag in (a for a in argv if a.startswith("--")):
        assert flag.encode() in done.stdout, flag


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_unit_file(tmp_path: Path) -> None:
    # verify checks that the command exists: point it at this installation's jobworker.
    text = UNIT_FILE.read_text().replace("/usr/local/bin/jobworker", JOBWORKER[0])
    copy = tmp_path / "jobworker.service"
    copy.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, timeout=60, check=False
    )
    # It exits 0 even on a setting it ignored: what it said is the verdict.
    assert (done.returncode, done.stderr, done.stdout) == (0, b"", b""), done.stderr.decode()
