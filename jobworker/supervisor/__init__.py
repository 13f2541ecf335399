"""jobworker.supervisor — a trio-native library that runs Linux commands as supervised jobs.

Each job runs in its own cgroup with CPU, memory, IO and pids limits and, as root, isolated:
a transient user of its own, namespaces of its own, a private /tmp; stopping it signals the
whole process tree and escalates to SIGKILL; its stdout and stderr are kept as one ordered,
stream-tagged log that any number of readers follow. Knows nothing about gRPC.
"""

from .errors import (
    CgroupError,
    CgroupsUnavailable,
    InvalidJobSpec,
    IsolationUnavailable,
    JobEnded,
    JobNotEnded,
    JobNotFound,
    LimitOutOfRange,
    SupervisorError,
    TransientUsersExhausted,
)
from .job import Job
from .limits import (
    HostCapacity,
    LimitOverrides,
    LimitPolicy,
    Limits,
    format_bytes,
    parse_bytes,
)
from .output import OutputChunk, OutputLog, OutputStream
from .sandbox import Isolation
from .status import JobState, JobStatus, RunAs, Usage, signal_name
from .supervisor import Supervisor

__all__ = [
    "CgroupError",
    "CgroupsUnavailable",
    "InvalidJobSpec",
    "HostCapacity",
    "Isolation",
    "IsolationUnavailable",
    "Job",
    "JobEnded",
    "JobNotEnded",
    "JobNotFound",
    "JobState",
    "JobStatus",
    "LimitOutOfRange",
    "LimitOverrides",
    "LimitPolicy",
    "Limits",
    "OutputChunk",
    "OutputLog",
    "OutputStream",
    "RunAs",
    "Supervisor",
    "SupervisorError",
    "TransientUsersExhausted",
    "Usage",
    "format_bytes",
    "parse_bytes",
    "signal_name",
]
