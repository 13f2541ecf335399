"""`open_job_service`: the JobService over a Supervisor, as a resource with a lifetime."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from jobworker.supervisor import Supervisor

from .convert import MAX_GRACE_PERIOD_S
from .handlers import JobService
from .policy import JobPolicy


@asynccontextmanager
async def open_job_service(
    supervisor: Supervisor,
    *,
    max_running_jobs: int | None = None,
    max_grace_period_s: float = MAX_GRACE_PERIOD_S,
    policy: JobPolicy | None = None,
) -> AsyncIterator[JobService]:
    """The service, ready for `Server(service.methods(), identify=identify, ...)`.

        async with Supervisor(...) as supervisor:
            async with open_job_service(supervisor, max_running_jobs=100) as service:
                ...serve; on shutdown: service.set_serving(False), then server.shutdown(...)

    - max_running_jobs: StartJob answers RESOURCE_EXHAUSTED while this many jobs it started
      are running (None: no limit).
    - max_grace_period_s: the longest grace period StopJob accepts (INVALID_ARGUMENT above).
    - policy: the accounts identities' jobs run as, and their network (`JobPolicy`); mapping
      accounts or a network other than the host's needs a Supervisor that isolates jobs.

    The service owns a nursery that watches every job it started, to log its end. Leaving the
    block (normally or by exception) says NOT_SERVING, refuses new jobs (UNAVAILABLE), stops
    every job still running with the usual escalation ("stop requested by server shutdown") and
    waits until each has ended, so every end is logged. A cancellation skips that wait: the
    Supervisor's own exit then stops the jobs.
    """
    if max_running_jobs is not None and max_running_jobs < 1:
        raise ValueError(f"max_running_jobs must be at least 1, got {max_running_jobs}")
    if not math.isfinite(max_grace_period_s) or max_grace_period_s < 0:
        raise ValueError(f"max_grace_period_s must be finite and >= 0, got {max_grace_period_s}")
    if policy is not None and policy.needs_isolation and supervisor.isolation is None:
        raise ValueError("run-as accounts and network none need a Supervisor that isolates jobs")
    async with trio.open_nursery() as nursery:
        service = JobService(
            supervisor,
            nursery,
            max_running_jobs=max_running_jobs,
            max_grace_period_s=max_grace_period_s,
            policy=policy,
        )
        try:
            yield service
        finally:
            await service.close()
