"""A real grpcio client (C-core, BoringSSL) calls the real service over mutual TLS with ECDSA
certificates, with the stubs jobworker ships for it (jobworker.v1.jobworker_pb2_grpc). They
use the same message classes as the server, so nothing is registered twice.

grpcio's calls block: they run in worker threads, each with its own deadline as a backstop.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import trio

from jobworker._pb.grpc.health.v1 import health_pb2
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc

from .conftest import Certs, Served

pytestmark = pytest.mark.cgroups

SCHEMA = Path(__file__).resolve().parents[2] / "schema"
TIMEOUT_S = 20.0


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    """The stubs a grpcio user has: jobworker's own, as shipped in jobworker.v1, and Health's,
    generated now (jobworker keeps its copy of health.proto private), importing ours."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("grpcio-stubs")
    proto = "grpc/health/v1/health.proto"
    well_known = resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        ["protoc", f"--proto_path={SCHEMA}", f"--proto_path={well_known}",
         f"--grpc_python_out={out}", proto]
    )  # fmt: skip
    assert status == 0, "protoc failed"
    path = out / proto.replace(".proto", "_pb2_grpc.py")
    # `from grpc.health.v1 import health_pb2` -> jobworker's private copy, jobworker._pb
    source = re.sub(
        r"^from (\S+) import (\w+_pb2) as", r"from jobworker._pb.\1 import \2 as",
        path.read_text(), flags=re.M,
    )  # fmt: skip
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    health = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health)
    return {"jobworker_pb2_grpc": jobworker_pb2_grpc, "health_pb2_grpc": health}


@pytest.fixture
async def channel(served: Served, certs: Certs) -> AsyncIterator[grpc.Channel]:
    leaf = certs.clients["alice"]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.cert_file.read_bytes(),
        private_key=leaf.key_file.read_bytes(),
        certificate_chain=leaf.cert_file.read_bytes(),
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{served.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    yield channel
    channel.close()


async def in_thread(fn, /, *args, **kwargs):
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
    )


async def test_grpcio_starts_a_job_reads_its_status_and_logs(
    served: Served, channel: grpc.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = stubs["jobworker_pb2_grpc"].JobServiceStub(channel)
    request = pb.StartJobRequest(command="sh", args=["-c", "printf 'out\\n'; printf 'err' >&2"])
    job_id = (await in_thread(stub.StartJob, request, timeout=TIMEOUT_S)).job_id
    assert served.supervisor.get(job_id).owner == "alice"  # identified by its certificate

    def logs() -> list[pb.GetJobLogsResponse]:
        request = pb.GetJobLogsRequest(job_id=job_id, follow=True)
        return list(stub.GetJobLogs(request, timeout=TIMEOUT_S))

    chunks = await in_thread(logs)
    assert {(c.stream, c.data) for c in chunks} == {
        (pb.LOG_STREAM_STDOUT, b"out\n"),
        (pb.LOG_STREAM_STDERR, b"err"),
    }
    reply = await in_thread(
        stub.GetJobStatus, pb.GetJobStatusRequest(job_id=job_id), timeout=TIMEOUT_S
    )
    status = reply.status
    assert (status.state, status.exit_code, status.owner) == (pb.JOB_STATE_FINISHED, 0, "alice")


async def test_grpcio_sees_our_status_codes_and_messages(
    served: Served, channel: grpc.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = stubs["jobworker_pb2_grpc"].JobServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        await in_thread(stub.GetJobStatus, pb.GetJobStatusRequest(job_id="../x"), timeout=TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id '../x' is neither a job id" in caught.value.details()
    health = stubs["health_pb2_grpc"].HealthStub(channel)
    reply = await in_thread(
        health.Check, health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
