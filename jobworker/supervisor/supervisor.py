"""The Supervisor: starts jobs, finds them, and owns every one of them until it exits."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType

import trio

from .cgroups import Backend, CgroupMode, JobGroup, open_backend
from .cgroups.discover import cgroup_filesystems
from .errors import CgroupError, InvalidJobSpec, JobFailed, JobNotEnded, JobNotFound
from .job import Job, JobSpec
from .limits import LimitOverrides, LimitPolicy, Limits
from .output import OutputLog
from .sandbox import (
    NETWORKS,
    CagePlan,
    Isolation,
    Network,
    UidPool,
    account,
    check_isolation_possible,
    mqueue_mount,
    paths_to_hide,
    this_process,
)
from .spawn import Spawned, SpawnError, spawn, spawn_caged
from .status import NAMESPACES, JobState, JobStatus, RunAs
from .stdin import PIPE, StdinSource, check_source, stdin_pipe

log = logging.getLogger("jobworker.supervisor")

# systemd's default PATH: what a job finds its commands with unless told otherwise.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GRACE_PERIOD_S = 10.0
DEFAULT_RETENTION_BYTES = 256 * 2**20
# How long leaving a Supervisor waits for the processes of ended jobs that outlived SIGKILL.
_LINGER_S = 1.0


class Supervisor:
    """Runs jobs as children of this process, each in its own cgroup, and supervises them.

        async with Supervisor() as sup:
            job = await sup.start("sh", ["-c", "echo hello"], owner="alice")
            async for chunk in job.output(follow=True):
                ...
            status = await job.wait()

    Leaving the block — normally, by exception or by cancellation — stops every running job
    (SIGTERM, grace period, SIGKILL of the whole group), waits for each, removes every cgroup
    and, when no data_dir was given, the private temporary directory. Nothing outlives it.

    - data_dir: where job output is kept (``<data_dir>/jobs/<id>/``), and jobs' own working
      directories (``<data_dir>/work/<id>/``, removed when the job ends); kept on exit when given.
    - limits: the defaults and maximums for jobs (a `Limits` sets defaults with no maximums).
    - cgroups: "auto" (v2 if usable, else v1), "v2", "v1", or "off" (no limits, only when
      asked for: the status of every job says so).
    - base_env: every job's environment before its own `env` is added; by default only PATH.
      Jobs never inherit the supervisor's environment (no secrets leak into jobs).
    - cwd: the working directory of jobs that do not name one; by default each job gets an
      empty one of its own, owned by its user.
    - isolation: an `Isolation`, True (the default settings) or False; by default isolated
      when running as root. An isolated job runs as a transient user of its own (or the account
      `start(user=...)` names) in namespaces of its own: see `sandbox.py`. Unisolated jobs run
      as this process's user, in its namespaces; their status says so (no namespaces).
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        limits: LimitPolicy | Limits | None = None,
        cgroups: CgroupMode = "auto",
        grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
        retention_bytes: int = DEFAULT_RETENTION_BYTES,
        base_env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        isolation: Isolation | bool | None = None,
    ) -> None:
        if isinstance(limits, Limits):
            limits = LimitPolicy(defaults=limits)
        if not math.isfinite(grace_period_s) or grace_period_s < 0:
            raise ValueError(f"grace_period_s must be a finite number >= 0, got {grace_period_s}")
        if retention_bytes < 1:
            raise ValueError(f"retention_bytes must be positive, got {retention_bytes}")
        self.policy = limits or LimitPolicy()
        self.grace_period_s = grace_period_s
        self.retention_bytes = retention_bytes
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self._cgroup_mode = cgroups
        self._base_env = dict(base_env) if base_env is not None else {"PATH": DEFAULT_PATH}
        self._cwd = os.fspath(cwd) if cwd is not None else None
        self._base_cwd = ""  # relative working directories are relative to this (set on entry)
        self._isolation_setting = isolation
        self._isolation: Isolation | None = None
        self._uids: UidPool | None = None
        self._lifeline: tuple[int, int] | None = None  # (read end for the cages, our end)
        self._hide: list[str] = []
        self._cgroupfs: list[tuple[Path, str, str]] = []
        self._mqueue: str | None = None
        self._jobs: dict[str, Job] = {}
        self._backend: Backend | None = None
        self._nursery_manager: trio.NurseryManager | None = None
        self._nursery: trio.Nursery | None = None
        self._data_dir: Path | None = None
        self._closing = False

    # --- lifetime ------------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> Supervisor:
        if self._nursery_manager is not None:
            raise RuntimeError("a Supervisor can be entered only once")
        self._base_cwd = os.getcwd()
        if self._given_data_dir is not None:
            self._data_dir = self._given_data_dir.absolute()
            (self._data_dir / "jobs").mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self._data_dir = Path(tempfile.mkdtemp(prefix="jobworker-"))
        (self._data_dir / "work").mkdir(exist_ok=True, mode=0o700)
        try:
            self._isolation = self._open_isolation()
            # JOBWORKER_CGROUP_TAG (letters and digits) joins the subtree's name, giving
            # jobworker-TAG-XXXXXXXX: how each of several servers or test runs on one machine
            # tells its own groups apart. Crash recovery goes by recorded paths, not by names.
            tag = os.environ.get("JOBWORKER_CGROUP_TAG", "")
            if tag and not (tag.isascii() and tag.isalnum() and len(tag) <= 32):
                raise CgroupError(f"JOBWORKER_CGROUP_TAG must be 1-32 letters or digits: {tag!r}")
            name = "-".join(["jobworker", *([tag] if tag else []), secrets.token_hex(4)])
            self._backend = open_backend(self._cgroup_mode, name)
            self._nursery_manager = trio.open_nursery()
            self._nursery = await self._nursery_manager.__aenter__()
        except BaseException:
            await self._release()
            raise
        log.info("supervisor: cgroups %s, data in %s", self._backend.kind, self._data_dir)
        return self

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery_manager is not None
        self._closing = True
        body_error = exc
        try:
            # Stop jobs while their trees are still whole (pumps keep draining during the grace
            # period), whatever brought us here. Bounded: grace period plus the kill wait.
            with trio.CancelScope(shield=True):
                await self._stop_all()
                # Every job has ended. A job whose processes outlived SIGKILL still waits for
                # them (to remove its group): a moment more, then that must not keep us here.
                with trio.move_on_after(_LINGER_S):
                    for job in list(self._jobs.values()):
                        await job.released()
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
        except BaseException as interrupted:
            # Ctrl-C while stopping: the nursery below must still be unwound, which cancels the
            # job trees, and each stops its job in its own bounded, shielded cleanup.
            exc_type, exc, tb = type(interrupted), interrupted, interrupted.__traceback__
        try:
            suppress = await self._nursery_manager.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The nursery is ours, the body is the caller's: when the only thing wrong is
            # one exception, give it back as it was rather than wrapped in a group.
            if exc is None or _sole_exception(group) is not exc:
                raise
            suppress = False
        finally:
            with trio.CancelScope(shield=True):
                await self._release()
        if exc is not body_error and exc is not None and not suppress:
            raise exc  # the interruption while stopping (returning False would re-raise the body's)
        return suppress

    async def _stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                nursery.start_soon(partial(job.stop, requested_by="supervisor shutdown"))

    def _open_isolation(self) -> Isolation | None:
        setting = self._isolation_setting
        if setting is None:
            setting = os.geteuid() == 0
        if setting is False:
            return None
        isolation = setting if isinstance(setting, Isolation) else Isolation()
        check_isolation_possible()
        self._uids = UidPool(isolation.transient_uids, isolation.lock_file)
        self._uids.open()
        self._lifeline = os.pipe2(os.O_CLOEXEC)
        assert self._data_dir is not None
        self._hide = paths_to_hide(self._data_dir, isolation.hide)
        self._cgroupfs = cgroup_filesystems()
        self._mqueue = mqueue_mount()
        return isolation

    async def _release(self) -> None:
        try:
            if self._backend is not None:
                await self._backend.aclose()
        finally:
            if self._uids is not None:
                self._uids.close()
            if self._lifeline is not None:
                for fd in self._lifeline:
                    os.close(fd)
                self._lifeline = None
            if self._given_data_dir is None and self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)

    # --- jobs ----------------------------------------------------------------------------------

    @property
    def cgroups(self) -> str:
        """The backend in use: "v2", "v1" or "off"."""
        return self._backend.kind if self._backend is not None else self._cgroup_mode

    @property
    def isolation(self) -> Isolation | None:
        """How jobs are isolated; None when they are not (once entered)."""
        return self._isolation

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the Supervisor has not been entered")
        return self._data_dir

    @trio.lowlevel.enable_ki_protection  # Ctrl-C arrives at a checkpoint, never mid-bookkeeping
    async def start(
        self,
        command: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        args: Sequence[str | os.PathLike[str]] = (),
        *,
        stdin: StdinSource = None,
        owner: str = "",
        limits: LimitOverrides | Limits | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        user: str | int | None = None,
        network: Network = "host",
        job_id: str | None = None,
        name: str = "",
    ) -> Job:
        """Start a new job, and return it once it runs in its group.

        The command is the whole argv as a sequence, as trio.run_process takes it
        (``start(["echo", "hi"])``), or the program with its arguments apart
        (``start("echo", ["hi"])``); never through a shell.

        - stdin: None, /dev/null; bytes, written to the job and then closed (EOF); a
          trio.abc.ReceiveStream, read until its EOF and written to the job by the job's own
          tree (not closed: it is the caller's); or subprocess.PIPE: write `Job.stdin`, a
          trio SendStream, yourself. A job that stops reading holds its writer back (a pipe,
          nothing buffered beyond it); what it no longer reads is dropped (fed input), or
          raises trio.BrokenResourceError (`Job.stdin`).
        - user: the local account (name or uid; 0 or "root" for root) an isolated job runs as;
          None: a transient user of its own. Unisolated jobs run as this process's user.
        - network: "host" (this machine's network) or "none" (a loopback of its own; isolated
          jobs only).
        - job_id: the id to give the job (a canonical UUID no job of this Supervisor has; one
          that a store recorded before the job started); None: a new random UUID.
        - name: a label for the job, shown in its status; the Supervisor neither checks nor
          uses it (a server keeps names unique per owner).

        A job that cannot be created (command not found or not executable, a bad working
        directory, cgroup or cage setup failing) is returned in state ERROR with the reason in
        its status. Invalid arguments raise InvalidJobSpec.
        """
        if self._nursery is None or self._backend is None or self._closing:
            raise RuntimeError("the Supervisor is not running (use `async with Supervisor()`)")
        source = check_source(stdin)
        spec = self._spec(command, args, owner, limits, env, cwd, user, network)
        spec = dataclasses.replace(spec, name=name)
        job_id = self._new_id(job_id)
        held = _Held(self._uids)
        try:
            spec = self._give_identity(spec, job_id, held)
        except BaseException:
            await held.release()
            raise
        output = OutputLog(self.data_dir / "jobs" / job_id, retention_bytes=self.retention_bytes)
        job = Job(
            job_id,
            spec,
            output=output,
            cgroups=self._backend.kind,
            grace_period_s=self.grace_period_s,
            caveats=self._backend.caveats,
            release=held.release,
            stdin=source,
        )
        self._jobs[job_id] = job
        try:
            group = self._backend.create(job_id, spec.limits, spec.cwd)
        except CgroupError as exc:
            with trio.CancelScope(shield=True):
                await held.release()
            job.fail_creation(f"cgroup setup failed: {exc}")
            return job
        except BaseException:
            # Not the job's fate but a bug or a cancellation: the caller never saw this job.
            del self._jobs[job_id]
            output.remove()
            with trio.CancelScope(shield=True):
                await held.release()
            raise
        job_end = our_end = None
        try:
            if source is not None:
                job_end, our_end = stdin_pipe()
            try:
                spawned = await self._spawn(
                    spec, group, own_workdir=held.workdir is not None, stdin=job_end
                )
            finally:
                if job_end is not None:
                    os.close(job_end)  # the job has its copy: writers get EPIPE once it is gone
        except BaseException as exc:
            if our_end is not None:
                os.close(our_end)
            # No process exists (a cancellation can only arrive before Popen runs, or is
            # handled by the cage's spawn, which ends the cage): undo the group. A spawn
            # failure is the job's fate; anything else is the caller's, and the caller never
            # saw this job, so it is forgotten.
            with trio.CancelScope(shield=True):
                await group.remove()
                await held.release()
            if not isinstance(exc, SpawnError):
                del self._jobs[job_id]
                output.remove()
                raise
            job.fail_creation(exc.reason)
            return job
        # No checkpoint between the spawn and handing the process to its tree: a cancellation
        # here cannot orphan it.
        job.started(spawned, group, stdin_fd=our_end)
        self._nursery.start_soon(self._run_job, job, spawned)
        return job

    async def run(
        self,
        command: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        args: Sequence[str | os.PathLike[str]] = (),
        *,
        check: bool = True,
        stdin: bytes | bytearray | memoryview | trio.abc.ReceiveStream | None = None,
        **options: object,
    ) -> JobStatus:
        """Start a job and wait until it has ended, as trio.run_process does: its final status.

        With `check` (the default), a job that did not finish with exit code 0 raises JobFailed,
        whose `status` and message carry the cause (exit code, signal, OOM kill, pids limit,
        who stopped it, or why it could not be created). `options` are `start`'s.

        Cancelling `run` stops the job (SIGTERM, grace period, SIGKILL) and waits for its end
        before the cancellation goes on: the caller holds no handle to the job, so nothing
        else would. (Cancelling `Job.wait` leaves the job running: its handle is yours.)

        Output is not captured into memory: the job's output log keeps it, bounded by
        retention, for ``sup.get(status.id).output()`` to read, as long as the job is not
        forgotten.
        """
        if isinstance(stdin, int) and stdin == PIPE:
            raise InvalidJobSpec(
                "run() gives no handle to write the job's stdin with: pass bytes or a stream, "
                "or use start(stdin=subprocess.PIPE)"
            )
        job = await self.start(command, args, stdin=stdin, **options)  # type: ignore[arg-type]
        try:
            status = await job.wait()
        except BaseException:
            with trio.CancelScope(shield=True):  # bounded: the grace period and the kill wait
                await job.stop(requested_by="cancellation")
            raise
        if check and status.state is not JobState.FINISHED:
            raise JobFailed(status)
        return status

    def _give_identity(self, spec: JobSpec, job_id: str, held: _Held) -> JobSpec:
        """The job's user (a transient uid from the pool when it names none) and, unless it
        chose one, a working directory of its own, owned by that user; added to `held`."""
        run_as = spec.run_as
        if self._isolation is not None and run_as.transient:
            assert self._uids is not None
            uid = self._uids.acquire()  # TransientUsersExhausted when every uid is taken
            held.uid = uid
            run_as = RunAs(uid=uid, gid=uid, transient=True)
        cwd = spec.cwd
        if not cwd:
            workdir = self.data_dir / "work" / job_id
            os.mkdir(workdir, 0o700)
            held.workdir = workdir
            os.chown(workdir, run_as.uid, run_as.gid)
            cwd = os.fspath(workdir)
        if run_as.transient:
            run_as = dataclasses.replace(run_as, home=cwd)
        env = dict(spec.env)
        if self._isolation is not None:
            # What a login would set, unless the caller did: programs look for a home.
            defaults = {"HOME": run_as.home or cwd}
            if run_as.name:
                defaults |= {"USER": run_as.name, "LOGNAME": run_as.name}
            env = defaults | env
        return dataclasses.replace(spec, run_as=run_as, cwd=cwd, env=env)

    async def _spawn(
        self, spec: JobSpec, group: JobGroup, *, own_workdir: bool, stdin: int | None
    ) -> Spawned:
        if self._isolation is None:
            return await spawn(
                (spec.command, *spec.args),
                env=spec.env,
                cwd=spec.cwd,
                procs_files=group.procs_files,
                stdin=stdin,
            )
        assert self._lifeline is not None
        plan = CagePlan(
            argv=(spec.command, *spec.args),
            cwd=spec.cwd,
            run_as=spec.run_as,
            network=spec.network,  # type: ignore[arg-type]
            cgroup_procs=group.procs_files,
            cgroupfs=self._cgroupfs if group.procs_files else (),
            hide=self._hide,
            # Its own working directory lies in the covered data directory: bring it back.
            bind=[spec.cwd] if own_workdir else [],
            mqueue=self._mqueue,
        )
        return await spawn_caged(plan, env=spec.env, lifeline_fd=self._lifeline[0], stdin=stdin)

    async def _run_job(self, job: Job, spawned: Spawned) -> None:
        # The containment boundary: the job's tree has already cleaned up after itself on its
        # way out; whatever went wrong in it ends that job, never the Supervisor and its other
        # jobs. Cancellation is a BaseException and passes through.
        try:
            await job.run(spawned)
        except Exception:
            log.exception("job %s: supervision failed", job.id)

    def _new_id(self, job_id: str | None) -> str:
        if job_id is None:
            return str(uuid.uuid4())
        try:
            canonical = str(uuid.UUID(job_id))
        except (ValueError, TypeError, AttributeError):
            raise InvalidJobSpec(f"job_id must be a UUID, not {job_id!r}") from None
        if canonical != job_id:
            raise InvalidJobSpec(f"job_id must be a canonical UUID, not {job_id!r}")
        if job_id in self._jobs or (self.data_dir / "jobs" / job_id).exists():
            raise InvalidJobSpec(f"job_id {job_id} is in use")
        return job_id

    def forget(self, job_id: str) -> None:
        """Drop an ended job from this Supervisor's memory (`get` and `jobs` no longer know
        it). Its output stays on disk: `stored_output` reads it, `remove_output` deletes it.
        For a caller that keeps its own records of ended jobs (a server's store)."""
        job = self.get(job_id)
        if not job.status().state.ended:
            raise JobNotEnded(job_id)
        del self._jobs[job_id]

    def stored_output(self, job_id: str) -> OutputLog:
        """The output of a job this Supervisor's data directory holds, forgotten or from an
        earlier run, read from its files (closed). FileNotFoundError if none is kept."""
        return OutputLog.reopen(self.data_dir / "jobs" / job_id)

    def remove_output(self, job_id: str) -> None:
        """Delete what a job left in the data directory: its output, and its working directory
        if any. The job must not be running here."""
        if job_id in self._jobs and not self._jobs[job_id].status().state.ended:
            raise JobNotEnded(job_id)
        for directory in (self.data_dir / "jobs" / job_id, self.data_dir / "work" / job_id):
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def cgroup_subtrees(self) -> list[Path]:
        """The cgroup directories this Supervisor made, one per hierarchy: every job's group
        is ``<subtree>/<job id>``. What a server records to clean up after a crash."""
        return list(self._backend.subtrees) if self._backend is not None else []

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    def jobs(self, owner: str | None = None) -> list[Job]:
        """Every job (or every job of `owner`), oldest first."""
        return [j for j in self._jobs.values() if owner is None or j.owner == owner]

    def _spec(
        self,
        command: object,
        args: object,
        owner: str,
        limits: LimitOverrides | Limits | None,
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        user: str | int | None,
        network: str,
    ) -> JobSpec:
        argv = _argv(command, args)
        job_env = dict(self._base_env)
        for key, value in (env or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidJobSpec("environment names and values must be strings")
            if not key or "=" in key or "\0" in key:
                raise InvalidJobSpec(f"invalid environment variable name {key!r}")
            if "\0" in value:
                raise InvalidJobSpec(f"the environment variable {key} contains a NUL byte")
            job_env[key] = value
        if self._backend is not None and self._backend.kind == "off":
            if limits is not None:
                raise InvalidJobSpec(
                    "limits cannot be applied: this Supervisor runs without cgroups"
                )
            resolved = None
        else:
            resolved = self.policy.resolve(limits)
        if cwd is not None and "\0" in os.fsdecode(cwd):
            raise InvalidJobSpec("the working directory cannot contain NUL bytes")
        if cwd is not None:
            job_cwd = os.path.join(self._base_cwd, os.fspath(cwd))
        else:
            job_cwd = self._cwd or ""  # empty: a working directory of its own
        if network not in NETWORKS:
            raise InvalidJobSpec(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
        namespaces: tuple[str, ...] = ()
        if self._isolation is None:
            if user is not None:
                raise InvalidJobSpec(
                    "running a job as another user needs isolation, and this Supervisor "
                    "runs jobs unisolated"
                )
            if network != "host":
                raise InvalidJobSpec(
                    "network none needs isolation, and this Supervisor runs jobs unisolated"
                )
            run_as = this_process()
        else:
            # A transient user's uid is taken from the pool only once the spec is valid.
            run_as = RunAs(uid=-1, gid=-1, transient=True) if user is None else account(user)
            wanted = {"pid", "mount", "ipc", "uts"}
            if self.cgroups != "off":
                wanted.add("cgroup")
            if network == "none":
                wanted.add("net")
            namespaces = tuple(n for n in NAMESPACES if n in wanted)
        return JobSpec(
            command=argv[0],
            args=argv[1:],
            owner=owner,
            env=job_env,
            cwd=job_cwd,
            limits=resolved,
            run_as=run_as,
            network=network,
            namespaces=namespaces,
        )


class _Held:
    """What one job holds beyond its group, released once when it has ended (or never ran)."""

    def __init__(self, uids: UidPool | None) -> None:
        self._uids = uids
        self.uid: int | None = None
        self.workdir: Path | None = None

    async def release(self) -> None:
        # The uid goes back only once nothing of the job can still use it: the caller calls
        # this after the job's last process is gone (for a caged job, the keeper's exit).
        workdir, self.workdir = self.workdir, None
        try:
            if workdir is not None:
                await trio.to_thread.run_sync(_remove_tree, workdir)
        finally:
            if self.uid is not None and self._uids is not None:
                self._uids.release(self.uid)
                self.uid = None


def _remove_tree(path: Path) -> None:
    # shutil.rmtree never follows symlinks (it works on directory fds), so a job cannot point
    # it at anything outside its own working directory.
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _argv(command: object, args: object) -> tuple[str, ...]:
    """The job's argv from `start`'s two forms, or InvalidJobSpec naming what is wrong.
    Path-like items are taken as their path (trio does too); bytes are not (argv is text
    here: a status shows it, a server sends it)."""
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise InvalidJobSpec(f"args must be a sequence of strings, not {type(args).__name__}")
    if isinstance(command, (str, os.PathLike)):
        items: Sequence[object] = (command, *args)
    elif isinstance(command, Sequence) and not isinstance(command, (bytes, bytearray)):
        if args:
            raise InvalidJobSpec(
                "the command is a sequence, the whole argv: put its arguments in it, not in args"
            )
        if not command:
            raise InvalidJobSpec("the command is an empty sequence: it needs a program to run")
        items = command
    else:
        raise InvalidJobSpec(
            f"the command must be a string or a sequence of strings, not {type(command).__name__}"
        )
    argv = []
    for index, item in enumerate(items):
        text = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(text, str):
            raise InvalidJobSpec(f"argv[{index}] must be a string, not {type(item).__name__}")
        if "\0" in text:
            raise InvalidJobSpec(f"argv[{index}] contains a NUL byte: {text!r}")
        argv.append(text)
    if not argv[0]:
        raise InvalidJobSpec("the command must be a non-empty string (argv[0] is empty)")
    return tuple(argv)


def _sole_exception(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
