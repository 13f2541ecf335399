"""`open_job_service`: the JobService over a Supervisor and a store, with a lifetime."""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

import trio

from jobworker.supervisor import Supervisor

from .convert import MAX_GRACE_PERIOD_S
from .handlers import JobService
from .identity import AllowList
from .metrics import Metrics
from .policy import (
    DEFAULT_MAX_LOG_STREAMS,
    JobPolicy,
    Retention,
    check_caps,
    per_user_share,
)
from .store import JobStore, open_store


@asynccontextmanager
async def open_job_service(
    supervisor: Supervisor,
    *,
    store: JobStore | None = None,
    max_running_jobs: int | None = None,
    max_running_jobs_per_user: int | Literal["half"] | None = "half",
    max_log_streams: int | None = DEFAULT_MAX_LOG_STREAMS,
    max_log_streams_per_user: int | Literal["half"] | None = "half",
    max_grace_period_s: float = MAX_GRACE_PERIOD_S,
    policy: JobPolicy | None = None,
    retention: Retention | None = None,
    allowed: AllowList | None = None,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
) -> AsyncIterator[JobService]:
    """The service, ready for `Server(service.methods(), identify=identify, ...)`.

        async with Supervisor(...) as supervisor:
            async with open_job_service(supervisor, max_running_jobs=100) as service:
                ...serve; on shutdown: service.set_serving(False), then server.shutdown(...)

    - store: where job records live (`open_store`); None: a store in memory, gone with the
      service (a server passes the one in its data directory, after `recover`).
    - max_running_jobs: StartJob answers RESOURCE_EXHAUSTED while this many jobs it started
      are running (None: no limit).
    - max_running_jobs_per_user: likewise while the caller's own jobs are this many, so one
      identity cannot take every slot; "half": half of max_running_jobs (None: no limit).
    - max_log_streams, max_log_streams_per_user: GetJobLogs answers RESOURCE_EXHAUSTED while
      this many streams are open, in all or from the caller ("half": half of the first).
    The per-user caps apply to every identity, admins included: they protect the others.
    - max_grace_period_s: the longest grace period StopJob accepts (INVALID_ARGUMENT above).
    - policy: the accounts identities' jobs run as, and their network (`JobPolicy`); mapping
      accounts or a network other than the host's needs a Supervisor that isolates jobs.
    - retention: how long ended jobs are kept, and the output budget (`Retention`).
    - allowed: the certificates that may call at all, by CN or SAN (`AllowList`); others get
      PERMISSION_DENIED. None: every certificate the transport verified.
    - clock: seconds since the epoch, for when jobs ended and retention (tests pass their own).
    - metrics: where jobs started and ended, and output streamed, are counted (`Metrics`).

    The service owns a nursery that watches every job it started, to record and log its end,
    and enforces retention. Leaving the block (normally or by exception) says NOT_SERVING,
    refuses new jobs (UNAVAILABLE), stops every job still running with the usual escalation
    ("stop requested by server shutdown") and waits until each has ended, so every end is
    recorded and logged. A cancellation skips that wait: the Supervisor's own exit then stops
    the jobs.
    """
    if max_running_jobs_per_user == "half":
        max_running_jobs_per_user = per_user_share(max_running_jobs)
    if max_log_streams_per_user == "half":
        max_log_streams_per_user = per_user_share(max_log_streams)
    check_caps(
        max_running_jobs=max_running_jobs,
        max_running_jobs_per_user=max_running_jobs_per_user,
        max_log_streams=max_log_streams,
        max_log_streams_per_user=max_log_streams_per_user,
    )
    if not math.isfinite(max_grace_period_s) or max_grace_period_s < 0:
        raise ValueError(f"max_grace_period_s must be finite and >= 0, got {max_grace_period_s}")
    if policy is not None and policy.needs_isolation and supervisor.isolation is None:
        raise ValueError("run-as accounts and network none need a Supervisor that isolates jobs")
    own_store = store is None
    if store is None:
        store = await open_store(":memory:")
    try:
        subtrees = [str(p) for p in supervisor.cgroup_subtrees]
        run_id = await store.begin_run(os.getpid(), subtrees)
        async with trio.open_nursery() as nursery:
            service = JobService(
                supervisor,
                nursery,
                store=store,
                run_id=run_id,
                max_running_jobs=max_running_jobs,
                max_running_jobs_per_user=max_running_jobs_per_user,
                max_log_streams=max_log_streams,
                max_log_streams_per_user=max_log_streams_per_user,
                max_grace_period_s=max_grace_period_s,
                policy=policy,
                retention=retention,
                allowed=allowed,
                clock=clock,
                metrics=metrics,
            )
            janitor = trio.CancelScope()

            async def run_janitor(task_status: trio.TaskStatus[None]) -> None:
                with janitor:
                    await service.run_janitor(task_status=task_status)

            await nursery.start(run_janitor)
            try:
                yield service
            finally:
                await service.close()
                janitor.cancel()
        with trio.CancelScope(shield=True):
            await store.end_run(run_id)
    finally:
        if own_store:
            with trio.CancelScope(shield=True):
                await store.aclose()
