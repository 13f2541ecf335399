"""jobworker.supervisor — a trio-native library that runs Linux commands as supervised jobs.

Each job runs in its own cgroup with CPU, memory, IO and pids limits and, as root, isolated:
a transient user of its own, namespaces of its own, a private /tmp; stopping it signals the
whole process tree and escalates to SIGKILL; its stdout and stderr are kept as one ordered,
stream-tagged log that any number of readers follow. Knows nothing about gRPC.

    async with Supervisor() as sup:
        # One call, as trio.run_process: start, wait, raise JobFailed unless exit code 0.
        status = await sup.run(["sha256sum"], stdin=b"hello\n")
        async for chunk in sup.get(status.id).output():   # its output stays in the log
            print(chunk.stream.name, chunk.data)

        # A job you keep a handle on, whose stdin you write (a trio SendStream).
        job = await sup.start(["cat"], stdin=subprocess.PIPE)
        await job.stdin.send_all(b"data")   # blocks while the job does not read
        await job.stdin.aclose()            # EOF
        status = await job.wait()           # final JobStatus; status.cause says how it ended

Who owns a job: the Supervisor, not the task that started it. Every job runs in the
Supervisor's nursery, so

- cancelling `Job.wait` (or a reader of `Job.output`) only stops the waiting: the job runs on;
  `Job.stop` or `Job.signal` end it;
- cancelling `Supervisor.run` stops its job (SIGTERM, grace period, SIGKILL) and waits for
  its end before the cancellation goes on: there the caller holds no handle to the job;
- leaving the ``async with`` block — normally, by an exception or a cancellation — stops every
  job still running (SIGTERM to every process, SIGKILL after the grace period), waits for each
  to end and removes its cgroups: no job outlives its Supervisor;
- `Job.stop` on a job that has already ended returns its final status, unchanged.

stdin is /dev/null unless `start` is given bytes, a trio ReceiveStream or subprocess.PIPE;
see `Supervisor.start` and `JobStdin`.
"""

from .errors import (
    CgroupError,
    CgroupsUnavailable,
    InvalidJobSpec,
    IsolationUnavailable,
    JobEnded,
    JobFailed,
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
from .stdin import JobStdin
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
    "JobFailed",
    "JobNotEnded",
    "JobNotFound",
    "JobState",
    "JobStatus",
    "JobStdin",
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
