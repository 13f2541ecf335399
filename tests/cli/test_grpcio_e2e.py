"""A grpcio client (C-core, BoringSSL) against `jobworker serve` as users run it: certificates
from `jobworker certs init`, the server a subprocess. No generated stubs: grpcio's generic
calls with our message classes, which is all a client in any language needs from schema/.
"""

from __future__ import annotations

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
