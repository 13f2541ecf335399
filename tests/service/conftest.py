"""The service served for real: a Supervisor with real cgroups, the JobService over it, and a
purgatory Server with identify=identify over mutual TLS on 127.0.0.1; clients connect as one of
the cast below, each with its own certificate.

Cast (subject CN, OU values): alice and bob are plain users, vera a viewer, adam an admin,
olga both admin and viewer, eve a plain user whose OU ("superuser") grants nothing, and
"nameless" a certificate of the same CA with no CN at all.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.purgatory import Channel, Server, TLSConfig
from jobworker.purgatory.testing import CA, Leaf, make_ca, write_pem
from jobworker.purgatory.testing import serve as serve_on_loopback
from jobworker.service import (
    SERVICE_NAME,
    JobService,
    as_grpc_error,
    identify,
    open_job_service,
)
from jobworker.supervisor import LimitOverrides, LimitPolicy, Limits, Supervisor
from jobworker.supervisor.limits import MiB
from jobworker.v1 import jobworker_pb2 as pb

from ..supervisor.helpers import PYTHON  # noqa: F401  (for the tests here: jobs can run it)

CALL_TIMEOUT_S = 20.0  # a backstop against hangs, never expected to fire
MAX_RUNNING_JOBS = 3
RETENTION_BYTES = 256 * 2**10
GRACE_S = 5.0

# The server's limits: defaults well under the maximums, so tests can ask for more and too much.
DEFAULT_LIMITS = Limits(cpu=0.5, memory_bytes=256 * MiB, pids=256)
MAX_LIMITS = LimitOverrides(cpu=1.0, memory_bytes=512 * MiB, pids=1024)

CAST = {
    "alice": (),
    "bob": (),
    "vera": ("viewer",),
    "adam": ("admin",),
    "olga": ("admin", "viewer"),
    "eve": ("superuser",),
}

RESPONSES = {
    "StartJob": pb.StartJobResponse,
    "StopJob": pb.StopJobResponse,
    "GetJobStatus": pb.GetJobStatusResponse,
    "ListJobs": pb.ListJobsResponse,
    "DeleteJob": pb.DeleteJobResponse,
    "PruneJobs": pb.PruneJobsResponse,
    "WaitJob": pb.WaitJobResponse,
    "SignalJob": pb.SignalJobResponse,
    "WriteJobInput": pb.WriteJobInputResponse,
}


T = TypeVar("T")


async def answered(awaitable: Awaitable[T]) -> T:
    """A handler called directly, its domain errors turned into the statuses the server
    answers with (the server's errors hook: `as_grpc_error`)."""
    try:
        return await awaitable
    except Exception as exc:
        error = as_grpc_error(exc)
        if error is None:
            raise
        raise error from None


@dataclass(frozen=True)
class Certs:
    ca: CA
    server: Leaf
    clients: dict[str, Leaf]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("service-certs")
    ca = make_ca(directory, "Service Test CA")
    server = ca.issue(directory, "localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
    clients = {
        name: ca.issue(directory, name, organizational_units=ous, client=True)
        for name, ous in CAST.items()
    }
    clients["nameless"] = _issue_without_cn(ca, directory)
    return Certs(ca, server, clients)


def _issue_without_cn(ca: CA, directory: Path) -> Leaf:
    """A client certificate of the right CA whose subject has an OU but no CN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = write_pem(directory, "nameless", certificate, key)
    return Leaf(cert_file, key_file, certificate)


class Client:
    """A JobService client over one purgatory channel, as one identity."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def call(self, method: str, request):
        return await self.channel.unary(
            f"/{SERVICE_NAME}/{method}", request, RESPONSES[method], timeout_s=CALL_TIMEOUT_S
        )

    async def start(self, command: str, *args: str, **fields) -> str:
        request = pb.StartJobRequest(command=command, args=args, **fields)
        return (await self.call("StartJob", request)).job_id

    async def status(self, job_id: str) -> pb.JobStatus:
        return (await self.call("GetJobStatus", pb.GetJobStatusRequest(job_id=job_id))).status

    async def stop(self, job_id: str, **fields) -> pb.JobStatus:
        response = await self.call("StopJob", pb.StopJobRequest(job_id=job_id, **fields))
        return response.status

    async def wait(self, job_id: str) -> pb.JobStatus:
        return (await self.call("WaitJob", pb.WaitJobRequest(job_id=job_id))).status

    async def signal(self, job_id: str, signum: int) -> None:
        await self.call("SignalJob", pb.SignalJobRequest(job_id=job_id, signal=signum))

    async def list(self, *, all: bool = False, **fields) -> list[pb.JobStatus]:
        return list((await self.call("ListJobs", pb.ListJobsRequest(all=all, **fields))).jobs)

    def write_input(self):
        """A WriteJobInput call: `send()` its messages, then `response()`."""
        return self.channel.client_stream(
            f"/{SERVICE_NAME}/WriteJobInput", pb.WriteJobInputResponse, timeout_s=CALL_TIMEOUT_S
        )

    async def wait_ended(self, job_id: str) -> pb.JobStatus:
        """The job's final status, once it has ended: a follower from an offset its output
        never reaches ends exactly then (and reads nothing, so retention does not matter)."""
        await self.logs(job_id, follow=True, offset=2**62)
        return await self.status(job_id)

    async def logs(
        self, job_id: str, *, follow: bool = False, offset: int = 0
    ) -> list[pb.GetJobLogsResponse]:
        chunks = []
        async with self.logs_stream(job_id, follow=follow, offset=offset) as stream:
            async for chunk in stream:
                chunks.append(chunk)
        return chunks

    def logs_stream(self, job_id: str, *, follow: bool = False, offset: int = 0):
        request = pb.GetJobLogsRequest(job_id=job_id, follow=follow, offset=offset)
        return self.channel.server_stream(
            f"/{SERVICE_NAME}/GetJobLogs", request, pb.GetJobLogsResponse, timeout_s=CALL_TIMEOUT_S
        )


@dataclass
class Served:
    supervisor: Supervisor
    service: JobService
    port: int
    clients: dict[str, Client]

    def client(self, name: str) -> Client:
        """The client connected as `name` (one of the cast)."""
        return self.clients[name]


def client_tls(certs: Certs, name: str) -> TLSConfig:
    leaf = certs.clients[name]
    return TLSConfig.client(
        cert_file=leaf.cert_file,
        key_file=leaf.key_file,
        ca_files=[certs.ca.cert_file],
        server_name="localhost",
    )


@pytest.fixture
async def served(tmp_path: Path, certs: Certs) -> AsyncIterator[Served]:
    """The service on 127.0.0.1 with a channel per member of the cast (channels belong to this
    fixture's task, which opens and closes them). One user may hold every running-job slot
    here; the per-user caps have tests (and a fixture) of their own."""
    async with serve(
        tmp_path, certs, max_running_jobs=MAX_RUNNING_JOBS, max_running_jobs_per_user=None
    ) as served:
        yield served


@asynccontextmanager
async def serve(
    tmp_path: Path, certs: Certs, *, limits: LimitPolicy | None = None, **service_kwargs: Any
) -> AsyncIterator[Served]:
    """`served`, with `open_job_service(**service_kwargs)` and the Supervisor's `limits`
    (None: DEFAULT_LIMITS and MAX_LIMITS)."""
    supervisor = Supervisor(
        data_dir=tmp_path / "data",
        limits=limits or LimitPolicy(defaults=DEFAULT_LIMITS, maximums=MAX_LIMITS),
        grace_period_s=GRACE_S,
        retention_bytes=RETENTION_BYTES,
    )
    async with supervisor, open_job_service(supervisor, **service_kwargs) as service:
        tls = TLSConfig.server(
            cert_file=certs.server.cert_file,
            key_file=certs.server.key_file,
            ca_files=[certs.ca.cert_file],
        )
        server = Server(service.methods(), tls=tls, identify=identify, errors=as_grpc_error)
        async with serve_on_loopback(server) as on_loopback:
            async with AsyncExitStack() as stack:
                clients = {
                    name: Client(
                        await stack.enter_async_context(
                            on_loopback.connect(client_tls(certs, name))
                        )
                    )
                    for name in certs.clients
                }
                yield Served(supervisor, service, on_loopback.port, clients)
            service.set_serving(False)
            await server.shutdown(1.0)


def fifo(shared_path: Path, name: str = "go") -> Path:
    """A named pipe a job blocks on (`cat FIFO`) until the test calls `release`; in a directory
    the test shares with its jobs (`shared_path`), open to any job user."""
    path = shared_path / name
    os.mkfifo(path, 0o666)
    path.chmod(0o666)  # whatever the umask
    return path


async def release(path: Path) -> None:
    """Let a job blocked reading the FIFO go on: open it for writing (waits for the job to open
    it for reading) and close it, so the job reads EOF."""
    await trio.to_thread.run_sync(lambda: open(path, "wb").close())
