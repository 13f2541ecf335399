"""A grpcio client (C-core, BoringSSL) against `jobworker serve` as users run it: certificates
from `jobworker certs init`, the server a subprocess. Once with grpcio's generic calls and our
message classes, which is all a client in any language needs from schema/; once with the stubs
jobworker ships, as examples/grpc_client.py uses them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from jobworker._pb.grpc.health.v1 import health_pb2
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Server

TIMEOUT_S = 20.0
SERVICE = "/jobworker.v1.JobService/"


def channel_as(user: str, certs: Path, server: Server) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / user / "ca.crt").read_bytes(),
        private_key=(certs / user / "client.key").read_bytes(),
        certificate_chain=(certs / user / "client.crt").read_bytes(),
    )
    return grpc.secure_channel(server.address, credentials)  # 127.0.0.1: an IP SAN


def unary(channel: grpc.Channel, method: str, request, response_type):
    call = channel.unary_unary(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return call(request, timeout=TIMEOUT_S)


def test_grpcio_runs_a_job_on_the_real_server(server: Server, certs_dir: Path) -> None:
    with channel_as("bob", certs_dir, server) as channel:
        health = unary(
            channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(),
            health_pb2.HealthCheckResponse,
        )  # fmt: skip
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        started = unary(
            channel, SERVICE + "StartJob",
            pb.StartJobRequest(command="sh", args=["-c", "printf 'from grpcio'; exit 4"]),
            pb.StartJobResponse,
        )  # fmt: skip
        logs = channel.unary_stream(
            SERVICE + "GetJobLogs",
            request_serializer=pb.GetJobLogsRequest.SerializeToString,
            response_deserializer=pb.GetJobLogsResponse.FromString,
        )
        chunks = list(logs(pb.GetJobLogsRequest(job_id=started.job_id, follow=True), timeout=20))
        assert b"".join(c.data for c in chunks) == b"from grpcio"
        status = unary(
            channel, SERVICE + "GetJobStatus", pb.GetJobStatusRequest(job_id=started.job_id),
            pb.GetJobStatusResponse,
        ).status  # fmt: skip
        assert (status.owner, status.state, status.exit_code) == ("bob", pb.JOB_STATE_FAILED, 4)

    with channel_as("alice", certs_dir, server) as channel, pytest.raises(grpc.RpcError) as err:
        unary(
            channel, SERVICE + "GetJobStatus", pb.GetJobStatusRequest(job_id=started.job_id),
            pb.GetJobStatusResponse,
        )  # fmt: skip
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert err.value.details() == f"job {started.job_id} not found"


def test_the_grpcio_client_example_runs_a_job(server: Server, certs_dir: Path) -> None:
    """examples/grpc_client.py, as the README shows it: the shipped stubs, a real server."""
    example = Path(__file__).resolve().parents[2] / "examples" / "grpc_client.py"
    env = {
        **os.environ,
        "JOBCTL_SERVER": server.address,
        "JOBCTL_CERT": str(certs_dir / "bob" / "client.crt"),
        "JOBCTL_KEY": str(certs_dir / "bob" / "client.key"),
        "JOBCTL_CA": str(certs_dir / "bob" / "ca.crt"),
    }
    script = "printf 'out\\n'; printf 'err\\n' >&2; exit 3"
    done = subprocess.run(
        [sys.executable, str(example), "sh", "-c", script],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "out\n"
    lines = done.stderr.splitlines()
    assert lines[0].startswith("job ") and lines[0].endswith(": JOB_STATE_RUNNING")
    assert lines[1] == "err"
    assert lines[2].endswith(": JOB_STATE_FAILED, exit code 3")
