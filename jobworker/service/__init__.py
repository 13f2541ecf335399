"""jobworker.service — the JobService API over a Supervisor, behind the purgatory transport.

    from jobworker.service import as_grpc_error, identify, open_job_service

    async with Supervisor() as supervisor, open_job_service(supervisor) as service:
        server = Server(
            service.methods(),
            tls=TLSConfig.server(...),
            identify=identify,  # the caller's Identity, once per connection
            errors=as_grpc_error,  # domain errors → statuses, the one table (errors.py)
        )
        await server.serve("127.0.0.1", 50051)

Identity is the client certificate's subject CN, roles its OU values (identity.py); what each
role may do is one table (authz.py); errors map to statuses in one table (errors.py); request
and response conversions live in convert.py. Events are logged on ``jobworker.events``; with
``Server(observe=audit_call)`` every call on ``jobworker.audit`` (audit.py); `Metrics` counts
for Prometheus (metrics.py).
"""

from .app import open_job_service
from .audit import audit_call
from .authz import Action, Decision, authorize
from .errors import (
    STATUS_OF,
    InvalidRequest,
    PermissionDenied,
    TooManyJobs,
    TooManyLogStreams,
    as_grpc_error,
)
from .handlers import SERVICE_NAME, JobService
from .identity import Identity, Role, identify
from .metrics import Metrics, serve_metrics
from .policy import JobPolicy, Retention
from .recovery import recover
from .store import JobStore, StoreUnavailable, open_store

__all__ = [
    "SERVICE_NAME",
    "STATUS_OF",
    "Action",
    "Decision",
    "Identity",
    "InvalidRequest",
    "JobPolicy",
    "JobService",
    "JobStore",
    "Metrics",
    "Retention",
    "StoreUnavailable",
    "PermissionDenied",
    "Role",
    "TooManyJobs",
    "TooManyLogStreams",
    "as_grpc_error",
    "audit_call",
    "authorize",
    "identify",
    "open_job_service",
    "open_store",
    "recover",
    "serve_metrics",
]
