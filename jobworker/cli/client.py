"""jobctl's side of the wire: the shared connection options, and a small JobService client
that turns every failure into a `CliError` with the right exit code.

Where the client's files come from, first match wins:
    --cert/--key/--ca  →  JOBCTL_CERT/JOBCTL_KEY/JOBCTL_CA  →
    $XDG_CONFIG_HOME/jobctl/{client.crt,client.key,ca.crt} (~/.config/jobctl/ when unset)
and the server: --server → JOBCTL_SERVER → 127.0.0.1:50051.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import trio
from cyclopts import Parameter

from jobworker.api import duration_to_proto
from jobworker.purgatory import (
    Channel,
    GrpcError,
    Status,
    TLSCertificateRejected,
    TLSConfig,
    TLSConfigError,
    TLSError,
    TLSStream,
    open_channel_over,
)
from jobworker.v1 import jobworker_pb2 as pb

from .errors import EXIT_RPC, EXIT_USAGE, CliError
from .parsing import DEFAULT_PORT, Address, parse_address

DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
SERVICE = "/jobworker.v1.JobService"
CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 15.0  # every unary call but StopJob, which waits for the job to end
STOP_MARGIN_S = 15.0  # StopJob's deadline: the grace period plus this
STOP_UNKNOWN_GRACE_S = 60.0  # the grace to assume when the server's default applies


def config_dir() -> Path:
    """Where jobctl looks for the client's files when no flag or variable names them."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "jobctl"


@Parameter(name="*", group="Connection")
@dataclass(frozen=True)
class Connection:
    """How to reach the server and who we are."""

    server: Annotated[
        str,
        Parameter(
            env_var="JOBCTL_SERVER",
            help=f"The server's address, HOST:PORT. Default: {DEFAULT_SERVER}.",
        ),
    ] = DEFAULT_SERVER
    cert: Annotated[
        Path | None,
        Parameter(
            env_var="JOBCTL_CERT",
            help="Client certificate (PEM). Default: ~/.config/jobctl/client.crt.",
        ),
    ] = None
    key: Annotated[
        Path | None,
        Parameter(
            env_var="JOBCTL_KEY",
            help="The certificate's private key (PEM). Default: ~/.config/jobctl/client.key.",
        ),
    ] = None
    ca: Annotated[
        Path | None,
        Parameter(
            env_var="JOBCTL_CA",
            help="CA certificate(s) the server's certificate must chain to. "
            "Default: ~/.config/jobctl/ca.crt.",
        ),
    ] = None


def _tls_config(conn: Connection, address: Address) -> TLSConfig:
    files = {
        "cert": conn.cert or config_dir() / "client.crt",
        "key": conn.key or config_dir() / "client.key",
        "ca": conn.ca or config_dir() / "ca.crt",
    }
    defaulted = [name for name in files if getattr(conn, name) is None]
    missing = [name for name in defaulted if not files[name].exists()]
    if missing:
        raise CliError(
            f"no client {' and '.join(missing)} file: looked for "
            + ", ".join(str(files[name]) for name in missing)
            + " (pass --cert/--key/--ca, set JOBCTL_CERT/JOBCTL_KEY/JOBCTL_CA,"
            + f" or copy a user's files from `jobworker certs init` into {config_dir()})"
        )
    try:
        return TLSConfig.client(
            cert_file=files["cert"],
            key_file=files["key"],
            ca_files=[files["ca"]],
            server_name=address.host,
        )
    except TLSConfigError as exc:
        raise CliError(str(exc)) from None


