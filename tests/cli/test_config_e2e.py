"""`jobworker serve`'s configuration as operators use it, with real processes and certificates:
CPU as a percentage of one core, log formats and levels, the allow-list of identities, and
SIGHUP reloading the file under open connections and running jobs."""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import JOBWORKER, TIMEOUT_S, Jobctl, Server, run, tls_flags

REFUSED_BOB = (
    b"jobctl: bob may not use this server: neither its certificate's CN nor any of its"
    b" alternative names is on the server's allow-list\n"
)


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


@pytest.fixture
def ci_certs(certs_dir: Path, tmp_path: Path) -> Path:
    """The session's CA and users, plus "ci": a certificate whose CN is no allowed name but
    whose DNS SAN is (made with `jobworker certs add --san`, the same CA)."""
    directory = tmp_path / "tls"
    shutil.copytree(certs_dir, directory)
    done = run([*JOBWORKER, "certs", "add", str(directory), "--user", "ci",
                "--san", "dns:ci.example.com"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return directory


def json_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.stderr().splitlines()]


def test_allow_list_by_cn_or_san_refuses_the_rest_with_a_json_log_line(
    server_factory, ci_certs: Path
) -> None:
    server: Server = server_factory(
        "--allow", "alice", "--allow", "dns:CI.example.com", "--log-format", "json"
    )
    jobctl = Jobctl(ci_certs, server.address)
    alices = jobctl.start("true")
    cis = jobctl.start("true", user="ci")  # admitted by its SAN: its CN "ci" is not listed
    refused = jobctl("list", user="bob")  # a valid certificate of the same CA, not listed
    assert (refused.returncode, refused.stderr, refused.stdout) == (1, REFUSED_BOB, b"")

    line = json.loads(server.wait_for_log('"access refused"'))
    assert line["level"] == "warning" and line["logger"] == "jobworker.events"
    assert (line["identity"], line["subject"], line["reason"]) == (
        "bob",
        "CN=bob",
        "not on the allow-list",
    )
    assert line["peer"].startswith("127.0.0.1:")
    # Every line is one JSON object; the jobs' lines carry who started them as a field.
    lines = json_lines(server)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    created = {obj["job"]: obj["identity"] for obj in lines if obj.get("message") == "job created"}
    assert created == {alices: "alice", cis: "ci"}
    listed = json.loads(jobctl.ok("list", "--json", user="ci"))
    assert [job["job_id"] for job in listed["jobs"]] == [
        cis
    ]  # the SAN admits; it grants nothing more


def _follow(jobctl: Jobctl, job_id: str) -> subprocess.Popen:
    follower = jobctl.popen("logs", "-f", job_id)
    assert _line(follower) == b"tick\n"
    return follower


def _line(process: subprocess.Popen) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], TIMEOUT_S)
    assert ready, "no output"
    return process.stdout.readline()


def _memory(jobctl: Jobctl, job_id: str) -> int:
    return int(json.loads(jobctl.ok("status", job_id, "--json"))["limits"]["memory_bytes"])


