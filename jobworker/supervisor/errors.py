"""Domain errors of the supervisor.

These are the only exceptions the supervisor raises on purpose. The service layer maps each
class to one gRPC status in a single table; nothing here knows about gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .status import JobStatus


class SupervisorError(Exception):
    """Base class for every error the supervisor raises on purpose."""


class InvalidJobSpec(SupervisorError, ValueError):
    """The caller asked for something that can never work: an empty command, a negative or
    non-finite limit, a limit above the Supervisor's maximum, a malformed environment."""


class LimitOutOfRange(InvalidJobSpec):
    """A limit outside what it may be: not a number, below what the kernel enforces, above
    the Supervisor's maximum or what the host has. Says which limit and the allowed range.

    `what` says whose value it is ("requested", "default", "maximum"; empty for a request),
    `name` is the `Limits` field, `detail` the rest: ``f"{what} {name} {detail}"``."""

    def __init__(self, name: str, detail: str, *, what: str = "") -> None:
        super().__init__(f"{what} {name} {detail}" if what else f"{name} {detail}")
        self.name = name
        self.detail = detail
        self.what = what


class JobNotFound(SupervisorError, LookupError):
    """No job has this id (in this Supervisor)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobEnded(SupervisorError):
    """The job has already ended, so it cannot be stopped."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} has already ended (state {state})")
        self.job_id = job_id
        self.state = state


class JobNotEnded(SupervisorError):
    """The job is still running, and what was asked needs it ended."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is still running")
        self.job_id = job_id


class JobFailed(SupervisorError):
    """`Supervisor.run(check=True)`: the job did not finish with exit code 0 (subprocess's
    CalledProcessError). `status` is its final status: the exit code, the signal, whether the
    OOM killer or the pids limit was involved, who stopped it; the message says which."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(f"job {status.id} ({status.command_line}) {status.cause}")
        self.status = status

    @property
    def exit_code(self) -> int | None:
        return self.status.exit_code

    @property
    def signal(self) -> int | None:
        return self.status.signal


class CgroupError(SupervisorError):
    """A cgroup could not be created, configured, or removed."""


class CgroupsUnavailable(CgroupError):
    """cgroups cannot be used by this process at all; the message names the fix."""


class IsolationUnavailable(SupervisorError):
    """Jobs cannot be isolated here (not root, the cage program missing, no transient uid
    left); the message names the fix."""


class TransientUsersExhausted(IsolationUnavailable):
    """Every transient uid of the configured range is held by a live job."""
