"""`jobctl`: start, stop, inspect and follow jobs on a jobworker server.

    jobctl start [--cpu 0.5] [--memory 512M] [--io-read 50M] [--io-write 50M] [--pids N]
                 [--io-read-iops N] [--io-write-iops N]
                 [--env K=V]... [--cwd DIR] [--network host|none] [--name NAME] CMD [ARGS...]
                                                                  prints the job id alone
    jobctl stop ID [--grace 5s]  an already ended job: said on stderr, exit 0 (docker stop)
    jobctl kill [-s SIGNAL] ID...                one signal, no escalation (default KILL)
    jobctl wait ID...            until each ends: prints its exit code, exits with it
    jobctl status ID [--json]
    jobctl logs ID [-f] [-n N] [--since 10m] [-t] [--stdout|--stderr]
                                 stdout chunks to stdout, stderr chunks to stderr, byte-exact
    jobctl list|ls|ps [--all] [--state S]... [-n N] [-q] [--json]
    jobctl top [--all] [--interval 2s] [--no-stream]    live CPU, memory and IO (cli/top.py)
    jobctl rm ID... [--force]    remove ended jobs (record, output, working directory)
    jobctl prune [--older-than 24h] [--all]
    jobctl run [limits] CMD [ARGS...]     start, follow, exit with the job's exit code
    jobctl completion bash|zsh|fish       the shell completion script, on stdout

An ID is a job's id, a prefix of one that matches one job only, or its name: the server
resolves it. In start and run, jobctl's own options end at CMD, as docker's do: `jobctl run
echo --cpu 2` runs `echo --cpu 2` (`--` before CMD still works).

The connection options (--server, --cert, --key, --ca; JOBCTL_* variables; files in
~/.config/jobctl/) go before or after the command: see client.py. Errors are one line on
stderr; exit codes in errors.py.

Ctrl-C: `logs -f`, `wait` and `top` stop and exit 130; the jobs go on. `run` is a foreground
job: the first Ctrl-C stops the job (the server's grace period, output still shown), the
second kills it at once (grace 0), a third leaves without waiting. `run` then exits with the
job's exit code (143 after SIGTERM, 137 after SIGKILL), or 127 if the job could not be
created; when the job did not end on its own (OOM killer, a signal, a stop by someone, lost
with its server), one line on stderr says why.

`wait` of several jobs waits for them in the order given and prints one exit code per line;
it exits with the first non-zero code among them (0 when all exited 0), so `jobctl wait a b
&& next` runs `next` only if every job succeeded.

Whatever jobctl prints for a person escapes control characters (terminal.py); --json does not.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import trio
from cyclopts import App, CycloptsError, Group, Parameter, UnknownOptionError

import jobworker
from jobworker.v1 import jobworker_pb2 as pb

from .client import Connection, JobClient, connect
from .errors import EXIT_INTERRUPTED, EXIT_NOT_CREATED, EXIT_RPC, CliError, run_cli, say
from .formatting import (
    STATE_NAMES,
    ended_summary,
    exit_cause,
    format_list,
    format_status,
    to_json,
)
from .logs import Stamper, dropped_notice, parse_since, parse_tail
from .parsing import (
    end_options_at_command,
    parse_cpu,
    parse_duration,
    parse_env,
    parse_signal,
    parse_size,
)
from .terminal import printable
from .top import run_top

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# `run -i`: the most of our stdin read at once, one WriteJobInput message (its HTTP/2 window
# and the job's pipe bound what is in flight, not this). Each chunk costs a thread's round
# trip here and a handler's turn on the server: 256 KiB carried 1.3x what 64 KiB did
# (tools/bench_stdin.py), and stays far below the server's 4 MiB message limit.
STDIN_CHUNK_BYTES = 256 * 2**10

app = App(
    name="jobctl",
    help="Start, stop, inspect and follow jobs on a jobworker server.",
    version=jobworker.__version__,
    # Defaults are written into the help texts, in words ("Default: the server's"): cyclopts
    # would print Python values ("[default: ()]", "[default: False]").
    default_parameter=Parameter(show_default=False),
)
app.register_install_completion_command(
    help="Install shell completion for jobctl (bash, zsh, fish).", group="Setup"
)

DEFAULT_CONNECTION = Connection()
ConnectionParameter = Annotated[Connection | None, Parameter(parse=False)]
JobReference = Annotated[
    str, Parameter(name="ID", help="A job's id, a prefix of one that matches one job, or its name.")
]
JobReferences = Annotated[
    tuple[str, ...],
    Parameter(name="ID", help="Jobs: each an id, a prefix of one that matches one job, or a name."),
]
Flag = Parameter(negative="")  # a switch: --all, never --no-all

# Help pages list a command's own options before the connection options every command shares.
JOB_GROUP = Group("Job", sort_key=1)


@Parameter(name="*", group=JOB_GROUP)
@dataclass(frozen=True)
class JobOptions:
    """What to run the job with. Limits left out take the server's defaults."""

    cpu: Annotated[
        str | None, Parameter(help="CPU cores, or a percentage of one core: 0.5, 2, 50%.")
    ] = None
    memory: Annotated[str | None, Parameter(help="Memory limit, e.g. 512M or 1G.")] = None
    io_read: Annotated[str | None, Parameter(help="Read bandwidth per second, e.g. 50M.")] = None
    io_write: Annotated[str | None, Parameter(help="Write bandwidth per second, e.g. 50M.")] = None
    pids: Annotated[int | None, Parameter(help="Maximum processes and threads.")] = None
    io_read_iops: Annotated[
        int | None, Parameter(help="Read operations per second per disk, e.g. 500.")
    ] = None
    io_write_iops: Annotated[
        int | None, Parameter(help="Write operations per second per disk, e.g. 500.")
    ] = None
    env: Annotated[
        tuple[str, ...],
        Parameter(
            name=["--env", "-e"],
            negative="",
            help="KEY=VALUE for the job's environment (repeatable).",
        ),
    ] = ()
    cwd: Annotated[
        str | None,
        Parameter(help="The job's working directory on the server. Default: a new one of its own."),
    ] = None
    network: Annotated[
        Literal["host", "none"] | None,
        Parameter(
            help="host: the server's network; none: a loopback of its own. Default: the "
            "server's choice."
        ),
    ] = None
    name: Annotated[
        str | None,
        Parameter(
            help="A name for the job, usable wherever its id is; unique among your jobs. "
            "1 to 64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)."
        ),
    ] = None