def test_sighup_reloads_the_file_under_a_running_job_and_an_open_log_stream(
    server_factory, certs_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "jobworker.toml"
    config.write_text('memory = "512M"\ntransient-uids = "70000-79999"\n')
    server: Server = server_factory("--config", str(config))
    jobctl = Jobctl(certs_dir, server.address)
    ticking = jobctl.start("sh", "-c", "while :; do echo tick; sleep 0.1; done")
    follower = _follow(jobctl, ticking)  # an open connection and log stream
    try:
        assert _memory(jobctl, ticking) == 512 * 2**20
        assert jobctl("list", user="bob").returncode == 0

        config.write_text(
            'memory = "256M"\nallow = ["alice"]\nlog-format = "json"\n'
            'transient-uids = "60000-60999"\n'  # only a restart can change it
        )
        server.process.send_signal(signal.SIGHUP)
        reloaded = json.loads(server.wait_for_log("SIGHUP: reloaded"))
        assert reloaded["message"] == (  # and this line is already the new format's
            f"SIGHUP: reloaded config file {config}: changed defaults (memory=256M), allow,"
            " log-format"
        )
        kept = json.loads(server.wait_for_log("SIGHUP: kept"))
        assert kept["level"] == "warning"
        assert kept["message"] == (
            f"SIGHUP: kept transient-uids as before: a change there takes a restart"
            f" (config file {config})"
        )
        # The job and its follower went on through the reload, on the same connection.
        assert _line(follower) == b"tick\n"
        assert json.loads(jobctl.ok("status", ticking, "--json"))["state"] == "JOB_STATE_RUNNING"
        assert _memory(jobctl, ticking) == 512 * 2**20  # a running job keeps what it got
        # The new settings hold for what comes next.
        assert _memory(jobctl, jobctl.start("true")) == 256 * 2**20
        refused = jobctl("list", user="bob")
        assert (refused.returncode, refused.stderr) == (1, REFUSED_BOB)

        # A file the loader refuses changes nothing at all, not even its valid keys.
        config.write_text('memory = "128M"\nlog-format = "text"\nmax-jobs = 0\n')
        server.process.send_signal(signal.SIGHUP)
        error = json.loads(server.wait_for_log("SIGHUP: not reloaded"))
        assert (error["level"], error["message"]) == (
            "error",
            "SIGHUP: not reloaded, the configuration is unchanged: config file"
            f" {config}: max-jobs: not a whole number of at least 1: 0",
        )
        config.write_text('memory = "128M"\nallow = ["alice"\n')  # a TOML syntax error
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("Unclosed array")
        assert _memory(jobctl, jobctl.start("true")) == 256 * 2**20
        assert jobctl("list", user="bob").stderr == REFUSED_BOB
        assert _line(follower) == b"tick\n"
        # From the reload on, every line is JSON; each bad file cost exactly one error line.
        lines = server.stderr().splitlines()
        first = next(i for i, line in enumerate(lines) if "SIGHUP: reloaded" in line)
        after = [json.loads(line) for line in lines[first:]]
        assert [obj["message"][:20] for obj in after if obj["level"] == "error"] == [
            "SIGHUP: not reloaded"
        ] * 2
    finally:
        follower.kill()
        follower.communicate()
    assert server.terminate() == 0, server.stderr()


def test_log_level_warning_leaves_out_the_info_lines(server_factory, certs_dir: Path) -> None:
    server: Server = server_factory("--log-level", "warning")
    jobctl = Jobctl(certs_dir, server.address)
    job_id = jobctl.start("true")
    assert jobctl("status", job_id, user="bob").returncode == 1  # hidden from bob: a warning
    line = server.wait_for_log("authorization failure")
    assert " jobworker.events WARNING authorization failure identity=bob " in line
    # Lines come in order: the job's creation, an info line, would be above it by now.
    assert "job created" not in server.stderr() and "serving on" not in server.stderr()


def test_a_config_file_that_is_not_utf8_is_refused_never_fatal(
    server_factory, certs_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "jobworker.toml"
    config.write_bytes(b'memory = "256M"\n# caf\xe9\n')
    done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
                "--config", str(config)])  # fmt: skip
    fails(done, 2, f"jobworker: config file {config}: not UTF-8 (byte 21: invalid ".encode())

    config.write_text('memory = "256M"\n')
    server: Server = server_factory("--config", str(config))
    jobctl = Jobctl(certs_dir, server.address)
    sleeping = jobctl.start("sleep", "600")
    config.write_bytes(b'memory = "128M"\n# caf\xe9\n')
    server.process.send_signal(signal.SIGHUP)
    line = server.wait_for_log("SIGHUP: not reloaded")
    assert "not UTF-8" in line
    # still serving, its job still running, the old settings in force
    assert json.loads(jobctl.ok("status", sleeping, "--json"))["state"] == "JOB_STATE_RUNNING"
    assert _memory(jobctl, jobctl.start("true")) == 256 * 2**20
    jobctl.ok("stop", sleeping)
    assert server.terminate() == 0, server.stderr()


def _sighup_ignored_or_caught(pid: int) -> bool:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & 1 << (signal.SIGHUP - 1))


def test_a_sighup_while_the_server_starts_does_not_kill_it(certs_dir: Path, tmp_path) -> None:
    """systemd's ExecReload may come as soon as the process exists: from the moment the
    process stops dying of SIGHUP (its disposition says so), a SIGHUP is harmless."""
    process = subprocess.Popen(
        [*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    server = Server(process)
    server.start_reading_stderr()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _sighup_ignored_or_caught(process.pid):  # the launcher's first act
            assert process.poll() is None and time.monotonic() < deadline, server.stderr()
        process.send_signal(signal.SIGHUP)  # long before it listens: it is still importing
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"jobworker: listening on ")
    finally:
        assert server.terminate() == 0, server.stderr()


def test_the_allow_list_covers_health_and_reflection_too(server_factory, certs_dir: Path) -> None:
    """Someone off the list may not even ask whether the server is up or which services it
    has: every service the server answers is behind the list, with grpcio as the client."""
    import grpc

    from jobworker._pb.grpc.health.v1 import health_pb2
    from jobworker._pb.grpc.reflection.v1 import reflection_pb2

    server: Server = server_factory("--allow", "alice")

    def ask(user: str):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs_dir / user / "ca.crt").read_bytes(),
            private_key=(certs_dir / user / "client.key").read_bytes(),
            certificate_chain=(certs_dir / user / "client.crt").read_bytes(),
        )
        with grpc.secure_channel(server.address, credentials) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reflect = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            answers = []
            for call in (
                lambda: check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status,
                lambda: [
                    s.name
                    for reply in reflect(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=TIMEOUT_S,
                    )
                    for s in reply.list_services_response.service
                ],
            ):
                try:
                    answers.append(call())
                except grpc.RpcError as exc:
                    answers.append(exc.code())
            return answers

    serving, services = ask("alice")
    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert "jobworker.v1.JobService" in services
    assert ask("bob") == [grpc.StatusCode.PERMISSION_DENIED] * 2
