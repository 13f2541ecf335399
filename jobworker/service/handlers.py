"""The JobService handlers: identity in, authorization, the supervisor, conversions out.

Each handler takes the caller's `Identity` (built once per connection by `identify`), checks
the request, asks `authz.authorize` before touching a job, and calls the supervisor. Domain
errors leave through `errors.as_grpc_error`; events go to the ``jobworker.events`` logger.

Looking a job up is always: validate the id → find it (NOT_FOUND) → authorize (HIDE becomes
the very same NOT_FOUND) → act. So a caller learns nothing about jobs it may not see, not even
whether an id is in use.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from jobworker._pb.jobworker.v1 import jobworker_pb2 as pb
from jobworker.purgatory.server import RpcMethod, ServerCall
from jobworker.supervisor import Job, JobEnded, JobNotFound, Supervisor

from . import convert
from .authz import Action, Decision, authorize
from .errors import PermissionDenied, ShuttingDown, TooManyJobs, as_grpc_error
from .events import events, exit_cause, fields
from .health import Health
from .identity import Identity, identify
from .policy import JobPolicy

SERVICE_NAME = "jobworker.v1.JobService"
# Output chunks per LogChunk message: far below every client's 4 MiB message limit, large
# enough that a fast reader is not held back by per-message costs.
LOG_CHUNK_BYTES = 64 * 2**10
SHUTDOWN_REQUESTER = "server shutdown"

_WHAT = {
    Action.START: "start jobs",
    Action.STOP: "stop jobs",
    Action.READ_STATUS: "read the status of this job",
    Action.READ_LOGS: "read the logs of this job",
    Action.LIST: "list every job (that needs the viewer or admin role)",
}

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def _answers_errors(handler: H) -> H:
    """Domain errors raised by `handler` become their statuses (errors.STATUS_OF)."""

    @functools.wraps(handler)
    async def wrapper(self: JobService, request: Any, call: ServerCall) -> Any:
        try:
            return await handler(self, request, call)
        except Exception as exc:
            error = as_grpc_error(exc)
            if error is None:
                raise  # a bug: the transport logs it and answers INTERNAL
            raise error from None

    return wrapper  # type: ignore[return-value]


class JobService:
    """JobService and Health over one Supervisor. Made by `open_job_service`."""

    def __init__(
        self,
        supervisor: Supervisor,
        nursery: trio.Nursery,
        *,
        max_running_jobs: int | None,
        max_grace_period_s: float,
        policy: JobPolicy | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._nursery = nursery
        self._policy = policy or JobPolicy()
        self._max_running_jobs = max_running_jobs
        self._max_grace_period_s = max_grace_period_s
        self._active = 0  # jobs started here that have not ended yet (or are being started)
        self._closing = False
        self.health = Health([SERVICE_NAME])

    # --- what the server uses ------------------------------------------------------------------

    def methods(self) -> list[RpcMethod]:
        """JobService's methods and grpc.health.v1.Health's, for `Server(methods)`."""

        def rpc(name: str, request: Any, response: Any, handler: Any, **kw: Any) -> RpcMethod:
            return RpcMethod(f"/{SERVICE_NAME}/{name}", request, response, handler, **kw)

        return [
            rpc("StartJob", pb.StartJobRequest, pb.StartJobResponse, self.start_job),
            rpc("StopJob", pb.StopJobRequest, pb.StopJobResponse, self.stop_job),
            rpc("GetJobStatus", pb.GetJobStatusRequest, pb.JobStatus, self.get_job_status),
            rpc(
                "GetJobLogs",
                pb.GetJobLogsRequest,
                pb.LogChunk,
                self.get_job_logs,
                server_streaming=True,
            ),
            rpc("ListJobs", pb.ListJobsRequest, pb.ListJobsResponse, self.list_jobs),
            *self.health.methods(),
        ]

    def set_serving(self, serving: bool) -> None:
        """What the health service reports: SERVING (True) or NOT_SERVING (False)."""
        self.health.set_serving(serving)

    @property
    def running_jobs(self) -> int:
        """Jobs started through this service that have not ended (what max_running_jobs caps)."""
        return self._active

    # --- handlers --------------------------------------------------------------------------------

    @_answers_errors
    async def start_job(self, request: pb.StartJobRequest, call: ServerCall) -> pb.StartJobResponse:
        who = _caller(call)
        self._authorize(who, Action.START, is_owner=True, job_id=None)
        limits = convert.overrides_of(request)
        env = convert.env_of(request)
        cwd = convert.working_dir_of(request)
        network = convert.network_of(request) or self._policy.network
        if network == "host" and not self._policy.allow_host_network:
            raise PermissionDenied(
                "this server does not let jobs use the host's network: ask for network none"
            )
        if self._closing:
            raise ShuttingDown("the server is shutting down and starts no more jobs")
        if self._max_running_jobs is not None and self._active >= self._max_running_jobs:
            raise TooManyJobs(self._max_running_jobs)
        self._active += 1  # before the first checkpoint: concurrent starts count each other
        try:
            job = await self._supervisor.start(
                request.command,
                list(request.args),
                owner=who.name,
                limits=limits,
                env=env,
                cwd=cwd,
                user=self._policy.account_for(who.name),
                network=network,
            )
        except BaseException:
            self._active -= 1
            raise
        status = job.status()
        events.info(
            "job created %s",
            fields(
                job=job.id,
                owner=who.name,
                roles=who.role_names,
                command=status.command_line,
                limits=status.limits.describe() if status.limits else "none (cgroups off)",
                run_as=status.run_as.describe() if status.run_as else None,
                network=status.network if status.namespaces else None,
                state=status.state.value,
                error=status.error,
            ),
        )
        self._nursery.start_soon(self._watch, job)  # no checkpoint since start: never orphaned
        return pb.StartJobResponse(job_id=job.id)

    @_answers_errors
    async def stop_job(self, request: pb.StopJobRequest, call: ServerCall) -> pb.StopJobResponse:
        who = _caller(call)
        job = self._find(who, Action.STOP, request.job_id)
        grace_s = convert.grace_period_of(request, self._max_grace_period_s)
        state = job.status().state
        if state.ended:
            raise JobEnded(job.id, state.value)
        events.info(
            "stop requested %s",
            fields(job=job.id, owner=job.owner, by=who.name, roles=who.role_names, grace_s=grace_s),
        )
        status = await job.stop(grace_s, requested_by=who.name)
        return pb.StopJobResponse(status=convert.status_to_proto(status))

    @_answers_errors
    async def get_job_status(
        self, request: pb.GetJobStatusRequest, call: ServerCall
    ) -> pb.JobStatus:
        job = self._find(_caller(call), Action.READ_STATUS, request.job_id)
        return convert.status_to_proto(job.status())

    @_answers_errors
    async def get_job_logs(self, request: pb.GetJobLogsRequest, call: ServerCall) -> None:
        """History from `offset`, then (with follow) live output until the job has ended.

        An offset before what retention keeps: OUT_OF_RANGE naming the first retained offset
        (also in the ``jobworker-retained-start`` trailer); likewise when a slow follower falls
        behind retention mid-stream (it resumes from there with a new call). An offset beyond
        the end is not an error: offsets are positions in a log that grows, so without follow
        the stream is empty, with follow it begins once the output reaches that offset (and is
        empty if the job ends first) — `tail -c +N -f`.
        """
        job = self._find(_caller(call), Action.READ_LOGS, request.job_id)
        chunks = job.output(request.offset, follow=request.follow, max_chunk_bytes=LOG_CHUNK_BYTES)
        async for chunk in chunks:
            await call.send(convert.chunk_to_proto(chunk))  # waits while the client is slow

    @_answers_errors
    async def list_jobs(self, request: pb.ListJobsRequest, call: ServerCall) -> pb.ListJobsResponse:
        who = _caller(call)
        self._authorize(who, Action.LIST, is_owner=not request.all, job_id=None)
        jobs = self._supervisor.jobs() if request.all else self._supervisor.jobs(owner=who.name)
        return pb.ListJobsResponse(jobs=[convert.status_to_proto(job.status()) for job in jobs])

    # --- helpers ---------------------------------------------------------------------------------

    def _find(self, who: Identity, action: Action, job_id_text: str) -> Job:
        job_id = convert.job_id_of(job_id_text)
        job = self._supervisor.get(job_id)  # JobNotFound
        self._authorize(who, action, is_owner=job.owner == who.name, job_id=job_id)
        return job

    def _authorize(
        self, who: Identity, action: Action, *, is_owner: bool, job_id: str | None
    ) -> None:
        decision = authorize(who.roles, action, is_owner)
        if decision is Decision.ALLOW:
            return
        events.warning(
            "authorization failure %s",
            fields(
                identity=who.name,
                roles=who.role_names,
                action=action.value,
                job=job_id,
                answer="not found" if decision is Decision.HIDE else "permission denied",
            ),
        )
        if decision is Decision.HIDE:
            assert job_id is not None
            raise JobNotFound(job_id)  # word for word what an unknown id gets
        raise PermissionDenied(f"{who.name} (role {who.role_names}) may not {_WHAT[action]}")

    async def _watch(self, job: Job) -> None:
        try:
            status = await job.wait()
        finally:
            self._active -= 1
        events.info(
            "job ended %s",
            fields(
                job=status.id,
                owner=status.owner,
                state=status.state.value,
                exit_code=status.exit_code,
                signal=status.signal_name,
                cause=exit_cause(status),
                error=status.error,
            ),
        )

    async def stop_all_jobs(
        self, grace_period_s: float | None = None, *, requested_by: str = SHUTDOWN_REQUESTER
    ) -> None:
        """Stop every running job of the Supervisor at once (the usual escalation; None: its
        default grace period), logging each stop request; returns when all have ended."""

        async def stop(job: Job) -> None:
            if job.status().state.ended:
                return
            events.info(
                "stop requested %s",
                fields(job=job.id, owner=job.owner, by=requested_by, grace_s=grace_period_s),
            )
            try:
                await job.stop(grace_period_s, requested_by=requested_by)
            except JobEnded:
                pass  # ended meanwhile

        async with trio.open_nursery() as nursery:
            for job in self._supervisor.jobs():
                nursery.start_soon(stop, job)

    async def close(self) -> None:
        """Start nothing more (StartJob: UNAVAILABLE); say NOT_SERVING; stop every running
        job and wait for each end. A server calls it when its shutdown begins; calling it
        again (leaving `open_job_service` does) only waits for what is still running."""
        self._closing = True
        self.set_serving(False)
        await self.stop_all_jobs()


def _caller(call: ServerCall) -> Identity:
    identity = call.identity
    if isinstance(identity, Identity):
        return identity
    # A Server made without identify=identify: identify each call instead of trusting nothing.
    return identify(call.peer_certificate)