_NETWORKS = {"host": pb.NETWORK_HOST, "none": pb.NETWORK_NONE}
UINT32_MAX = 2**32 - 1  # the API's pids field
UINT64_MAX = 2**64 - 1  # its byte counts


def build_start_request(
    command: str, args: tuple[str, ...], options: JobOptions
) -> pb.StartJobRequest:
    """The StartJob request for a command line and its options; CliError (exit 2) for a
    malformed size or environment entry, or a limit the API cannot carry. Whether a limit is
    within the server's own range is the server's to say (INVALID_ARGUMENT, exit 2 too)."""
    request = pb.StartJobRequest(
        command=command,
        args=list(args),
        working_dir=options.cwd or "",
        name=options.name or "",
    )
    if options.network is not None:
        request.network = _NETWORKS[options.network]
    try:
        request.env.update(parse_env(list(options.env)))
    except ValueError as exc:
        raise CliError(f"--env: {exc}") from None
    limits = request.limits
    if options.cpu is not None:
        try:
            limits.cpu = parse_cpu(options.cpu)
        except ValueError as exc:
            raise CliError(f"--cpu: {exc}") from None
    for flag, field_name, value in (
        ("--memory", "memory_bytes", options.memory),
        ("--io-read", "io_read_bytes_per_second", options.io_read),
        ("--io-write", "io_write_bytes_per_second", options.io_write),
    ):
        if value is not None:
            try:
                size = parse_size(value)
            except ValueError as exc:
                raise CliError(f"{flag}: {exc}") from None
            if size > UINT64_MAX:
                raise CliError(f"{flag}: {value!r} is too large (at most 16E)")
            setattr(limits, field_name, size)
    if options.pids is not None:
        if not 1 <= options.pids <= UINT32_MAX:
            raise CliError(f"--pids: must be between 1 and {UINT32_MAX}, got {options.pids}")
        limits.pids = options.pids
    for flag, field_name, count in (
        ("--io-read-iops", "io_read_iops", options.io_read_iops),
        ("--io-write-iops", "io_write_iops", options.io_write_iops),
    ):
        if count is not None:
            if not 1 <= count <= UINT64_MAX:
                raise CliError(f"{flag}: must be between 1 and {UINT64_MAX}, got {count}")
            setattr(limits, field_name, count)
    if not request.limits.ListFields():
        request.ClearField("limits")
    return request


