"""Every error the service answers with, and the one table that gives each its gRPC status.

Handlers raise domain errors (the supervisor's, or the service's own below); `as_grpc_error`
turns them into a `GrpcError` at the edge of each handler. Anything not in the table is a bug:
it propagates, and the transport answers INTERNAL with a generic message and logs it.
"""

from __future__ import annotations

import re

from jobworker.purgatory import GrpcError, Status
from jobworker.supervisor import (
    InvalidJobSpec,
    JobEnded,
    JobNotEnded,
    JobNotFound,
    LimitOutOfRange,
    TransientUsersExhausted,
)

from .store import StoreUnavailable


class ServiceError(Exception):
    """An error of the service itself (not of the supervisor)."""


class InvalidRequest(ServiceError, ValueError):
    """A request that can never succeed as sent: a malformed id, a bad duration, a bad env."""


class PermissionDenied(ServiceError):
    """The caller's role forbids the action (the job, if any, is one it may see)."""


class TooManyJobs(ServiceError):
    """The server, or the caller, already runs its maximum of concurrent jobs."""

    def __init__(self, limit: int, *, per_user: bool) -> None:
        if per_user:
            message = (
                f"you have {limit} jobs running, the most per user (--max-jobs-per-user);"
                " start this one when one of yours has ended"
            )
        else:
            message = (
                f"the server already runs its maximum of {limit} jobs at once (--max-jobs);"
                " start this one when another has ended"
            )
        super().__init__(message)
        self.per_user = per_user


class TooManyLogStreams(ServiceError):
    """The server, or the caller, already has its maximum of GetJobLogs streams open."""

    def __init__(self, limit: int, *, per_user: bool) -> None:
        if per_user:
            message = (
                f"you have {limit} log streams open, the most per user"
                " (--max-log-streams-per-user); close one of them first"
            )
        else:
            message = (
                f"the server already serves its maximum of {limit} log streams at once"
                " (--max-log-streams); try again when one has closed"
            )
        super().__init__(message)
        self.per_user = per_user


class NoSuchJob(ServiceError):
    """No job the caller may see has the name, or an id starting with the prefix, it gave."""


class JobNameTaken(ServiceError):
    """The caller already has a job of this name (kept until it is removed)."""

    def __init__(self, name: str, holder_id: str, holder_state: str) -> None:
        super().__init__(
            f'you already have a job named "{name}": {holder_id} ({holder_state}); remove it'
            " first, or choose another name"
        )
        self.name = name
        self.holder_id = holder_id


class StdinUnavailable(ServiceError):
    """A job's stdin cannot be written: it was not opened, has a writer, was closed, or the
    job stopped reading it."""


class ShuttingDown(ServiceError):
    """The service is closing and starts nothing more."""


class Unavailable(ServiceError):
    """The server cannot do this now (it cannot record the job, say): try again later."""


# The one mapping. Order matters only for subclasses (none of these is a subclass of another).
STATUS_OF: dict[type[Exception], Status] = {
    InvalidRequest: Status.INVALID_ARGUMENT,
    InvalidJobSpec: Status.INVALID_ARGUMENT,
    JobNotFound: Status.NOT_FOUND,
    NoSuchJob: Status.NOT_FOUND,
    JobNameTaken: Status.ALREADY_EXISTS,
    JobEnded: Status.FAILED_PRECONDITION,
    PermissionDenied: Status.PERMISSION_DENIED,
    TooManyJobs: Status.RESOURCE_EXHAUSTED,
    TooManyLogStreams: Status.RESOURCE_EXHAUSTED,
    ShuttingDown: Status.UNAVAILABLE,
    TransientUsersExhausted: Status.RESOURCE_EXHAUSTED,
    JobNotEnded: Status.FAILED_PRECONDITION,
    StdinUnavailable: Status.FAILED_PRECONDITION,
    Unavailable: Status.UNAVAILABLE,
    StoreUnavailable: Status.UNAVAILABLE,
}

# The supervisor names two limits differently from the API (schema/jobworker/v1/jobworker.proto);
# the others, io_read_iops and io_write_iops included, are spelled alike.
_API_LIMIT_NAMES = {
    "io_read_bps": "io_read_bytes_per_second",
    "io_write_bps": "io_write_bytes_per_second",
}


def api_limit_name(name: str) -> str:
    """A `Limits` field as StartJobRequest spells it: ``limits.cpu``, ``limits.io_read_...``."""
    return "limits." + _API_LIMIT_NAMES.get(name, name)


_LIMIT_NAME = re.compile(r"\b(" + "|".join(_API_LIMIT_NAMES) + r")\b")


def as_grpc_error(exc: Exception) -> GrpcError | None:
    """The status and message for a domain error; None for anything else (a bug)."""
    for cls, status in STATUS_OF.items():
        if isinstance(exc, cls):
            return GrpcError(status, _message(exc))
    return None


def _message(exc: Exception) -> str:
    if isinstance(exc, JobNotFound):
        # The same words whether the job does not exist or belongs to someone the caller may
        # not see: built from the id the caller sent, nothing else.
        return not_found_message(exc.job_id)
    if isinstance(exc, JobEnded):
        # Stopping an ended job is no error (StopJob says already_ended): signalling one is.
        if exc.state == "ending":
            return f"job {exc.job_id} is ending: its processes are gone or being killed"
        return f"job {exc.job_id} has already ended ({exc.state}): it has no process left"
    if isinstance(exc, JobNotEnded):
        return f"job {exc.job_id} is still running: stop it first (or force the removal)"
    if isinstance(exc, LimitOutOfRange):
        # Whether a default or a maximum, it is about the field the request set (or left).
        return f"{api_limit_name(exc.name)} {exc.detail}"
    if isinstance(exc, InvalidJobSpec):
        return _LIMIT_NAME.sub(lambda m: _API_LIMIT_NAMES[m.group(1)], str(exc))
    return str(exc)


def not_found_message(job_id: str) -> str:
    return f"job {job_id} not found"


_SHOWN_CHARS = 60  # of a malformed value echoed in an error message


def shown(text: str) -> str:
    """A value the caller sent, fit to quote in a message: repr'd (control characters
    escaped) and cut short."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "…"
    return repr(text)
