"""Starting a job's process inside its cgroups, before it runs a single instruction of its own.

Two ways: `spawn_caged` for an isolated job (the `jobworker-cage` program sets up namespaces,
places the job and drops its privileges; see sandbox.py and cage/cage.c), and `spawn` for an
unisolated one, described here.

Why `preexec_fn` (shared/CGROUPS.md, the team's cgroup notes, measured the options): writing
the pid after Popen returns is racy (6 of 200 runs executed outside the group, and children
forked by then stay outside forever);
an exec wrapper is fast but turns "command not found" into an indistinguishable exit 127; the
v1-only thread trick is impossible on v2; clone3(CLONE_INTO_CGROUP) has no safe route from
Python 3.11. So the child, between fork and exec, writes its own pid into each group's
cgroup.procs with nothing but os.open/os.write — no locks, no buffered I/O — and Popen's own
error pipe still reports exec failures (ENOENT, EACCES, a bad cwd) precisely.

The cost: preexec_fn forces fork() instead of vfork(), so spawning time grows with the parent's
page tables (2.1 ms for a small parent, 38 ms with a 1 GiB parent, in shared/CGROUPS.md).
tools/bench_supervisor.py measures start latency at its own small RSS only.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .sandbox import CagePlan, cage_argv

# A larger pipe means fewer wake-ups per MiB for a chatty job. 1 MiB is the default
# /proc/sys/fs/pipe-max-size, so it works unprivileged too.
PIPE_BYTES = 2**20


@dataclass(slots=True)
class Spawned:
    # Our child: the job's leader itself, or for a caged job the cage's keeper, whose exit
    # status is the leader's and whose exit means every process of the job has gone.
    process: trio.Process
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    pid: int  # the job's leader, as this process sees it
    caged: bool = False


class SpawnError(Exception):
    """The process could not be created; `reason` is the one line a user needs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    procs_files: Sequence[Path],
    stdin: int | None = None,
) -> Spawned:
    """Start `argv` with stdin from the fd `stdin` (None: /dev/null; the caller closes its
    copy) and stdout/stderr into pipes of our own.

    The child is placed into every file of `procs_files` before exec, and leads a new session
    (so a terminal's Ctrl-C reaches the supervisor, never its jobs directly).
    """
    targets = tuple(os.fsencode(p) for p in procs_files)

    def enter_cgroups() -> None:
        # Runs in the forked child. Deliberately minimal: raw syscalls, errors propagate
        # (Popen reports them as SubprocessError and the job becomes an "error" job).
        pid = str(os.getpid()).encode()
        for target in targets:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=dict(env),
            preexec_fn=enter_cgroups if targets else None,
            start_new_session=True,
        )
    except OSError as exc:
        for fd in (out_r, err_r):
            os.close(fd)
        raise SpawnError(_describe(exc, argv[0], cwd)) from exc
    except subprocess.SubprocessError as exc:
        for fd in (out_r, err_r):
            os.close(fd)
        raise SpawnError("cannot place the process in its cgroup") from exc
    finally:
        # The child has its own copies; ours would keep the pipes open forever.
        os.close(out_w)
        os.close(err_w)
    return Spawned(
        process, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r), process.pid
    )


# Bounds the wait for a cage that failed to set up, or was cancelled while doing so, to exit.
_CAGE_EXIT_WAIT_S = 5.0