def _grace_seconds(grace: str | None) -> float | None:
    if grace is None:
        return None
    try:
        return parse_duration(grace)
    except ValueError as exc:
        raise CliError(f"--grace: {exc}") from None


# --- commands --------------------------------------------------------------------------------


CommandName = Annotated[
    str, Parameter(name="CMD", help="The command to run; jobctl's options end here.")
]
CommandArgs = Annotated[str, Parameter(name="ARGS", help="Its arguments, options included.")]


@app.command
def start(
    command: CommandName,
    /,
    *args: CommandArgs,
    options: JobOptions = JobOptions(),
    conn: ConnectionParameter = None,
) -> int:
    """Start a job and print its id. If it could not be created (command not found, bad
    working directory), the id is printed still, the reason goes to stderr, and the exit code
    is 127."""
    request = build_start_request(command, args, options)

    async def body(client: JobClient) -> int:
        started = await client.start(request)
        job_id = started.job_id
        _write_text(job_id + "\n")
        # StartJob succeeds for a command that cannot run (the job exists, in ERROR, so its
        # reason can be read later); the person who typed it wants to know now. A server from
        # before StartJobResponse carried the status is asked for it.
        job = started.status if started.HasField("status") else await client.status(job_id)
        if job.state == pb.JOB_STATE_ERROR:
            _say(f"job {job_id} {exit_cause(job)}")
            return EXIT_NOT_CREATED
        return 0

    return _with_client(conn, body)


@app.command
def stop(
    job_id: JobReference,
    /,
    *,
    grace: Annotated[
        str | None,
        Parameter(help="Time between SIGTERM and SIGKILL, e.g. 5s. Default: the server's."),
    ] = None,
    conn: ConnectionParameter = None,
) -> int:
    """Stop a job: SIGTERM to all its processes, SIGKILL after the grace period. Returns once
    the job has ended. A job that had already ended is left as it is (exit 0)."""
    grace_s = _grace_seconds(grace)

    async def body(client: JobClient) -> int:
        reply = await client.stop(job_id, grace_s)
        if reply.already_ended:
            _say(f"job {reply.status.job_id} had already ended ({ended_summary(reply.status)})")
        return 0

    return _with_client(conn, body)


