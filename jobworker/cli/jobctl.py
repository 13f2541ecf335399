"""`jobctl`: start, stop, inspect and follow jobs on a jobworker server.

    jobctl start [--cpu 0.5] [--memory 512M] [--io-read 50M] [--io-write 50M] [--pids N]
                 [--env K=V]... [--cwd DIR] [--network host|none] -- CMD [ARGS...]
                                                                  prints the job id alone
    jobctl stop ID [--grace 5s]
    jobctl status ID [--json]
    jobctl logs ID [-f]          stdout chunks to stdout, stderr chunks to stderr, byte-exact
    jobctl list [--all] [--state S]... [-n N] [-q] [--json]
    jobctl rm ID... [--force]    remove ended jobs (record, output, working directory)
    jobctl prune [--older-than 24h] [--all]
    jobctl run [limits] -- CMD [ARGS...]     start, follow, exit with the job's exit code

The connection options (--server, --cert, --key, --ca; JOBCTL_* variables; files in
~/.config/jobctl/) go before or after the command: see client.py. Errors are one line on
stderr; exit codes in errors.py.

Ctrl-C: `logs -f` stops following and exits 130; the job goes on. `run` is a foreground job:
the first Ctrl-C stops the job (the server's grace period, output still shown), the second
kills it at once (grace 0), a third leaves without waiting. `run` then exits with the job's
exit code (143 after SIGTERM, 137 after SIGKILL), or 127 if the job could not be created.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import trio
from cyclopts import App, CycloptsError, Parameter, UnknownOptionError

import jobworker
from jobworker._pb.jobworker.v1 import jobworker_pb2 as pb

from .client import Connection, JobClient, connect
from .errors import EXIT_INTERRUPTED, EXIT_RPC, CliError, run_cli, say
from .formatting import STATE_NAMES, format_list, format_status, to_json
from .parsing import parse_duration, parse_env, parse_size

EXIT_NOT_CREATED = 127  # as a shell reports a command it could not run
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

app = App(
    name="jobctl",
    help="Start, stop, inspect and follow jobs on a jobworker server.",
    version=jobworker.__version__,
)
app.register_install_completion_command(
    help="Install shell completion for jobctl (bash, zsh, fish).", group="Setup"
)

DEFAULT_CONNECTION = Connection()
ConnectionParameter = Annotated[Connection | None, Parameter(parse=False)]


@Parameter(name="*", group="Job")
@dataclass(frozen=True)
class JobOptions:
    """What to run the job with. Limits left out take the server's defaults."""

    cpu: Annotated[float | None, Parameter(help="CPU cores, e.g. 0.5.")] = None
    memory: Annotated[str | None, Parameter(help="Memory limit, e.g. 512M or 1G.")] = None
    io_read: Annotated[str | None, Parameter(help="Read bandwidth per second, e.g. 50M.")] = None
    io_write: Annotated[str | None, Parameter(help="Write bandwidth per second, e.g. 50M.")] = None
    pids: Annotated[int | None, Parameter(help="Maximum processes and threads.")] = None
    env: Annotated[
        tuple[str, ...],
        Parameter(name=["--env", "-e"], negative="", help="KEY=VALUE for the job's environment."),
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


_NETWORKS = {"host": pb.NETWORK_HOST, "none": pb.NETWORK_NONE}


def build_start_request(
    command: str, args: tuple[str, ...], options: JobOptions
) -> pb.StartJobRequest:
    """The StartJob request for a command line and its options; CliError (exit 2) for a
    malformed size or environment entry."""
    request = pb.StartJobRequest(command=command, args=list(args), working_dir=options.cwd or "")
    if options.network is not None:
        request.network = _NETWORKS[options.network]
    try:
        request.env.update(parse_env(list(options.env)))
    except ValueError as exc:
        raise CliError(f"--env: {exc}") from None
    limits = request.limits
    if options.cpu is not None:
        limits.cpu = options.cpu
    for flag, field_name, value in (
        ("--memory", "memory_bytes", options.memory),
        ("--io-read", "io_read_bytes_per_second", options.io_read),
        ("--io-write", "io_write_bytes_per_second", options.io_write),
    ):
        if value is not None:
            try:
                setattr(limits, field_name, parse_size(value))
            except ValueError as exc:
                raise CliError(f"{flag}: {exc}") from None
    if options.pids is not None:
        if options.pids < 0:
            raise CliError(f"--pids: must be a positive number, got {options.pids}")
        limits.pids = options.pids
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


@app.command
def start(
    command: Annotated[str, Parameter(name="CMD", help="The command to run.")],
    /,
    *args: Annotated[str, Parameter(name="ARGS", help="Its arguments (after --).")],
    options: JobOptions = JobOptions(),
    conn: ConnectionParameter = None,
) -> int:
    """Start a job and print its id. Put the command after --: jobctl start -- CMD ARGS..."""
    request = build_start_request(command, args, options)

    async def body(client: JobClient) -> int:
        _write_text(await client.start(request) + "\n")
        return 0

    return _with_client(conn, body)


@app.command
def stop(
    job_id: Annotated[str, Parameter(name="ID")],
    /,
    *,
    grace: Annotated[
        str | None,
        Parameter(help="Time between SIGTERM and SIGKILL, e.g. 5s. Default: the server's."),
    ] = None,
    conn: ConnectionParameter = None,
) -> int:
    """Stop a job: SIGTERM to all its processes, SIGKILL after the grace period. Returns once
    the job has ended."""
    grace_s = _grace_seconds(grace)

    async def body(client: JobClient) -> int:
        await client.stop(job_id, grace_s)
        return 0

    return _with_client(conn, body)


@app.command
def status(
    job_id: Annotated[str, Parameter(name="ID")],
    /,
    *,
    json: Annotated[bool, Parameter(negative="", help="The JobStatus message as JSON.")] = False,
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
    job_id: Annotated[str, Parameter(name="ID")],
    /,
    *,
    follow: Annotated[
        bool, Parameter(name=["--follow", "-f"], negative="", help="Follow until the job ends.")
    ] = False,
    conn: ConnectionParameter = None,
) -> int:
    """Write a job's output as it was produced: its stdout to stdout, its stderr to stderr."""

    async def body(client: JobClient) -> int:
        interrupted = await _cancel_on_ctrl_c(
            lambda: client.logs(job_id, _write_chunk, follow=follow)
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
        request.order_by = "created_at desc"

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
    job_ids: Annotated[tuple[str, ...], Parameter(name="ID")],
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
                if exc.exit_code != EXIT_RPC:
                    raise
                _say(exc.message)
                failed += 1
            else:
                _write_text(f"{job_id}\n")
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
    command: Annotated[str, Parameter(name="CMD", help="The command to run.")],
    /,
    *args: Annotated[str, Parameter(name="ARGS", help="Its arguments (after --).")],
    options: JobOptions = JobOptions(),
    conn: ConnectionParameter = None,
) -> int:
    """Start a job, follow its output, and exit with its exit code. Ctrl-C stops the job
    (twice: kills it at once)."""
    request = build_start_request(command, args, options)
    return _with_client(conn, lambda client: _run_in_foreground(client, request))


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    conn: Connection = DEFAULT_CONNECTION,
) -> Any:
    # The connection options belong to every command and may come before or after its name.
    command, bound, ignored = app.parse_args(tokens, print_error=False, exit_on_error=False)
    kwargs = dict(bound.kwargs)
    if "conn" in ignored:
        kwargs["conn"] = conn
    return command(*bound.args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        "jobctl",
        lambda: app.meta(
            argv, print_error=False, exit_on_error=False, result_action="return_value"
        ),
        hint=_usage_hint,
    )