@asynccontextmanager
async def connect(conn: Connection) -> AsyncIterator[JobClient]:
    """Connect (TCP, then the TLS handshake) and yield a client; CliError on any failure."""
    try:
        address = parse_address(conn.server, default_port=DEFAULT_PORT)
    except ValueError as exc:
        raise CliError(f"--server: {exc}") from None
    if address.host is None:
        address = Address("127.0.0.1", address.port)
    tls = _tls_config(conn, address)
    where = str(address)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise CliError(f"cannot connect to {where}: timed out") from None
    except OSError as exc:
        raise CliError(f"cannot connect to {where}: {_socket_problem(exc)}") from None
    stream = TLSStream(tcp, tls)
    try:
        await stream.do_handshake()
    except TLSError as exc:
        await trio.aclose_forcefully(tcp)
        raise CliError(f"TLS with {where} failed: {exc}") from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    async with open_channel_over(stream, authority=where) as channel:
        yield JobClient(channel, where)


def _socket_problem(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    causes = getattr(exc.__cause__, "exceptions", None) or [exc]
    for cause in causes:
        number = getattr(cause, "errno", None)
        if number:
            return os.strerror(number).lower()
    return str(exc) or type(exc).__name__


LIST_PAGE_SIZE = 500


class JobClient:
    """The JobService calls, each with a deadline, each failing as a CliError."""

    def __init__(self, channel: Channel, server: str) -> None:
        self._channel = channel
        self.server = server

    async def start(self, request: pb.StartJobRequest) -> pb.StartJobResponse:
        return await self._unary("StartJob", request, pb.StartJobResponse)

    async def stop(self, job_id: str, grace_period_s: float | None = None) -> pb.StopJobResponse:
        """Stop the job and return once it has ended: its final status, and whether it had
        already ended before (nothing was signalled)."""
        request = pb.StopJobRequest(job_id=job_id)
        if grace_period_s is not None:
            request.grace_period.CopyFrom(duration_to_proto(grace_period_s))
        wait_s = (grace_period_s if grace_period_s is not None else STOP_UNKNOWN_GRACE_S) + (
            STOP_MARGIN_S
        )
        return await self._unary("StopJob", request, pb.StopJobResponse, timeout_s=wait_s)

    async def wait(self, job_id: str) -> pb.JobStatus:
        """The job's final status, once it has ended. No deadline: a job may run for days,
        and the caller's Ctrl-C (a cancellation) is what ends the wait early."""
        request = pb.WaitJobRequest(job_id=job_id)
        reply = await self._unary("WaitJob", request, pb.WaitJobResponse, timeout_s=None)
        return reply.status

    async def signal(self, job_id: str, signal_number: int) -> None:
        request = pb.SignalJobRequest(job_id=job_id, signal=signal_number)
        await self._unary("SignalJob", request, pb.SignalJobResponse)

    async def status(self, job_id: str) -> pb.JobStatus:
        request = pb.GetJobStatusRequest(job_id=job_id)
        return (await self._unary("GetJobStatus", request, pb.GetJobStatusResponse)).status

    async def list(
        self, request: pb.ListJobsRequest, *, limit: int | None = None
    ) -> list[pb.JobStatus]:
        """Every job the request matches, page after page (at most `limit` of them)."""
        jobs: list[pb.JobStatus] = []
        while True:
            left = LIST_PAGE_SIZE if limit is None else limit - len(jobs)
            request.page_size = min(left, LIST_PAGE_SIZE)
            reply = await self._unary("ListJobs", request, pb.ListJobsResponse)
            jobs.extend(reply.jobs)
            if not reply.next_page_token or (limit is not None and len(jobs) >= limit):
                return jobs
            request.page_token = reply.next_page_token

    async def delete(self, job_id: str, *, force: bool) -> None:
        # A forced removal waits for the job's stop: the server's grace period, unknown here.
        timeout_s = STOP_UNKNOWN_GRACE_S + STOP_MARGIN_S if force else CALL_TIMEOUT_S
        request = pb.DeleteJobRequest(job_id=job_id, force=force)
        await self._unary("DeleteJob", request, pb.DeleteJobResponse, timeout_s=timeout_s)

    async def prune(self, *, older_than_s: float | None, all_jobs: bool) -> list[str]:
        request = pb.PruneJobsRequest(all=all_jobs)
        if older_than_s is not None:
            request.older_than.CopyFrom(duration_to_proto(older_than_s))
        reply = await self._unary("PruneJobs", request, pb.PruneJobsResponse)
        return list(reply.job_ids)

    async def logs(
        self,
        job_id: str,
        on_chunk: Callable[[pb.GetJobLogsResponse], None],
        *,
        follow: bool,
        tail_lines: int = 0,
        since_ns: int | None = None,
        streams: tuple[pb.LogStream.ValueType, ...] = (),
    ) -> None:
        """Hand the job's output chunks to `on_chunk`, in order, until the server ends the
        stream (no deadline: following lasts as long as the job). `tail_lines`, `since_ns`
        (ns since the epoch) and `streams` narrow it as GetJobLogsRequest says."""
        request = pb.GetJobLogsRequest(
            job_id=job_id, follow=follow, tail_lines=tail_lines, streams=streams
        )
        if since_ns is not None:
            request.since_time.FromNanoseconds(since_ns)
        try:
            async with self._channel.server_stream(
                f"{SERVICE}/GetJobLogs", request, pb.GetJobLogsResponse
            ) as chunks:
                async for chunk in chunks:
                    on_chunk(chunk)
        except GrpcError as exc:
            raise rpc_failure(exc, self.server) from None

    async def write_input(self, job_id: str, read: Callable[[], Awaitable[bytes]]) -> int:
        """Stream what `read` returns into the job's stdin until it returns b"" (our EOF,
        which the server passes on), and return how many bytes the job was given. No
        deadline: input lasts as long as its source. `send` waits on HTTP/2 flow control, so
        a job that does not read holds `read` back, a window behind."""
        try:
            async with self._channel.client_stream(
                f"{SERVICE}/WriteJobInput", pb.WriteJobInputResponse
            ) as call:
                await call.send(pb.WriteJobInputRequest(job_id=job_id))
                while data := await read():
                    await call.send(pb.WriteJobInputRequest(data=data))
                return (await call.response()).bytes_written
        except GrpcError as exc:
            raise rpc_failure(exc, self.server) from None

    async def _unary(
        self, method, request, response_type, *, timeout_s: float | None = CALL_TIMEOUT_S
    ):
        try:
            return await self._channel.unary(
                f"{SERVICE}/{method}", request, response_type, timeout_s=timeout_s
            )
        except GrpcError as exc:
            raise rpc_failure(exc, self.server) from None


def rpc_failure(exc: GrpcError, server: str) -> CliError:
    """The one line and exit code for a failed call: 2 when the connection or the certificate
    is the problem, or the request itself (INVALID_ARGUMENT, OUT_OF_RANGE: a malformed id, a
    limit out of range — usage errors, whichever side finds them); 1 for the server's other
    answers."""
    message = exc.message or exc.status.name.lower().replace("_", " ")
    if exc.status is Status.UNAVAILABLE:
        cause = exc.__cause__
        if isinstance(cause, TLSCertificateRejected) and cause.by_peer:
            # TLS 1.3: a refused client certificate shows on the first read, as the cause of
            # the call's UNAVAILABLE ("certificate not accepted by server: unknown ca").
            return CliError(str(cause), EXIT_USAGE)
        return CliError(f"server {server} unavailable: {message}", EXIT_USAGE)
    if exc.status is Status.UNAUTHENTICATED:
        return CliError(f"certificate not accepted by server: {message}", EXIT_USAGE)
    if exc.status is Status.DEADLINE_EXCEEDED:
        return CliError(f"no answer from {server} in time ({message})", EXIT_USAGE)
    if exc.status in (Status.INVALID_ARGUMENT, Status.OUT_OF_RANGE):
        return CliError(message, EXIT_USAGE, answered=True)
    return CliError(message, EXIT_RPC, answered=True)