@app.command
def status(
    job_id: JobReference,
    /,
    *,
    json: Annotated[bool, Flag, Parameter(help="The JobStatus message as JSON.")] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Show a job's state, command, exit code and more."""

    async def body(client: JobClient) -> int:
        job = await client.status(job_id)
        _write_text(to_json(job) if json else format_status(job, now=datetime.now(UTC)))
        return 0

    return _with_client(conn, body)


@app.command
def logs(
    job_id: JobReference,
    /,
    *,
    follow: Annotated[
        bool, Parameter(name=["--follow", "-f"], negative="", help="Follow until the job ends.")
    ] = False,
    tail: Annotated[
        str | None,
        Parameter(
            name=["--tail", "-n"],
            help="Only the last N lines kept (of the streams shown); 0: none, only what comes "
            "next with -f. Default: all.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        Parameter(
            help="Only output read since then: a duration ago (10m, 1h30m) or a time "
            "(2026-12-06T01:02:03Z; '2026-12-06 01:02:03' is local time).",
        ),
    ] = None,
    timestamps: Annotated[
        bool,
        Flag,
        Parameter(
            name=["--timestamps", "-t"],
            help="Begin each line with when the server read it (RFC 3339, UTC, nanoseconds).",
        ),
    ] = False,
    stdout: Annotated[bool, Flag, Parameter(help="Only the job's stdout.")] = False,
    stderr: Annotated[bool, Flag, Parameter(help="Only the job's stderr.")] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Write a job's output as it was produced: its stdout to stdout, its stderr to stderr.
    Output the server no longer keeps is said on stderr, with where it resumes."""
    now_ns = time.time_ns()
    try:
        tail_lines = parse_tail(tail) if tail is not None else None
    except ValueError as exc:
        raise CliError(f"--tail: {exc}") from None
    try:
        since_ns = parse_since(since, now_ns=now_ns) if since is not None else None
    except ValueError as exc:
        raise CliError(f"--since: {exc}") from None
    if tail_lines == 0:  # docker's -n 0: no line of what was kept, so only what comes next
        since_ns = max(since_ns or 0, now_ns)
    streams = ((pb.LOG_STREAM_STDOUT,) if stdout else ()) + (
        (pb.LOG_STREAM_STDERR,) if stderr else ()
    )
    writer = _OutputWriter(timestamps=timestamps)

    async def body(client: JobClient) -> int:
        interrupted = await _cancel_on_ctrl_c(
            lambda: client.logs(
                job_id,
                writer,
                follow=follow,
                tail_lines=min(tail_lines or 0, UINT32_MAX),
                since_ns=since_ns,
                streams=streams,
            )
        )
        return EXIT_INTERRUPTED if interrupted else 0

    return _with_client(conn, body)


StateName = Literal["running", "finished", "failed", "stopped", "error"]
_STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


@app.command(name="list", alias=["ls", "ps"])
def list_jobs(
    *,
    all_jobs: Annotated[
        bool,
        Parameter(name="--all", negative="", help="Every user's jobs (viewer and admin only)."),
    ] = False,
    state: Annotated[
        tuple[StateName, ...],
        Parameter(negative="", help="Only jobs in this state (repeatable)."),
    ] = (),
    last: Annotated[
        int | None, Parameter(name=["--last", "-n"], help="Only the N jobs created last.")
    ] = None,
    quiet: Annotated[
        bool, Parameter(name=["--quiet", "-q"], negative="", help="Only the job ids.")
    ] = False,
    json: Annotated[bool, Parameter(negative="", help="The ListJobsResponse as JSON.")] = False,
    conn: ConnectionParameter = None,
) -> int:
    """List your jobs, oldest first (with --all, everyone's), page after page."""
    if last is not None and last < 1:
        raise CliError(f"--last: must be at least 1, got {last}")
    request = pb.ListJobsRequest(all=all_jobs, states=[_STATE_VALUES[s] for s in state])
    if last is not None:
        request.order_by = "create_time desc"

    async def body(client: JobClient) -> int:
        jobs = await client.list(request, limit=last)
        if last is not None:
            jobs.reverse()  # the newest N, shown oldest first like every listing
        if json:
            _write_text(to_json(pb.ListJobsResponse(jobs=jobs)))
        elif quiet:
            _write_text("".join(f"{job.job_id}\n" for job in jobs))
        else:
            _write_text(format_list(jobs))
        return 0

    return _with_client(conn, body)


@app.command(name="rm")
def remove(
    job_ids: JobReferences,
    /,
    *,
    force: Annotated[
        bool,
        Parameter(
            name=["--force", "-f"], negative="", help="Stop a running job first, then remove it."
        ),
    ] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Remove ended jobs: their records, output and working directories."""
    if not job_ids:
        raise CliError("rm: name at least one job id")

    async def body(client: JobClient) -> int:
        failed = 0
        for job_id in job_ids:
            try:
                await client.delete(job_id, force=force)
            except CliError as exc:
                if not exc.answered:
                    raise
                _say(exc.message)
                failed += 1
            else:
                _write_text(f"{printable(job_id)}\n")
        return EXIT_RPC if failed else 0

    return _with_client(conn, body)


@app.command
def prune(
    *,
    older_than: Annotated[
        str | None,
        Parameter(help="Only jobs that ended longer ago than this, e.g. 24h. Default: all."),
    ] = None,
    all_jobs: Annotated[
        bool, Parameter(name="--all", negative="", help="Every user's ended jobs (admin only).")
    ] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Remove your ended jobs (with --all, everyone's), printing the ids removed."""
    try:
        older_than_s = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise CliError(f"--older-than: {exc}") from None

    async def body(client: JobClient) -> int:
        removed = await client.prune(older_than_s=older_than_s, all_jobs=all_jobs)
        _write_text("".join(f"{job_id}\n" for job_id in removed))
        return 0

    return _with_client(conn, body)


@app.command
def run(
    command: CommandName,
    /,
    *args: CommandArgs,
    interactive: Annotated[
        bool,
        Parameter(
            name=["--interactive", "-i"],
            negative="",
            group=JOB_GROUP,
            help="Pass jobctl's stdin to the job, byte for byte, then EOF (docker's -i). "
            "Without it the job's stdin is /dev/null.",
        ),
    ] = False,
    options: JobOptions = JobOptions(),
    conn: ConnectionParameter = None,
) -> int:
    """Start a job, follow its output, and exit with its exit code (127: it could not be
    created); if it did not end on its own, one line on stderr says why. Ctrl-C stops the job
    (twice: kills it at once)."""
    request = build_start_request(command, args, options)
    if interactive:
        request.open_stdin = True
    elif _stdin_holds_data():
        _say("stdin is not passed to the job (its stdin is /dev/null); run -i passes it")
    return _with_client(
        conn, lambda client: _run_in_foreground(client, request, pass_stdin=interactive)
    )


def _stdin_holds_data() -> bool:
    """Is our stdin a pipe or a file, i.e. was something meant for the job? (A terminal or
    /dev/null is no sign of that.)"""
    fd = _stdin_fd()
    if fd is None:
        return False
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _stdin_reader() -> Callable[[], Awaitable[bytes]]:
    """How `run -i` reads our stdin: chunk after chunk, b"" at its end.

    A file (`< FILE`) is read on the Trio thread: it never waits on anyone, only on the page
    cache or the disk, and a thread's round trip per chunk cost more than the read. Anything
    else (a pipe, a terminal) is read in a thread: O_NONBLOCK, which trio's FdStream would
    set, belongs to the open file, shared with the shell and whoever else reads it; a read
    still blocked when the job ends is abandoned, its thread dying with the process. A stdin
    that cannot be read (closed: `<&-`; a terminal hung up: EIO) ends the input, said once:
    the job reads EOF and runs on to its end."""
    fd = _stdin_fd()
    try:
        direct = fd is not None and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        direct = False  # the read below says why

    async def read() -> bytes:
        if fd is None:
            _say("stdin is closed: the job reads EOF")
            return b""
        try:
            if direct:
                await trio.lowlevel.checkpoint()
                return os.read(fd, STDIN_CHUNK_BYTES)
            return await trio.to_thread.run_sync(
                os.read, fd, STDIN_CHUNK_BYTES, abandon_on_cancel=True
            )
        except OSError as exc:
            _say(f"cannot read stdin ({exc.strerror}): the job reads EOF")
            return b""

    return read


def _stdin_fd() -> int | None:
    """fd 0, unless it was closed when jobctl started: then Python made sys.stdin None, and
    fd 0 may since have been taken by a file of the interpreter's own, never to be sent."""
    return None if sys.stdin is None else sys.stdin.fileno()


@app.command
def wait(job_ids: JobReferences, /, *, conn: ConnectionParameter = None) -> int:
    """Wait until each job has ended and print its exit code, a line per job in the order
    given; exit with it (several jobs: the first non-zero one). No time limit; Ctrl-C leaves
    the jobs running (exit 130)."""

    async def body(client: JobClient) -> int:
        codes: list[int] = []

        async def wait_each() -> None:
            for job_id in job_ids:
                try:
                    job = await client.wait(job_id)
                except CliError as exc:
                    if not exc.answered:
                        raise
                    _say(exc.message)  # no line on stdout: there is no exit code to print
                    codes.append(exc.exit_code)
                    continue
                cause = exit_cause(job)
                if cause:
                    _say(f"job {job.job_id} {cause}")
                codes.append(job_exit_code(job))
                _write_text(f"{codes[-1]}\n")

        if await _cancel_on_ctrl_c(wait_each):
            return EXIT_INTERRUPTED
        return next((code for code in codes if code), 0)

    return _with_client(conn, body)


@app.command
def kill(
    job_ids: JobReferences,
    /,
    *,
    signal_name: Annotated[
        str,
        Parameter(
            name=["--signal", "-s"],
            help="The signal: a name (TERM, SIGTERM, hup) or a number. Default: KILL.",
        ),
    ] = "KILL",
    conn: ConnectionParameter = None,
) -> int:
    """Send one signal to every process of running jobs, with no grace period and no
    escalation (stop is the polite way to end a job)."""
    try:
        number = parse_signal(signal_name)
    except ValueError as exc:
        raise CliError(f"--signal: {exc}") from None

    async def body(client: JobClient) -> int:
        failed = 0
        for job_id in job_ids:
            try:
                await client.signal(job_id, number)
            except CliError as exc:
                if not exc.answered:
                    raise
                _say(exc.message)
                failed = failed or exc.exit_code
        return failed

    return _with_client(conn, body)


@app.command
def top(
    *,
    all_jobs: Annotated[
        bool, Flag, Parameter(name="--all", help="Every user's jobs (viewer and admin only).")
    ] = False,
    interval: Annotated[
        str, Parameter(help="Time between refreshes, e.g. 2s or 500ms. Default: 2s.")
    ] = "2s",
    no_stream: Annotated[
        bool, Flag, Parameter(help="Print one sample (taken over a second) and exit.")
    ] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Show the CPU, memory and IO of your running jobs (with --all, everyone's), refreshed
    in place until Ctrl-C. CPU % is of one core."""
    try:
        interval_s = parse_duration(interval)
    except ValueError as exc:
        raise CliError(f"--interval: {exc}") from None
    if interval_s <= 0:
        raise CliError(f"--interval: must be more than 0, got {interval!r}")

    async def body(client: JobClient) -> int:
        interrupted = await _cancel_on_ctrl_c(
            lambda: run_top(
                client,
                all_jobs=all_jobs,
                interval_s=interval_s,
                stream=not no_stream,
                terminal=sys.stdout.isatty(),
                write=_write_text,
            )
        )
        return EXIT_INTERRUPTED if interrupted else 0

    return _with_client(conn, body)


@app.command(group="Setup")
def completion(
    shell: Annotated[Literal["bash", "zsh", "fish"], Parameter(name="SHELL")],
    /,
) -> int:
    """Print jobctl's completion script for SHELL to stdout, e.g. `source <(jobctl
    completion bash)` in ~/.bashrc (--install-completion writes it into place instead)."""
    _write_text(app.generate_completion(prog_name="jobctl", shell=shell))
    return 0


def job_exit_code(job: pb.JobStatus) -> int:
    """The exit code to pass on for an ended job: its own; 127 if it could not be created
    (as a shell says it); 1 if its end was not seen (lost with its server)."""
    if job.state == pb.JOB_STATE_ERROR:
        return EXIT_NOT_CREATED
    return job.exit_code if job.HasField("exit_code") else EXIT_RPC


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    conn: Connection = DEFAULT_CONNECTION,
) -> Any:
    # The connection options belong to every command and may come before or after its name.
    command, bound, ignored = app.parse_args(tokens, print_error=False, exit_on_error=False)
    reject_undecodable(bound.arguments.items())
    reject_undecodable([("conn", conn)])
    kwargs = dict(bound.kwargs)
    if "conn" in ignored:
        kwargs["conn"] = conn
    return command(*bound.args, **kwargs)


# The options of start and run that take a value, connection options included: where the
# job's command begins is the first token that is none of these options nor their values.
# (tests/cli/test_parsing.py checks this list against what cyclopts parses.)
START_VALUE_OPTIONS = frozenset(
    {"--cpu", "--memory", "--io-read", "--io-write", "--pids", "--io-read-iops",
     "--io-write-iops", "--env", "-e", "--cwd", "--network", "--name", "--server", "--cert",
     "--key", "--ca"}
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    tokens = end_options_at_command(
        sys.argv[1:] if argv is None else argv,
        commands=("start", "run"),
        value_options=START_VALUE_OPTIONS,
    )
    return run_cli(
        "jobctl",
        lambda: app.meta(
            tokens, print_error=False, exit_on_error=False, result_action="return_value"
        ),
        hint=_usage_hint,
    )


def _usage_hint(exc: CycloptsError) -> str:
    if isinstance(exc, UnknownOptionError) and exc.command_chain[-1:] in (("start",), ("run",)):
        return "jobctl's options go before CMD: jobctl run [OPTIONS] CMD [ARGS...]"
    return ""


# Python hands us arguments that are not UTF-8 with each bad byte as a lone surrogate; the API
# carries UTF-8 text only. Named here, before any call, rather than failing in the encoder.
_ARGUMENT_LABELS = {"job_id": "ID", "job_ids": "ID", "command": "CMD", "signal_name": "--signal"}


def reject_undecodable(arguments) -> None:
    """CliError (exit 2) naming the first argument that is not valid UTF-8, among a command's
    bound `(parameter, value)` pairs: strings, tuples of them, and option dataclasses."""
    for parameter, value in arguments:
        for label, text in _texts(parameter, value):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise CliError(f"{label} is not valid UTF-8: '{printable(text)}'") from None


def _texts(parameter: str, value: Any):
    label = _ARGUMENT_LABELS.get(parameter, "--" + parameter.replace("_", "-"))
    if isinstance(value, str):
        yield label, value
    elif isinstance(value, tuple):
        for position, item in enumerate(value, start=1):
            if isinstance(item, str):
                yield (f"the command's argument {position}" if parameter == "args" else label), item
    elif is_dataclass(value):
        for field in fields(value):
            yield from _texts(field.name, getattr(value, field.name))


# --- how the commands run --------------------------------------------------------------------


def _with_client(conn: Connection | None, body: Callable[[JobClient], Awaitable[int]]) -> int:
    async def session() -> int:
        # Ctrl-C is an event here, never a KeyboardInterrupt raised wherever the interpreter
        # happens to be: in the TLS handshake that was inside OpenSSL's verify callback, which
        # printed a traceback and failed the handshake instead of exiting 130. Commands with
        # their own Ctrl-C meaning (logs -f, run, wait, top) open their own receiver inside
        # this one, and the innermost receives.
        outcome = EXIT_INTERRUPTED

        async def connected() -> None:
            nonlocal outcome
            async with connect(conn or DEFAULT_CONNECTION) as client:
                outcome = await body(client)

        await _cancel_on_ctrl_c(connected)
        return outcome

    return trio.run(session)


async def _cancel_on_ctrl_c(work: Callable[[], Awaitable[Any]]) -> bool:
    """Run `work` until it returns or Ctrl-C arrives; True if Ctrl-C ended it."""
    interrupted = False
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await work()
            nursery.cancel_scope.cancel()
    return interrupted


async def _run_in_foreground(
    client: JobClient, request: pb.StartJobRequest, *, pass_stdin: bool = False
) -> int:
    job_id = (await client.start(request)).job_id
    presses = 0

    async def pass_on_stdin() -> None:
        # The next chunk is read while this one is sent (one chunk ahead, no more): a read
        # is a thread's round trip, and taking turns left both the thread and the connection
        # idle half the time.
        ahead, chunks = trio.open_memory_channel[bytes](0)

        read = _stdin_reader()

        async def read_ahead() -> None:
            async with ahead:
                while data := await read():
                    await ahead.send(data)

        async def next_chunk() -> bytes:
            try:
                return await chunks.receive()
            except trio.EndOfChannel:
                return b""

        async with trio.open_nursery() as reading:
            reading.start_soon(read_ahead)
            try:
                await client.write_input(job_id, next_chunk)
            except CliError as exc:
                # The job stopped reading (it ended, or closed its stdin): what `yes | head -1`
                # does, not an error. Anything else is said once; the job's end is reported.
                if not exc.answered:
                    _say(f"could not pass stdin to job {job_id}: {exc.message}")
            reading.cancel_scope.cancel()  # a read still blocked is abandoned with its thread

    async def stop(grace_s: float | None) -> None:
        try:
            await client.stop(job_id, grace_s)
        except CliError as exc:
            if not exc.answered:  # an answer can only be about the job ending meanwhile
                _say(f"could not stop job {job_id}: {exc.message}")

    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_ctrl_c() -> None:
                nonlocal presses
                async for _ in signals:
                    presses += 1
                    if presses == 1:
                        _say(f"stopping job {job_id} (Ctrl-C again to kill it at once)")
                        nursery.start_soon(stop, None)
                    elif presses == 2:
                        _say(f"killing job {job_id}")
                        nursery.start_soon(stop, 0.0)
                    else:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_ctrl_c)
            if pass_stdin:
                nursery.start_soon(pass_on_stdin)
            await client.logs(job_id, _write_chunk, follow=True)
            nursery.cancel_scope.cancel()
    if presses >= 3:
        _say(f"left without waiting; job {job_id} is being killed by the server")
        return EXIT_INTERRUPTED
    return _report_end(job_id, await client.status(job_id), stopped_here=presses > 0)


def _report_end(job_id: str, job: pb.JobStatus, *, stopped_here: bool) -> int:
    """`run`'s exit code for its ended job, after one line on stderr saying why it ended when
    its code does not (not for a stop this very run asked for: the user knows that one)."""
    cause = exit_cause(job)
    if cause and not (stopped_here and job.state == pb.JOB_STATE_STOPPED):
        _say(f"job {job_id} {cause}")
    return job_exit_code(job)


class _OutputWriter:
    """Writes a job's output chunks where they belong: its stdout to ours, its stderr to ours,
    byte-exact unless timestamps are asked for; what the server could not give is said on
    stderr instead, once per gap, and the output goes on after it."""

    def __init__(self, *, timestamps: bool = False) -> None:
        self._stamper = Stamper() if timestamps else None

    def __call__(self, chunk: pb.GetJobLogsResponse) -> None:
        # Blocking writes: this process does nothing else meanwhile, and a slow reader of our
        # stdout slows the server's stream down through HTTP/2 flow control, as it should.
        if chunk.dropped:
            # Never silent (the output's own streams stay byte-exact otherwise).
            _say(dropped_notice(chunk))
            if self._stamper is not None:
                self._stamper.resume()
            return
        target = sys.stderr if chunk.stream == pb.LOG_STREAM_STDERR else sys.stdout
        if chunk.lost:
            # Said where it was, on stderr, likewise.
            name = "stderr" if chunk.stream == pb.LOG_STREAM_STDERR else "stdout"
            _say(f"{chunk.lost} bytes of the job's {name} lost here (the server's disk was full)")
            return
        data = chunk.data if self._stamper is None else self._stamper.stamp(chunk)
        try:
            target.buffer.write(data)
            target.buffer.flush()
        except BrokenPipeError:
            _silence(target)
            raise CliError("", EXIT_BROKEN_PIPE) from None


_write_chunk = _OutputWriter()  # as `run` shows its job's output


def _write_text(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)
        raise CliError("", EXIT_BROKEN_PIPE) from None


def _silence(stream) -> None:
    # The reader went away (`jobctl logs ID | head`): the conventional quiet exit. Point the
    # descriptor at /dev/null so the interpreter's final flush does not complain either.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _say(message: str) -> None:
    say("jobctl", message)


if __name__ == "__main__":
    sys.exit(main())