async def spawn_caged(
    plan: CagePlan, *, env: Mapping[str, str], lifeline_fd: int, stdin: int | None = None
) -> Spawned:
    """Start the job of `plan` in its cage; return once it has exec'd its command.

    `stdin` (None: /dev/null) becomes the keeper's fd 0, which the init and then the job
    inherit; the keeper and the init swap theirs for /dev/null once they have forked
    (cage.c), so the job's processes end up holding the only read ends.

    The cage reports on a pipe: one line "pids INIT JOB" when the job was forked, or
    "error STAGE ERRNO\tDETAIL" when a step failed (then no job runs: SpawnError), and the pipe
    reaches EOF when the job's exec closed the last copy. The job's environment travels in a
    memfd, never through the environment of the root process that sets the cage up.
    """
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    env_fd = os.memfd_create("jobworker-env", os.MFD_CLOEXEC)
    try:
        os.write(env_fd, b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items()))
        argv = cage_argv(plan, report_fd=report_w, env_fd=env_fd, lifeline_fd=lifeline_fd)
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out_w,
            stderr=err_w,
            env={},
            cwd="/",
            pass_fds=(report_w, env_fd, lifeline_fd),
            start_new_session=True,
        )
    except BaseException as exc:
        for fd in (out_r, err_r, report_r):
            os.close(fd)
        if isinstance(exc, OSError):
            raise SpawnError(f"cannot start the job's cage: {exc.strerror}") from exc
        raise
    finally:
        for fd in (out_w, err_w, report_w, env_fd):
            os.close(fd)
    stdout, stderr = trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)
    report = trio.lowlevel.FdStream(report_r)
    try:
        text = await _read_all(report)
    except BaseException:
        # Cancelled while the cage was being built: end it (SIGTERM to the keeper kills the
        # whole namespace) and reap it, so that nothing outlives this call.
        with trio.CancelScope(shield=True):
            await _end_cage(process, stdout, stderr)
        raise
    finally:
        await report.aclose()
    problem, pid = _parse_report(text, plan)
    if problem is not None:
        with trio.CancelScope(shield=True):
            await _end_cage(process, stdout, stderr)
        raise SpawnError(problem)
    return Spawned(process, stdout, stderr, pid, caged=True)


async def _read_all(stream: trio.lowlevel.FdStream) -> str:
    chunks = []
    while chunk := await stream.receive_some(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def _end_cage(
    process: trio.Process, stdout: trio.lowlevel.FdStream, stderr: trio.lowlevel.FdStream
) -> None:
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(_CAGE_EXIT_WAIT_S):
        await process.wait()
    if process.returncode is None:
        process.kill()  # the keeper itself; its init dies with it (parent-death signal)
        await process.wait()
    await stdout.aclose()
    await stderr.aclose()


def _parse_report(text: str, plan: CagePlan) -> tuple[str | None, int]:
    """(the reason the job did not start, or None; the job's pid)."""
    pid = 0
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "error":
            head, _, detail = rest.partition("\t")
            stage, _, number = head.partition(" ")
            return _reason(stage, int(number) if number.isdigit() else 0, detail, plan), 0
        if word == "pids":
            fields = rest.split()
            if len(fields) == 2 and fields[1].isdigit():
                pid = int(fields[1]) or int(fields[0])
    if not pid:
        return "the job's cage ended before the job started", 0
    return None, pid


def _reason(stage: str, err: int, detail: str, plan: CagePlan) -> str:
    why = os.strerror(err) if err else "failed"
    if stage == "exec":
        return f"cannot run {plan.argv[0]!r}: {why}"
    if stage == "chdir":
        return f"cannot use working directory {plan.cwd!r}: {why}"
    if stage == "cgroup":
        return f"cannot place the process in its cgroup ({detail}): {why}"
    if stage == "identity":
        return f"cannot run as {plan.run_as.describe()} ({detail}): {why}"
    if stage == "mount":
        return f"cannot set up the job's filesystem ({detail}): {why}"
    return f"cannot isolate the job ({stage} {detail}".rstrip() + f"): {why}"


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # a smaller pipe only costs throughput
    return read_end, write_end


def _describe(exc: OSError, command: str, cwd: str) -> str:
    # Popen reports a failed chdir with the directory as the filename, a failed exec with the
    # program's: tell the user which of the two it was.
    if exc.filename is not None and os.fsdecode(exc.filename) == cwd:
        return f"cannot use working directory {cwd!r}: {exc.strerror}"
    return f"cannot run {command!r}: {exc.strerror}"
