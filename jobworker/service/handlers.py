"""The JobService handlers: identity in, authorization, the supervisor and the store, statuses out.

Each handler takes the caller's `Identity` (built once per connection by `identify`), checks
the request, asks `authz.authorize` before touching a job, and calls the supervisor. Domain
errors are raised as they are: the transport turns them into statuses through the service's one
table (`errors.as_grpc_error`, the server's `errors` hook). Events go to the
``jobworker.events`` logger.

Looking a job up is always: validate the id → find it (NOT_FOUND) → authorize (HIDE becomes
the very same NOT_FOUND) → act. So a caller learns nothing about jobs it may not see, not even
whether an id is in use.

Fairness: no identity may take what the others need. Running jobs and open GetJobLogs
streams are each capped twice, in all and per identity (`_Holdings`); the per-identity caps
apply to admins too, since they protect the other users, not the server. A job counts from
the moment StartJob admits it until it has ended (or StartJob failed), a log stream while
its handler runs.

Where jobs live: a running job (and one that ended a moment ago) in the Supervisor, every job
in the store (store.py). The record is written before the job starts — a job the store cannot
record does not start — and again when it starts, when a stop is asked for and when it ends;
then the Supervisor forgets it, and the store alone answers for it: memory holds running jobs
only, however many ended ones a server keeps.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from jobworker.purgatory import RequestStream, RpcMethod, ServerCall
from jobworker.supervisor import (
    CgroupError,
    Job,
    JobEnded,
    JobNotEnded,
    JobNotFound,
    JobStatus,
    LimitPolicy,
    Supervisor,
    signal_name,
)
from jobworker.v1 import jobworker_pb2 as pb

from . import convert, logs, references
from .authz import Action, Decision, authorize
from .errors import (
    InvalidRequest,
    JobNameTaken,
    NoSuchJob,
    PermissionDenied,
    ShuttingDown,
    StdinUnavailable,
    TooManyJobs,
    TooManyLogStreams,
    Unavailable,
)
from .events import caller, events, exit_cause, fields
from .health import Health
from .identity import AllowList, Identity, identify, refuse_unlisted
from .policy import JobPolicy, Retention, check_caps
from .store import JobStore, NameInUse, Query, Record, StoreUnavailable

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("jobworker.service")

SERVICE_NAME = "jobworker.v1.JobService"
# Output bytes per GetJobLogsResponse message at most. A stream whose reader stalls (a zero
# window) holds one chunk, and one identity may hold hundreds of such streams: that bound is
# what a network peer can pin, so it wins over throughput. 256 KiB chunks cost a quarter less
# CPU per GB at each end, and four times the memory a stalled stream holds.
LOG_CHUNK_BYTES = 64 * 2**10
SHUTDOWN_REQUESTER = "server shutdown"
# How long a job started with open_stdin waits for a WriteJobInput to take its stdin: a client
# starts writing right after its StartJob, so a minute is for a client that died in between.
STDIN_CLAIM_TIMEOUT_S = 60.0
# How often retention and the output budget are enforced: after jobs end, but no more than
# once per JANITOR_SPACING_S, and every JANITOR_INTERVAL_S whatever happens.
JANITOR_INTERVAL_S = 60.0
JANITOR_SPACING_S = 1.0
# Records per store transaction when many jobs go at once (retention catching up, a prune),
# and per query of the oldest output.
_BATCH = 500

_WHAT = {
    Action.START: "start jobs",
    Action.STOP: "stop jobs",
    Action.SIGNAL: "signal jobs",
    Action.READ_STATUS: "read the status of this job",
    Action.READ_LOGS: "read the logs of this job",
    Action.LIST: "list every job (that needs the viewer or admin role)",
    Action.DELETE: "remove jobs",
    Action.WRITE_INPUT: "write the stdin of jobs",
}


class _Holdings:
    """How many of one thing (running jobs, open log streams) are held, in all and by each
    identity, under a cap on each. `take` and `give_back` never checkpoint, so a check and
    its count cannot be split by another task: concurrent calls count each other."""

    def __init__(
        self, cap: int | None, cap_per_user: int | None, refuse: Callable[..., Exception]
    ) -> None:
        self.cap = cap
        self.cap_per_user = cap_per_user
        self._refuse = refuse  # (limit, *, per_user) -> the error that says which cap
        self.total = 0
        # Only identities holding some: it never grows with every name ever seen.
        self._by_name: dict[str, int] = {}

    def of(self, name: str) -> int:
        return self._by_name.get(name, 0)

    def take(self, name: str) -> None:
        """Count one more for `name`, or raise the refusal naming the cap it would pass. The
        per-user cap is checked first: a caller at its own cap is told so, not that the
        server is busy."""
        if self.cap_per_user is not None and self.of(name) >= self.cap_per_user:
            raise self._refuse(self.cap_per_user, per_user=True)
        if self.cap is not None and self.total >= self.cap:
            raise self._refuse(self.cap, per_user=False)
        self.total += 1
        self._by_name[name] = self.of(name) + 1

    def give_back(self, name: str) -> None:
        held = self._by_name.pop(name)
        if held > 1:
            self._by_name[name] = held - 1
        self.total -= 1


class JobService:
    """JobService and Health over one Supervisor and one store. Made by `open_job_service`."""

    def __init__(
        self,
        supervisor: Supervisor,
        nursery: trio.Nursery,
        *,
        store: JobStore,
        run_id: int,
        max_running_jobs: int | None,
        max_grace_period_s: float,
        max_running_jobs_per_user: int | None = None,
        max_log_streams: int | None = None,
        max_log_streams_per_user: int | None = None,
        policy: JobPolicy | None = None,
        retention: Retention | None = None,
        allowed: AllowList | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._metrics = metrics
        self._nursery = nursery
        self._store = store
        self._run_id = run_id
        self._max_grace_period_s = max_grace_period_s
        self._policy = policy or JobPolicy()
        self._retention = retention or Retention()
        self._allowed = allowed  # None: every verified certificate
        # Seconds since the epoch: when the store saw each job end, and what retention
        # compares that with (tests pass their own).
        self._clock = clock
        # Jobs started here that have not ended yet (or are being started), by owner.
        self._jobs = _Holdings(max_running_jobs, max_running_jobs_per_user, TooManyJobs)
        self._log_streams = _Holdings(max_log_streams, max_log_streams_per_user, TooManyLogStreams)
        self._closing = False
        self._tidy = trio.Event()  # set when a job ended: retention and budget are due
        self._recording: dict[str, trio.Event] = {}  # running jobs: set once the end is stored
        # Jobs recorded but not yet handed to the Supervisor: set once they are (or never
        # will be). A reference may find such a record before its job exists.
        self._starting: dict[str, trio.Event] = {}
        # Jobs whose stdin a WriteJobInput has taken (until they end): one writer, once.
        self._stdin_taken: set[str] = set()
        self.health = Health([SERVICE_NAME])

    # --- what the server uses ------------------------------------------------------------------

    def methods(self) -> list[RpcMethod]:
        """JobService's methods and grpc.health.v1.Health's, for `Server(methods)`."""

        def rpc(name: str, request: Any, response: Any, handler: Any, **kw: Any) -> RpcMethod:
            return RpcMethod(f"/{SERVICE_NAME}/{name}", request, response, handler, **kw)

        return [
            rpc("StartJob", pb.StartJobRequest, pb.StartJobResponse, self.start_job),
            rpc("StopJob", pb.StopJobRequest, pb.StopJobResponse, self.stop_job),
            rpc(
                "GetJobStatus",
                pb.GetJobStatusRequest,
                pb.GetJobStatusResponse,
                self.get_job_status,
            ),
            rpc(
                "GetJobLogs",
                pb.GetJobLogsRequest,
                pb.GetJobLogsResponse,
                self.get_job_logs,
                server_streaming=True,
            ),
            rpc("WaitJob", pb.WaitJobRequest, pb.WaitJobResponse, self.wait_job),
            rpc("SignalJob", pb.SignalJobRequest, pb.SignalJobResponse, self.signal_job),
            rpc("ListJobs", pb.ListJobsRequest, pb.ListJobsResponse, self.list_jobs),
            rpc("DeleteJob", pb.DeleteJobRequest, pb.DeleteJobResponse, self.delete_job),
            rpc("PruneJobs", pb.PruneJobsRequest, pb.PruneJobsResponse, self.prune_jobs),
            rpc(
                "WriteJobInput",
                pb.WriteJobInputRequest,
                pb.WriteJobInputResponse,
                self.write_job_input,
                client_streaming=True,
            ),
            *self.behind_allow_list(self.health.methods()),
        ]

    def behind_allow_list(self, methods: list[RpcMethod]) -> list[RpcMethod]:
        """Another service's methods (Health; reflection, which `jobworker serve` adds) behind
        this service's allow-list: who is not on it may not call anything here, not even ask
        which services there are."""

        def guarded(handler: Callable[[Any, ServerCall], Any]) -> Callable[..., Any]:
            async def guard(request_or_requests: Any, call: ServerCall) -> Any:
                self._caller(call)
                return await handler(request_or_requests, call)

            return guard

        return [dataclasses.replace(m, handler=guarded(m.handler)) for m in methods]

    def reconfigure(
        self,
        *,
        limits: LimitPolicy,
        grace_period_s: float,
        retention_bytes: int,
        max_running_jobs: int | None,
        max_running_jobs_per_user: int | None,
        max_log_streams: int | None,
        max_log_streams_per_user: int | None,
        policy: JobPolicy,
        retention: Retention,
        allowed: AllowList | None,
    ) -> None:
        """Take new settings (a reload of the configuration) for every call from now on.

        Everything is checked before anything changes, and nothing here checkpoints: no call
        ever sees half of the old settings and half of the new. What is running keeps what it
        was given: a job keeps its limits, a log stream stays open, holdings above a lowered
        cap stay (new ones are refused until they fall below it). ValueError: nothing changed.
        """
        check_caps(
            max_running_jobs=max_running_jobs,
            max_running_jobs_per_user=max_running_jobs_per_user,
            max_log_streams=max_log_streams,
            max_log_streams_per_user=max_log_streams_per_user,
        )
        if policy.needs_isolation and self._supervisor.isolation is None:
            raise ValueError(
                "run-as accounts and network none need isolated jobs, and this server does not"
                " isolate them (a restart with isolation on would)"
            )
        if retention_bytes < 1 or not 0 <= grace_period_s < math.inf:
            raise ValueError(
                f"retention_bytes must be positive ({retention_bytes}) and grace_period_s finite"
                f" and not negative ({grace_period_s})"
            )
        self._supervisor.policy = limits
        self._supervisor.grace_period_s = grace_period_s
        self._supervisor.retention_bytes = retention_bytes
        self._jobs.cap, self._jobs.cap_per_user = max_running_jobs, max_running_jobs_per_user
        self._log_streams.cap = max_log_streams
        self._log_streams.cap_per_user = max_log_streams_per_user
        self._policy = policy
        if retention != self._retention:
            self._retention = retention
            self._tidy.set()  # a shorter retention applies now, not at the next job's end
        self._allowed = allowed

    def set_serving(self, serving: bool) -> None:
        """What the health service reports: SERVING (True) or NOT_SERVING (False)."""
        self.health.set_serving(serving)

    @property
    def running_jobs(self) -> int:
        """Jobs started through this service that have not ended (what max_running_jobs caps)."""
        return self._jobs.total

    def running_jobs_of(self, identity: str) -> int:
        """Those of them `identity` started (what max_running_jobs_per_user caps)."""
        return self._jobs.of(identity)

    @property
    def log_streams(self) -> int:
        """GetJobLogs calls being served now (what max_log_streams caps)."""
        return self._log_streams.total

    def log_streams_of(self, identity: str) -> int:
        """Those of them `identity` made (what max_log_streams_per_user caps)."""
        return self._log_streams.of(identity)

    # --- handlers --------------------------------------------------------------------------------

    async def start_job(self, request: pb.StartJobRequest, call: ServerCall) -> pb.StartJobResponse:
        who = self._caller(call)
        self._authorize(who, Action.START, is_owner=True, job_id=None)
        # The settings this start goes by, taken once: a reload (SIGHUP) while it awaits below
        # must not give it the old defaults and the new run-as mapping, say.
        policy, limit_policy = self._policy, self._supervisor.policy
        limits = convert.overrides_of(request, limit_policy)
        if self._supervisor.cgroups != "off":  # without cgroups, any limit is refused below
            limits = limit_policy.resolve(limits)
        env = convert.env_of(request)
        cwd = convert.working_dir_of(request)
        name = convert.name_of(request)
        network = convert.network_of(request) or policy.network
        if network == "host" and not policy.allow_host_network:
            raise PermissionDenied(
                "this server does not let jobs use the host's network: ask for network none"
            )
        if self._closing:
            raise ShuttingDown("the server is shutting down and starts no more jobs")
        self._jobs.take(who.name)  # before the first checkpoint: concurrent starts count
        job_id = str(uuid.uuid4())
        starting = self._starting[job_id] = trio.Event()
        try:
            # The record first: a job the server could not account for must not run. It also
            # takes the name: of two starts with one name, the store lets one insert through.
            created = pb.JobStatus(
                job_id=job_id,
                owner=who.name,
                command=request.command,
                args=request.args,
                state=pb.JOB_STATE_RUNNING,
                create_time=convert.timestamp_to_proto(datetime.now(UTC)),
                name=name,
            )
            try:
                await self._store.insert(self._record(created))
            except NameInUse as exc:
                holder = exc.holder
                state = convert.state_from_proto(holder.state).value
                raise JobNameTaken(name, holder.job_id, state) from None
            except StoreUnavailable as exc:
                log.error("cannot record a new job, so it is not started: %s", exc)
                raise Unavailable(
                    "the server cannot record the job (its data directory refuses writes), so "
                    "it does not start it; try again later"
                ) from None
            try:
                job = await self._supervisor.start(
                    request.command,
                    list(request.args),
                    owner=who.name,
                    limits=limits,
                    env=env,
                    cwd=cwd,
                    user=policy.account_for(who.name),
                    network=network,
                    job_id=job_id,
                    name=name,
                    stdin=subprocess.PIPE if request.open_stdin else None,
                )
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._forget_record(job_id)
                if isinstance(exc, OSError):  # its output or working directory: a full disk
                    log.error("cannot prepare a new job, so it is not started: %s", exc)
                    raise Unavailable(
                        "the server cannot write the job's files (its data directory refuses "
                        f"writes: {exc.strerror}), so it does not start it; try again later"
                    ) from None
                raise
        except BaseException:
            self._jobs.give_back(who.name)
            raise
        finally:
            del self._starting[job_id]
            starting.set()
        status = job.status()
        events.info(
            "job created %s",
            fields(
                job=job.id,
                owner=who.name,
                roles=who.role_names,
                command=status.command_line,
                name=status.name or None,
                limits=status.limits.describe() if status.limits else "none (cgroups off)",
                run_as=status.run_as.describe() if status.run_as else None,
                network=status.network if status.namespaces else None,
                state=status.state.value,
                error=status.error,
            ),
        )
        if self._metrics is not None:
            self._metrics.job_started(job)
        self._recording[job.id] = trio.Event()
        self._nursery.start_soon(self._watch, job)  # no checkpoint since start: never orphaned
        if job.stdin is not None:
            self._nursery.start_soon(self._close_stdin_nobody_takes, job)
        return pb.StartJobResponse(job_id=job.id, status=convert.status_to_proto(status))

    async def stop_job(self, request: pb.StopJobRequest, call: ServerCall) -> pb.StopJobResponse:
        """Idempotent (docker stop): a job that has already ended — or whose processes are
        already gone, its end being recorded — is answered with its status and
        already_ended, having signalled nothing."""
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        grace_s = convert.grace_period_of(request, self._max_grace_period_s)
        job = await self._find(who, Action.STOP, job_id)
        if isinstance(job, Record):
            return pb.StopJobResponse(status=_status_of(job), already_ended=True)
        try:
            job.request_stop(grace_s, requested_by=who.name)
        except JobEnded:
            status = await job.wait()
            return pb.StopJobResponse(status=convert.status_to_proto(status), already_ended=True)
        events.info(
            "stop requested %s",
            fields(job=job.id, owner=job.owner, by=who.name, roles=who.role_names, grace_s=grace_s),
        )
        await self._save(job.status())
        status = await job.wait()
        return pb.StopJobResponse(status=convert.status_to_proto(status))

    async def get_job_status(
        self, request: pb.GetJobStatusRequest, call: ServerCall
    ) -> pb.GetJobStatusResponse:
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        job = await self._find(who, Action.READ_STATUS, job_id)
        if isinstance(job, Record):
            return pb.GetJobStatusResponse(status=_status_of(job))
        return pb.GetJobStatusResponse(status=convert.status_to_proto(job.status()))

    async def wait_job(self, request: pb.WaitJobRequest, call: ServerCall) -> pb.WaitJobResponse:
        """The job's final status once it has ended (at once for one that has). The call's
        deadline, or the client going away, cancels the wait and nothing else: the handler
        waits on the job's own end event and starts no task."""
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        job = await self._find(who, Action.READ_STATUS, job_id)
        if isinstance(job, Record):
            return pb.WaitJobResponse(status=_status_of(job))
        status = await job.wait()
        return pb.WaitJobResponse(status=convert.status_to_proto(status))

    async def signal_job(
        self, request: pb.SignalJobRequest, call: ServerCall
    ) -> pb.SignalJobResponse:
        """One signal to every process of a running job (`Job.signal`): no escalation, and
        no stop recorded. A job it kills ends as killed by that signal (FAILED, exit code
        128+N, no stop_requested_by): the event log says who sent it."""
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        signum = convert.signal_of(request)
        job = await self._find(who, Action.SIGNAL, job_id)
        if isinstance(job, Record):
            raise JobEnded(job.job_id, convert.state_from_proto(job.state).value)
        try:
            job.signal(signum)
        except CgroupError as exc:
            log.error("job %s: %s", job.id, exc)
            raise Unavailable("the server could not signal the job's processes") from None
        events.info(
            "signal sent %s",
            fields(
                job=job.id,
                owner=job.owner,
                by=who.name,
                roles=who.role_names,
                signal=signal_name(signum),
            ),
        )
        return pb.SignalJobResponse()

    async def write_job_input(
        self, requests: RequestStream[pb.WriteJobInputRequest], call: ServerCall
    ) -> pb.WriteJobInputResponse:
        """The client's stream into the job's stdin (`jobctl run -i`), then EOF.

        Backpressure is end to end with nothing buffered here: a message is taken from the
        stream (and its window given back to the client) only once the previous one is in the
        pipe, and the pipe fills only as fast as the job reads. However the stream ends — the
        client half-closing, its cancellation, a bad message — the job's stdin is closed, so
        a job can never be left waiting for input nobody will send. One writer per job, once:
        a second could only interleave its bytes with the first's."""
        who = self._caller(call)
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidRequest("the stream is empty: its first message must name the job")
        job_id = convert.job_id_of(first.job_id)
        job = await self._find(who, Action.WRITE_INPUT, job_id)
        if isinstance(job, Record):
            raise JobEnded(job.job_id, convert.state_from_proto(job.state).value)
        stdin = job.stdin
        if stdin is None:
            raise StdinUnavailable(
                f"job {job.id} was not started with open_stdin (`jobctl run -i`): its stdin is"
                " /dev/null"
            )
        if job.id in self._stdin_taken:
            raise StdinUnavailable(
                f"job {job.id}'s stdin has been written already, or closed for want of a"
                " writer (one writer, once: its end is the job's EOF)"
            )
        self._stdin_taken.add(job.id)
        written = 0
        try:
            message: pb.WriteJobInputRequest | None = first
            while message is not None:
                if message is not first and message.job_id:
                    raise InvalidRequest("job_id belongs in the first message only")
                if message.data:
                    try:
                        await stdin.send_all(message.data)
                    except trio.BrokenResourceError as exc:
                        raise StdinUnavailable(f"{exc}; it took {written} bytes") from None
                    written += len(message.data)
                message = await anext(requests, None)
        finally:
            stdin.close_nowait()  # EOF, whichever way the stream ended; no await: may be cancelled
            events.debug("stdin closed %s", fields(job=job.id, by=who.name, bytes=written))
        return pb.WriteJobInputResponse(bytes_written=written)

    async def _close_stdin_nobody_takes(self, job: Job) -> None:
        """A job started with open_stdin whose client never came to write it (it died between
        its StartJob and its WriteJobInput, or that call was refused) would wait for input
        forever, holding its slot: after STDIN_CLAIM_TIMEOUT_S its stdin is closed (EOF)."""
        with trio.move_on_after(STDIN_CLAIM_TIMEOUT_S):
            await job.wait()
            return
        if job.id in self._stdin_taken or job.status().state.ended:
            return
        self._stdin_taken.add(job.id)  # nobody may write it from now on
        assert job.stdin is not None
        job.stdin.close_nowait()
        events.info(
            "stdin closed %s",
            fields(job=job.id, owner=job.owner, reason="no WriteJobInput came to write it"),
        )

    async def get_job_logs(self, request: pb.GetJobLogsRequest, call: ServerCall) -> None:
        """History from `offset`, then (with follow) live output until the job has ended,
        narrowed by `streams`, `since` and `tail_lines` (service/logs.py; INVALID_ARGUMENT for
        a stream or a time that is not one).

        Output that retention removed before the reader got to it — before `offset`, or from
        under a slow follower mid-stream, or all of an ended job's whose output the budget
        removed — is one chunk with `dropped` set (how many bytes), and the stream goes on from
        the first byte still kept: never an error. An offset beyond the end is not an error
        either: offsets are positions in a log that grows, so without follow the stream is
        empty, with follow it begins once the output reaches that offset (and is empty if the
        job ends first) — `tail -c +N -f`.
        """
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        selection = logs.selection_of(request)
        self._log_streams.take(who.name)
        try:
            await self._send_logs(who, job_id, request, selection, call)
        finally:
            self._log_streams.give_back(who.name)

    async def _send_logs(
        self,
        who: Identity,
        job_id: str,
        request: pb.GetJobLogsRequest,
        selection: logs.LogSelection,
        call: ServerCall,
    ) -> None:
        job = await self._find(who, Action.READ_LOGS, job_id)
        if isinstance(job, Record):
            try:
                stored = await trio.to_thread.run_sync(self._supervisor.stored_output, job.id)
            except FileNotFoundError:
                # Removed by the output budget: everything before its end is dropped.
                for chunk in logs.all_dropped(request.offset, job.output_end):
                    await call.send_serialized(convert.chunk_to_proto(chunk).SerializeToString())
                return
            reader = stored.reader(request.offset, max_chunk_bytes=LOG_CHUNK_BYTES)
        else:
            reader = job.output(
                request.offset, follow=request.follow, max_chunk_bytes=LOG_CHUNK_BYTES
            )
        async for chunk in selection.apply(reader):
            # Only the serialized bytes stay alive while a slow client holds the stream back:
            # a stalled reader costs one chunk of memory, not the chunk plus its message.
            payload = convert.chunk_to_proto(chunk).SerializeToString()
            size = len(chunk.data)
            del chunk
            await call.send_serialized(payload)  # waits while the client is slow
            if self._metrics is not None:
                self._metrics.output_streamed(size)

    async def list_jobs(self, request: pb.ListJobsRequest, call: ServerCall) -> pb.ListJobsResponse:
        who = self._caller(call)
        if request.owner and not request.all:
            raise InvalidRequest("owner filters every user's jobs: set all as well")
        self._authorize(who, Action.LIST, is_owner=not request.all, job_id=None)
        query = Query(
            owner=(request.owner or None) if request.all else who.name,
            states=convert.states_of(request),
            created_after=convert.created_after_of(request),
            newest_first=convert.newest_first_of(request),
        )
        after = _token_seq(request.page_token, query)
        records, more = await self._store.page(
            query, after_seq=after, limit=convert.page_size_of(request)
        )
        jobs = []
        for record in records:
            job = self._live(record.job_id)
            jobs.append(convert.status_to_proto(job.status()) if job else _status_of(record))
        token = _token(more, query) if more is not None else ""
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def delete_job(
        self, request: pb.DeleteJobRequest, call: ServerCall
    ) -> pb.DeleteJobResponse:
        who = self._caller(call)
        job_id = convert.job_id_of(request.job_id)
        job = await self._find(who, Action.DELETE, job_id)
        if isinstance(job, Job) and not job.status().state.ended:
            if not request.force:
                raise JobNotEnded(job.id)
            events.info(
                "stop requested %s",
                fields(job=job.id, owner=job.owner, by=who.name, roles=who.role_names),
            )
            try:
                await self._stop(job, None, requested_by=who.name)
            except JobEnded:
                pass  # ended meanwhile
        await self._delete([job.id], who)
        return pb.DeleteJobResponse()

    async def prune_jobs(
        self, request: pb.PruneJobsRequest, call: ServerCall
    ) -> pb.PruneJobsResponse:
        who = self._caller(call)
        self._authorize(who, Action.DELETE, is_owner=not request.all, job_id=None)
        older_than_s = convert.older_than_of(request)
        records = await self._store.expired(
            ended_before=self._clock() - older_than_s,
            keep=None,
            owner=None if request.all else who.name,
        )
        ids = [r.job_id for r in records if self._releasable(r.job_id)]
        await self._delete(ids, who)
        return pb.PruneJobsResponse(job_ids=ids)

    # --- lookups ---------------------------------------------------------------------------------

    def _live(self, job_id: str) -> Job | None:
        try:
            return self._supervisor.get(job_id)
        except JobNotFound:
            return None

    def _releasable(self, job_id: str) -> bool:
        job = self._live(job_id)
        return job is None or job.status().state.ended

    async def _find(self, who: Identity, action: Action, reference: str) -> Job | Record:
        """The job `reference` names — its id, its name or a unique prefix of its id
        (references.py) — if `who` may do `action` to it: the Job while the Supervisor holds
        it (running, or ended a moment ago), else its record. Use the result's ``id``, never
        the reference, from then on.

        A full id is looked up anywhere, then authorized: another user's job hidden from
        `who` is NOT_FOUND in the very words of an unknown id. A name or prefix is looked for
        only among the jobs `who` may see at all, so what it finds or fails to find (or lists
        as ambiguous) never involves a job hidden from it.
        """
        ref = references.parse(reference)
        found: Job | Record | None
        if ref.job_id is not None:
            found = self._live(ref.job_id) or await self._store.get(ref.job_id)
            if found is None:
                raise JobNotFound(ref.job_id)
        else:
            everyone = authorize(who.roles, action, is_owner=False) is not Decision.HIDE
            named, prefixed = await self._store.candidates(
                name=ref.name,
                prefix=ref.prefix,
                owner=None if everyone else who.name,
                me=who.name,
                limit=references.SHOWN_CANDIDATES + 1,
            )
            record = references.choose(ref, named, prefixed, who.name)
            found = self._live(record.job_id) or record
        self._authorize(who, action, is_owner=found.owner == who.name, job_id=found.id)
        starting = self._starting.get(found.id)
        if starting is not None:
            # Recorded, or in the Supervisor, but its process not started yet (a name or prefix
            # can find it then): nothing could be stopped or signalled. Answer for it once
            # StartJob has started it, or failed to.
            await starting.wait()
            found = self._live(found.id) or await self._store.get(found.id)
            if found is None:  # it could not be started: nothing is left of it
                if ref.job_id is not None:
                    raise JobNotFound(ref.job_id)
                raise NoSuchJob(references.not_found(ref))
        return found

    def _caller(self, call: ServerCall) -> Identity:
        """Who calls, if the allow-list admits them. Checked on every call, not once per
        connection: a reload that takes someone off the list holds on connections already open.
        """
        identity = call.identity
        if not isinstance(identity, Identity):
            # A Server made without identify=identify: identify each call instead of trusting
            # nothing.
            identity = identify(call.peer_certificate)
        caller.set(identity.name)  # this call's task only: its later log lines name it
        allowed = self._allowed
        if allowed is not None and not allowed.admits(call.peer_certificate, identity):
            raise refuse_unlisted(identity, call.peer_certificate, call.connection.peer_address)
        return identity

    def _authorize(
        self, who: Identity, action: Action, *, is_owner: bool, job_id: str | None
    ) -> None:
        decision = authorize(who.roles, action, is_owner)
        if decision is Decision.ALLOW:
            return
        # Hiding is about one job's existence; an action on every user's jobs (prune --all)
        # names none, so the caller is told plainly that its role does not allow it.
        hidden = decision is Decision.HIDE and job_id is not None
        events.warning(
            "authorization failure %s",
            fields(
                identity=who.name,
                roles=who.role_names,
                action=action.value,
                job=job_id,
                answer="not found" if hidden else "permission denied",
            ),
        )
        if hidden:
            raise JobNotFound(job_id)  # word for word what an unknown id gets
        what = _WHAT[action]
        if decision is Decision.HIDE:
            what += " of other users (that needs the admin role)"
        raise PermissionDenied(f"{who.name} (role {who.role_names}) may not {what}")

    # --- records ---------------------------------------------------------------------------------

    def _record(self, message: pb.JobStatus, job: Job | None = None) -> Record:
        ended = message.state != pb.JOB_STATE_RUNNING
        return Record(
            job_id=message.job_id,
            owner=message.owner,
            state=message.state,
            created_at=convert.timestamp_from_proto(message.create_time).timestamp(),
            status=message.SerializeToString(),
            ended_at=self._clock() if ended else None,
            output_bytes=job.output_stored_bytes if job else 0,
            output_end=job.output_end if job else 0,
            run_id=self._run_id,
            name=message.name,
        )

    async def _stop(self, job: Job, grace_s: float | None, *, requested_by: str) -> JobStatus:
        """Request the stop, record the request, wait for the end."""
        job.request_stop(grace_s, requested_by=requested_by)
        await self._save(job.status())
        return await job.wait()

    async def _save(self, status: JobStatus) -> bool:
        """Write what the job is now; False (logged) when the store refuses."""
        job = self._live(status.id)
        try:
            await self._store.update(self._record(convert.status_to_proto(status), job))
        except StoreUnavailable as exc:
            log.error("job %s: cannot record its status: %s", status.id, exc)
            return False
        return True

    async def _forget_record(self, job_id: str) -> None:
        try:
            await self._store.delete([job_id])
        except StoreUnavailable as exc:
            log.error("job %s: cannot remove its record: %s", job_id, exc)

    async def _delete(self, job_ids: list[str], who: Identity) -> None:
        for start in range(0, len(job_ids), _BATCH):
            batch = job_ids[start : start + _BATCH]
            await self._store.delete(batch)
            for job_id in batch:
                if self._live(job_id) is not None:
                    self._supervisor.forget(job_id)
                await trio.to_thread.run_sync(self._supervisor.remove_output, job_id)
                events.info("job removed %s", fields(job=job_id, by=who.name))

    async def recorded(self, job_id: str) -> None:
        """Return once the end of a job started here is in the store (at once for a job that
        is not running here)."""
        recording = self._recording.get(job_id)
        if recording is not None:
            await recording.wait()

    async def _watch(self, job: Job) -> None:
        try:
            await self._record_end(job)
        finally:
            self._recording.pop(job.id).set()
            self._stdin_taken.discard(job.id)

    async def _record_end(self, job: Job) -> None:
        try:
            # Its start (pid, time), off StartJob's path: the record written before it started
            # already accounts for it, should the server die right now.
            await self._save(job.status())
            status = await job.wait()
            if self._metrics is not None:
                self._metrics.job_ended(job, status)
        finally:
            self._jobs.give_back(job.owner)
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
        if await self._save(status) and self._live(job.id) is not None:
            # Recorded: the store answers for it from now on, and memory holds nothing of it.
            # (A DeleteJob may have removed it meanwhile: then there is nothing to forget.)
            self._supervisor.forget(job.id)
        self._tidy.set()

    # --- retention and the output budget -----------------------------------------------------

    async def run_janitor(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Enforce retention and the output budget now, after jobs end (at most once every
        JANITOR_SPACING_S), and every JANITOR_INTERVAL_S. Runs until cancelled."""
        task_status.started()
        while True:
            try:
                await self.tidy()
            except StoreUnavailable as exc:
                log.error("retention: %s", exc)
            # Ends come in bursts: one pass answers for all the ends of its second, and leaves
            # the store's single thread to the calls that clients are waiting on.
            await trio.sleep(JANITOR_SPACING_S)
            with trio.move_on_after(JANITOR_INTERVAL_S - JANITOR_SPACING_S):
                await self._tidy.wait()
            self._tidy = trio.Event()

    async def tidy(self) -> None:
        """Remove ended jobs past the retention time or count, then keep the output within
        the budget (see `Retention`)."""
        retention = self._retention
        expired = await self._store.expired(
            ended_before=self._clock() - retention.keep_s, keep=retention.keep_jobs
        )
        await self._delete([r.job_id for r in expired if self._releasable(r.job_id)], _RETENTION)
        await self._keep_output_within_budget()

    async def _keep_output_within_budget(self) -> None:
        budget = self._retention.output_budget_bytes
        running = [j for j in self._supervisor.jobs() if not j.status().state.ended]
        over = (
            await self._store.ended_output_bytes()
            + sum(j.output_stored_bytes for j in running)
            - budget
        )
        while over > 0:
            oldest = await self._store.oldest_output(_BATCH)
            if not oldest:
                break
            for record in oldest:
                if over <= 0:
                    break
                if not self._releasable(record.job_id):
                    continue
                await trio.to_thread.run_sync(self._supervisor.remove_output, record.job_id)
                await self._store.update(
                    dataclasses.replace(record, output_bytes=0, output_removed=True)
                )
                over -= record.output_bytes
                removed = fields(
                    job=record.job_id,
                    owner=record.owner,
                    bytes=record.output_bytes,
                    cause="output budget",
                )
                events.warning("output removed %s", removed)
        for job in sorted(running, key=lambda j: j.status().created_at):
            if over <= 0:
                break
            freed = job.trim_output(over)
            if freed:
                over -= freed
                events.warning(
                    "output dropped %s",
                    fields(job=job.id, owner=job.owner, bytes=freed, cause="output budget"),
                )

    # --- closing ---------------------------------------------------------------------------------

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
                await self._stop(job, grace_period_s, requested_by=requested_by)
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


_RETENTION = Identity("retention")


def _status_of(record: Record) -> pb.JobStatus:
    status = convert.stored_status(record.status)
    status.output_removed = record.output_removed
    return status


# --- page tokens: opaque to clients, bound to the query they were made for (AIP-158) ---------


def _query_key(query: Query) -> str:
    fields_ = [query.owner, query.states, query.created_after, query.newest_first]
    return hashlib.sha256(json.dumps(fields_).encode()).hexdigest()[:16]


def _token(after_seq: int, query: Query) -> str:
    raw = json.dumps({"after": after_seq, "query": _query_key(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _token_seq(token: str, query: Query) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw)
        after, key = decoded["after"], decoded["query"]
        if not isinstance(after, int) or not isinstance(key, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("page_token is not one this server gave out") from None
    if key != _query_key(query):
        raise InvalidRequest("page_token was made for a different query: keep the other fields")
    return after


__all__ = ["LOG_CHUNK_BYTES", "SERVICE_NAME", "JobService"]
