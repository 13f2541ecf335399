"""Starting a job's process inside its cgroups, before it runs a single instruction of its own.

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
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

# A larger pipe means fewer wake-ups per MiB for a chatty job. 1 MiB is the default
# /proc/sys/fs/pipe-max-size, so it works unprivileged too.
PIPE_BYTES = 2**20


@dataclass(slots=True)
class Spawned:
    process: trio.Process
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream


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
) -> Spawned:
    """Start `argv` with stdin from /dev/null and stdout/stderr into pipes of our own.

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
            stdin=subprocess.DEVNULL,
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
    return Spawned(process, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r))


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