def _usage_hint(exc: CycloptsError) -> str:
    if isinstance(exc, UnknownOptionError) and exc.command_chain[-1:] in (("start",), ("run",)):
        return "put the command after --: jobctl run [OPTIONS] -- CMD [ARGS...]"
    return ""


# --- how the commands run --------------------------------------------------------------------


def _with_client(conn: Connection | None, body: Callable[[JobClient], Awaitable[int]]) -> int:
    async def session() -> int:
        async with connect(conn or DEFAULT_CONNECTION) as client:
            return await body(client)

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


async def _run_in_foreground(client: JobClient, request: pb.StartJobRequest) -> int:
    job_id = await client.start(request)
    presses = 0

    async def stop(grace_s: float | None) -> None:
        try:
            await client.stop(job_id, grace_s)
        except CliError as exc:
            if exc.exit_code != EXIT_RPC:  # refused: it ended meanwhile, as we wanted
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
            await client.logs(job_id, _write_chunk, follow=True)
            nursery.cancel_scope.cancel()
    if presses >= 3:
        _say(f"left without waiting; job {job_id} is being killed by the server")
        return EXIT_INTERRUPTED
    job = await client.status(job_id)
    if job.state == pb.JOB_STATE_ERROR:
        _say(f"job {job_id} could not be created: {job.error or 'no reason given'}")
        return EXIT_NOT_CREATED
    if job.HasField("exit_code"):
        return job.exit_code
    raise CliError(
        f"job {job_id} ended without an exit code ({pb.JobState.Name(job.state)})", EXIT_RPC
    )


def _write_chunk(chunk: pb.LogChunk) -> None:
    # Blocking writes: this process does nothing else meanwhile, and a slow reader of our
    # stdout slows the server's stream down through HTTP/2 flow control, as it should.
    target = sys.stderr if chunk.stream == pb.LogChunk.STREAM_STDERR else sys.stdout
    if chunk.lost:
        # Never silent: the output the server could not keep is said where it was, on stderr
        # (the output's own streams stay byte-exact otherwise).
        name = "stderr" if chunk.stream == pb.LogChunk.STREAM_STDERR else "stdout"
        _say(f"{chunk.lost} bytes of the job's {name} lost here (the server's disk was full)")
        return
    try:
        target.buffer.write(chunk.data)
        target.buffer.flush()
    except BrokenPipeError:
        _silence(target)
        raise CliError("", EXIT_BROKEN_PIPE) from None


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
