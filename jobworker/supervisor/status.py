"""What a job is and was: states, exit causes, usage — immutable snapshots."""

from __future__ import annotations

import enum
import shlex
import signal
from dataclasses import dataclass, field
from datetime import datetime

from .limits import Limits, format_bytes


class JobState(enum.Enum):
    """Seed 000's states."""

    RUNNING = "running"
    FINISHED = "finished"  # exited 0 on its own
    # Exited non-zero, or was killed by a signal not from a stop (the OOM killer, Job.signal).
    FAILED = "failed"
    STOPPED = "stopped"  # ended after a stop request
    ERROR = "error"  # could not be created

    @property
    def ended(self) -> bool:
        return self is not JobState.RUNNING


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources used, read from the job's cgroup. None where the kernel does not say."""

    cpu_s: float | None = None
    cpu_throttled_s: float | None = None
    memory_bytes: int | None = None  # in use now: running jobs only
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RunAs:
    """Who a job runs as: a local account, root, or a transient user made for it alone."""

    uid: int
    gid: int
    name: str = ""  # the account's name; empty for a transient user (no account exists)
    groups: tuple[int, ...] = ()  # supplementary groups
    home: str | None = None
    transient: bool = False  # a uid allocated for this job alone, released when it ended

    def describe(self) -> str:
        """``alice (uid 1000)``, ``root (uid 0)``, ``transient uid 70012``."""
        if self.transient:
            return f"transient uid {self.uid}"
        if self.name:
            return f"{self.name} (uid {self.uid})"
        return f"uid {self.uid}"


# The namespaces an isolated job gets, in the order `Isolation` reports them.
NAMESPACES = ("pid", "mount", "ipc", "uts", "cgroup", "net")


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A snapshot of one job. Taken by `Job.status()`; never changes afterwards."""

    id: str
    owner: str
    command: str
    args: tuple[str, ...]
    state: JobState
    created_at: datetime
    pid: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    # Once ended: the exit code (128+N when killed by signal N) and the signal, if any.
    exit_code: int | None = None
    signal: int | None = None
    # Why a job is in state ERROR.
    error: str | None = None
    # The exit cause, beyond the code.
    stop_requested_by: str | None = None  # who asked; set whenever a stop was requested
    escalated: bool = False  # the stop's grace period ran out and the job was SIGKILLed
    oom_killed: bool = False  # the kernel OOM killer killed a process of this job (cgroup counter)
    pids_limit_hit: bool = False  # a fork failed because the job reached its pids limit
    # What was applied: None when the Supervisor runs with cgroups="off".
    limits: Limits | None = None
    cgroups: str = "off"  # the backend that applied them: "v2", "v1" or "off"
    usage: Usage = field(default_factory=Usage)
    limit_caveats: tuple[str, ...] = ()  # what of the limits the kernel applies only in part
    # Output that could not be written (a full disk): the log has a gap there (OutputChunk.lost).
    output_lost_bytes: int = 0
    # Who the job ran as, and what it was kept from: the namespaces of its own (empty: none,
    # the Supervisor does not isolate) and its network ("host", or "none": loopback only).
    run_as: RunAs | None = None
    namespaces: tuple[str, ...] = ()
    network: str = "host"
    # Processes of the job that outlived its kill: moved out of its cgroups (only possible for
    # a root job without isolation), or unkillable (uninterruptible sleep). The job's end is
    # reported without them.
    survivors: tuple[int, ...] = ()
    name: str = ""  # the caller's label for the job, if any (`Supervisor.start(name=...)`)

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal_name(self.signal)

    @property
    def cause(self) -> str:
        """How the job ended, in words: ``exited with code 3``, ``was killed by SIGKILL: the
        OOM killer at its memory limit 64M``, ``was stopped by alice (SIGTERM)``, ``could not
        be created: ...``; empty while it runs."""
        if self.state is JobState.RUNNING:
            return ""
        if self.state is JobState.ERROR:
            return f"could not be created: {self.error or 'no reason given'}"
        if self.exit_code is None:
            return f"ended unobserved: {self.error or 'its leader was never reaped'}"
        how = f"exited with code {self.exit_code}"
        if self.signal is not None:
            how = f"was killed by {self.signal_name}"
        if self.state is JobState.STOPPED:
            by = f" by {self.stop_requested_by}" if self.stop_requested_by else ""
            end = "SIGKILL after the grace period" if self.escalated else how
            return f"was stopped{by} ({end.removeprefix('was killed by ')})"
        extra = []
        if self.oom_killed:
            limit = ""
            if self.limits is not None:
                limit = f" at its memory limit {format_bytes(self.limits.memory_bytes)}"
            extra.append(f"the OOM killer{limit}")
        if self.pids_limit_hit:
            limit = f" of {self.limits.pids}" if self.limits is not None else ""
            extra.append(f"a fork failed at its pids limit{limit}")
        return f"{how}: {', '.join(extra)}" if extra else how

    @property
    def command_line(self) -> str:
        """The command with its arguments, shell-quoted only where needed."""
        return shlex.join((self.command, *self.args))


def exit_code_of(returncode: int) -> tuple[int, int | None]:
    """(exit code, signal) from a Popen-style returncode: negative means killed by a signal.

    The shell and docker convention: killed by signal N reports 128+N (137 SIGKILL, 143 SIGTERM).
    """
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number Python has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
