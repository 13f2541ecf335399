"""One job: its process, its group, its output, and the nursery tree that owns them.

Theory of operation
-------------------
`Supervisor.start` creates the group (cgroups, limits) and spawns the process *outside* the
job's tree, so creation failures become a job in state ERROR at once. Then the Supervisor's
nursery runs `Job.run`, the job's own tree:

    Job.run
    ├── pumps nursery:  stdout pump, stderr pump      (pipe → OutputLog until EOF)
    │   └── life nursery: waiter (process.wait), escalation watchdog (SIGTERM → grace → SIGKILL),
    │                     stdin feeder (bytes or a stream → the job's stdin, then EOF; if any)
    └── finally, shielded: escalate if still alive, kill stragglers, wait for the group to empty,
        read the exit cause and usage, remove the group, close the log, mark the job ended.

The feeder lives only as long as the leader: once it has exited, nothing will read the rest.
The job ends when its leader exits. Anything it left behind in the group (a daemonized
grandchild, a background helper) is killed right then, which also closes the last copies of
the pipes so the pumps see EOF: output is complete when the status says "ended".

Nothing here blocks on readers: pumps append to the log, which never waits for anyone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from .cgroups import JobGroup
from .errors import CgroupError, JobEnded
from .escalation import Escalation
from .limits import Limits
from .output import OutputLog, OutputReader, OutputStream
from .spawn import Spawned
from .status import JobState, JobStatus, RunAs, Usage, exit_code_of, signal_name
from .stdin import PIPE, JobStdin, feed

log = logging.getLogger("jobworker.supervisor")

# Bounds on the cleanup that runs shielded from cancellation. A process in uninterruptible
# sleep (D state) can outlive SIGKILL; we will not hang a shutdown on it forever.
_KILL_WAIT_S = 10.0
_READ_CHUNK_BYTES = 256 * 2**10
# After the kill, how long the pipes may stay open before we look for who holds them. A dying
# process closes its files within milliseconds; the wait is for processes the kill missed.
_PIPE_EOF_WAIT_S = 1.0
# After a stop's SIGKILL to a caged job's group: how long its init gets to report the job's end
# before the whole PID namespace is killed (which would lose that report).
_NAMESPACE_KILL_DELAY_S = 1.0


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What was asked for, resolved: the command, its environment, where, and within what."""

    command: str
    args: tuple[str, ...]
    owner: str
    env: Mapping[str, str]
    cwd: str
    limits: Limits | None  # None when the Supervisor runs without cgroups
    run_as: RunAs
    network: str = "host"
    namespaces: tuple[str, ...] = ()  # empty: unisolated
    name: str = ""  # the caller's label for it; the Supervisor gives it no meaning


class Job:
    """A handle on one job. Obtain it from `Supervisor.start`, `get` or `jobs`."""

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        output: OutputLog,
        cgroups: str,
        grace_period_s: float,
        caveats: tuple[str, ...] = (),
        release: Callable[[], Awaitable[None]] | None = None,
        stdin: bytes | trio.abc.ReceiveStream | int | None = None,
    ) -> None:
        self.id = job_id
        self.spec = spec
        self._log = output
        self._cgroups = cgroups
        self._caveats = caveats
        self._default_grace_s = grace_period_s
        self._state = JobState.RUNNING
        self._created_at = _now()
        self._started_at: datetime | None = None
        self._ended_at: datetime | None = None
        self._pid: int | None = None
        self._returncode: int | None = None
        self._error: str | None = None
        self._stop_requested_by: str | None = None
        self._oom_killed = False
        self._pids_limit_hit = False
        self._usage = Usage()
        self._output_lost = False
        self._drained = False  # both pipes reached EOF
        self._survivors: tuple[int, ...] = ()
        self._release = release  # what the job held beyond its group (working dir, uid)
        self._spawned: Spawned | None = None
        self._group: JobGroup | None = None
        self._escalation: Escalation | None = None
        self._exited = trio.Event()  # the leader has exited
        self._ended = trio.Event()  # everything is done: output complete, group removed
        # Processes outlived SIGKILL: the group and what the job held wait for them to go.
        self._lingering = False
        self._released = trio.Event()  # run() has returned: nothing of the job is left
        # What the job's tree feeds into its stdin, once; PIPE: the caller writes `stdin`.
        self._stdin_source = stdin if isinstance(stdin, (bytes, trio.abc.ReceiveStream)) else None
        self._stdin_wanted = stdin is not None
        self._stdin_for_caller = isinstance(stdin, int) and stdin == PIPE
        self._stdin: JobStdin | None = None

    @property
    def stdin(self) -> JobStdin | None:
        """The job's stdin to write, for a job started with ``stdin=subprocess.PIPE``; None
        otherwise. A job that could not be created has one that raises BrokenResourceError."""
        return self._stdin if self._stdin_for_caller else None

    @property
    def owner(self) -> str:
        return self.spec.owner

    # --- what callers use --------------------------------------------------------------------

    def status(self) -> JobStatus:
        """A snapshot. While running, usage is read live from the cgroup."""
        usage = self._usage
        if self._state is JobState.RUNNING and self._group is not None:
            try:
                usage = self._group.usage()
            except OSError:
                pass  # the group is being removed right now; the final figures follow
        exit_code = signum = None
        if self._returncode is not None and self._state.ended:
            exit_code, signum = exit_code_of(self._returncode)
        return JobStatus(
            id=self.id,
            owner=self.spec.owner,
            command=self.spec.command,
            args=self.spec.args,
            state=self._state,
            created_at=self._created_at,
            pid=self._pid,
            started_at=self._started_at,
            ended_at=self._ended_at if self._state.ended else None,
            exit_code=exit_code,
            signal=signum,
            error=self._error,
            stop_requested_by=self._stop_requested_by,
            escalated=self._escalation is not None and self._escalation.escalated,
            oom_killed=self._oom_killed,
            pids_limit_hit=self._pids_limit_hit,
            limits=self.spec.limits,
            cgroups=self._cgroups,
            usage=usage,
            limit_caveats=self._caveats,
            output_lost_bytes=self._log.lost_bytes,
            run_as=self.spec.run_as,
            namespaces=self.spec.namespaces,
            network=self.spec.network,
            survivors=self._survivors,
            name=self.spec.name,
        )

    def output(
        self, offset: int = 0, *, follow: bool = False, max_chunk_bytes: int = 64 * 2**10
    ) -> OutputReader:
        """Chunks of output from `offset`: history first, then (with follow) live until the job
        has ended and everything is delivered. Output retention dropped before a reader got to it
        is one chunk with ``dropped`` set, and the reader goes on from what is kept."""
        return self._log.reader(offset, follow=follow, max_chunk_bytes=max_chunk_bytes)

    async def stop(
        self, grace_period_s: float | None = None, *, requested_by: str | None = None
    ) -> JobStatus:
        """SIGTERM every process of the job, SIGKILL the whole group after the grace period,
        wait until the job has ended, and return its final status.

        Safe to call concurrently: the first call signals; a later one with a shorter grace
        period brings the SIGKILL closer. A job that has already ended (or could not be
        created) is left as it is: its final status is returned, its cause unchanged.
        """
        try:
            self.request_stop(grace_period_s, requested_by=requested_by)
        except JobEnded:
            pass  # ended, or ending (its leader has exited): the final status follows
        return await self.wait()

    def request_stop(
        self, grace_period_s: float | None = None, *, requested_by: str | None = None
    ) -> None:
        """What `stop` does before it waits: SIGTERM now, SIGKILL after the grace period.
        For a caller that records the request before it waits for the end."""
        if grace_period_s is None:
            grace_period_s = self._default_grace_s
        if grace_period_s < 0:
            raise ValueError(f"grace period must be >= 0 s, got {grace_period_s}")
        if self._state.ended or self._exited.is_set() or self._escalation is None:
            raise JobEnded(self.id, self._state.value if self._state.ended else "ending")
        if not self._escalation.requested:
            self._stop_requested_by = requested_by
            log.info("job %s: stop requested by %s", self.id, requested_by or "(library)")
        self._escalation.request(grace_period_s)

    def signal(self, signum: int) -> None:
        """Send `signum` once to every process of the job, and nothing more: no escalation,
        and the job's end is reported as it happens (killed by this signal, say: not
        "stopped", since `stop` was not asked for). Raises JobEnded once the job's leader
        has exited (what is left of the job is being killed), ValueError for a number that
        is not a signal.

        Every process is reached through the job's group, which holds the job's processes
        and nothing else: for a caged job not its init, which stays outside (cage.c). An
        init is the one process that signals without a handler of its own do not reach, so
        signalling it would do nothing, and would leave its children unaware. Like any
        signal loop, a process forked meanwhile may miss it (only `stop`'s kill cannot be
        escaped); without cgroups, the group is the leader's process group.
        """
        if signum not in signal.valid_signals():
            raise ValueError(f"{signum} is not a signal number")
        group = self._group
        if self._state.ended or self._exited.is_set() or group is None:
            raise JobEnded(self.id, self._state.value if self._state.ended else "ending")
        try:
            group.signal(signum)
        except OSError as exc:  # the group's listing is gone: removed behind our back
            raise CgroupError(f"cannot signal the processes of job {self.id}: {exc}") from exc
        log.info("job %s: sent %s", self.id, signal_name(signum))

    async def wait(self) -> JobStatus:
        """Wait until the job has ended (output complete, group removed); its final status."""
        await self._ended.wait()
        return self.status()

    @property
    def output_stored_bytes(self) -> int:
        """Output this job keeps on disk (what a data directory's budget counts)."""
        return self._log.stored_bytes

    @property
    def output_end(self) -> int:
        """The offset just past the job's output so far."""
        return self._log.end_offset

    def trim_output(self, bytes_to_free: int) -> int:
        """Drop the job's oldest output (whole segments, as retention does); bytes freed."""
        return self._log.trim(bytes_to_free)

    async def released(self) -> None:
        """Wait until nothing of the job is left: after it ended, the processes that outlived
        its kill (see `JobStatus.survivors`), if any, are gone and its group removed."""
        await self._released.wait()

    # --- what the Supervisor uses ------------------------------------------------------------

    def fail_creation(self, reason: str) -> None:
        """The job could not be created: it is an ERROR job from the start."""
        self._state = JobState.ERROR
        self._error = reason
        self._ended_at = self._created_at
        if self._stdin_wanted:
            self._stdin = JobStdin(self.id, None)
        self._log.close()
        self._ended.set()
        self._released.set()
        log.warning("job %s: could not be created: %s", self.id, reason)

    def started(self, spawned: Spawned, group: JobGroup, stdin_fd: int | None = None) -> None:
        """The job runs; `stdin_fd` is the write end of its stdin pipe, now the job's to own."""
        if stdin_fd is not None:
            self._stdin = JobStdin(self.id, stdin_fd)
        self._spawned = spawned
        self._group = group
        self._escalation = Escalation(_KillTarget(self, group))
        self._pid = spawned.pid
        self._started_at = _now()
        group.attach(spawned.pid)
        log.info(
            "job %s: started pid %d for %s: %s",
            self.id,
            self._pid,
            self.spec.owner or "(no owner)",
            shlex.join((self.spec.command, *self.spec.args)),
        )

    async def run(self, spawned: Spawned) -> None:
        """The job's tree. Runs in the Supervisor's nursery until the job has ended."""
        group, escalation = self._group, self._escalation
        assert group is not None and escalation is not None
        try:
            await self._supervise(spawned, group, escalation)
        finally:
            with trio.CancelScope(shield=True):
                if not self._drained:
                    # Cancelled mid-job (the Supervisor is going down hard). Stop the job the
                    # usual way and keep pumping meanwhile — a job whose pipe stops being read
                    # would block, or die of SIGPIPE, in its own SIGTERM handler. Bounded.
                    if not self._exited.is_set():
                        self._stop_requested_by = self._stop_requested_by or "cancellation"
                        escalation.request(self._default_grace_s)
                    with trio.move_on_after(self._default_grace_s + _KILL_WAIT_S):
                        await self._supervise(spawned, group, escalation)
                await self._finish(spawned, group)
        try:
            if self._lingering:
                await self._linger(spawned, group)
        finally:
            self._released.set()

    async def _linger(self, spawned: Spawned, group: JobGroup) -> None:
        """The job was reported ended without processes that outlived SIGKILL (uninterruptible
        sleep, a frozen cgroup): reap them when they go, then remove the group and release the
        job's uid, which until then is still in use. The Supervisor cancels this on closing."""
        try:
            await spawned.process.wait()  # for a caged job: its whole PID namespace is gone
            await group.wait_empty()
            await group.remove()
            await self._release_held()
        except BaseException:
            log.error(
                "job %s: processes that outlived SIGKILL (%s) still hold its cgroup and user",
                self.id,
                ", ".join(map(str, self._survivors)) or "unknown pids",
            )
            raise
        log.warning("job %s: what outlived its kill has gone; its group is removed", self.id)

    async def _supervise(self, spawned: Spawned, group: JobGroup, escalation: Escalation) -> None:
        """Pump output until EOF; wait for the leader, with the stop watchdog beside it.

        Resumable: a cancelled pump has consumed nothing it did not append, so running this
        again after a cancellation continues exactly where it stopped.
        """
        drained = _Countdown(2)
        async with trio.open_nursery() as pumps:
            pumps.start_soon(self._pump, spawned.stdout, OutputStream.STDOUT, drained)
            pumps.start_soon(self._pump, spawned.stderr, OutputStream.STDERR, drained)
            if not self._exited.is_set():
                async with trio.open_nursery() as life:
                    life.start_soon(self._escalate, escalation, life.cancel_scope, spawned)
                    source, self._stdin_source = self._stdin_source, None
                    if source is not None and self._stdin is not None:
                        # Once: supervision resumed after a cancellation does not feed again
                        # (the feeder closed the job's stdin on its way out).
                        life.start_soon(feed, self.id, source, self._stdin)
                    await spawned.process.wait()
                    self._leader_exited(spawned)
                    life.cancel_scope.cancel()
                if not self._exited.is_set():
                    self._give_up_on_leader(spawned)
            # The leader is gone; so must be everything it left behind, or a straggler
            # holding a pipe would keep the job "running" forever.
            await self._kill_group(group)
            # Every process that could hold the pipes is dead now, unless one escaped the
            # group (root, unisolated): then the pumps get a bounded wait, not forever.
            pumps.cancel_scope.deadline = trio.current_time() + _KILL_WAIT_S
            with trio.move_on_after(_PIPE_EOF_WAIT_S) as quick:
                await drained.wait()
            if quick.cancelled_caught:
                self._kill_pipe_holders(spawned)
        if pumps.cancel_scope.cancelled_caught:
            self._give_up_on_survivors(spawned)
        self._drained = True

    async def _escalate(
        self, escalation: Escalation, life: trio.CancelScope, spawned: Spawned
    ) -> None:
        await escalation.run(self._exited)  # returns once it has sent SIGKILL to the group
        if spawned.caged:
            # The group's SIGKILL leaves the cage's init alive to report how the job ended
            # (killed by the stop's SIGTERM, maybe, before the SIGKILL). Only what the group
            # missed (a root job's process that left it) needs the whole namespace killed.
            with trio.move_on_after(_NAMESPACE_KILL_DELAY_S):
                await self._exited.wait()
            self._kill_outside_group()
        # A killed process is normally reaped within milliseconds; one that is not (it sleeps
        # uninterruptibly, or sits in a frozen cgroup) must not hold the stop forever.
        life.deadline = trio.current_time() + _KILL_WAIT_S

    def _give_up_on_leader(self, spawned: Spawned) -> None:
        log.error(
            "job %s: its leader %d outlived SIGKILL by %g s; reporting the job ended without it",
            self.id,
            spawned.pid,
            _KILL_WAIT_S,
        )
        self._ended_at = _now()
        self._exited.set()
        self._survivors = (spawned.pid,)

    async def _kill_group(self, group: JobGroup, *, whole_cage: bool = True) -> None:
        """SIGKILL the whole group. Should the cgroup refuse (removed behind our back, say),
        signal every process it still lists instead, and say so: killing is best effort, and
        a failure here must not stop the job's cleanup. With `whole_cage`, a caged job's PID
        namespace goes too (the stop's escalation waits a moment before that: `_escalate`)."""
        try:
            await group.kill()
        except (CgroupError, OSError) as exc:
            log.error(
                "job %s: cannot kill through the cgroup (%s); signalling its processes",
                self.id,
                exc,
            )
            try:
                group.signal(signal.SIGKILL)
            except OSError:
                pass
        if whole_cage or not (self._spawned and self._spawned.caged):
            self._kill_outside_group()

    def _kill_outside_group(self) -> None:
        """Kill what the group may not hold: for a caged job, its whole PID namespace (through
        the keeper); otherwise its leader and its process group, while the leader is our
        unreaped child (so neither pid can have been reused)."""
        spawned = self._spawned
        if spawned is None or spawned.process.returncode is not None:
            return
        if spawned.caged:
            spawned.process.send_signal(signal.SIGTERM)
            return
        spawned.process.send_signal(signal.SIGKILL)
        try:
            os.killpg(spawned.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_pipe_holders(self, spawned: Spawned) -> None:
        holders = _pipe_holders(spawned)
        if holders:
            log.warning(
                "job %s: processes outside its cgroups still hold its output: killing %s",
                self.id,
                ", ".join(map(str, holders)),
            )
        for pid in holders:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _give_up_on_survivors(self, spawned: Spawned) -> None:
        self._survivors = tuple(sorted({*self._survivors, *_pipe_holders(spawned)}))
        log.error(
            "job %s: giving up on processes that outlived SIGKILL outside its cgroups (%s); "
            "its output may be incomplete",
            self.id,
            ", ".join(map(str, self._survivors)) or "unknown pids",
        )

    async def _pump(
        self, stream: trio.lowlevel.FdStream, which: OutputStream, drained: _Countdown
    ) -> None:
        # Does not close the stream: after a cancellation, _supervise resumes reading it.
        while data := await stream.receive_some(_READ_CHUNK_BYTES):
            if not self._log.append(which, data) and not self._output_lost:
                # Disk full or the like: the log records the loss as a gap, and we keep
                # draining, so the job is never blocked on a full pipe. Said once per job.
                self._output_lost = True
                log.error("job %s: output incomplete: %s", self.id, self._log.loss_error)
        drained.count_down()

    def _leader_exited(self, spawned: Spawned) -> None:
        self._returncode = spawned.process.returncode
        self._ended_at = _now()
        self._exited.set()

    async def _finish(self, spawned: Spawned, group: JobGroup) -> None:
        """Bounded, shielded cleanup on every exit path: read the exit cause and usage, remove
        the group, complete the output, mark the job ended."""
        for stream in (spawned.stdout, spawned.stderr):
            await stream.aclose()
        if self._stdin is not None:
            self._stdin.job_ended()
        try:
            await self._kill_group(group)
            with trio.move_on_after(_KILL_WAIT_S) as waited:
                await group.wait_empty()
            self._oom_killed = group.oom_kills() > 0
            self._pids_limit_hit = group.pids_limit_hits() > 0
            # Memory "in use now" means nothing once the job has ended (its page cache may
            # still be charged to the empty group): the peak is what remains to say.
            self._usage = dataclasses.replace(group.usage(), memory_bytes=None)
            # A group still holding processes cannot be removed, nor may the job's uid go to
            # another job while they live: both wait for them (run() lingers).
            self._lingering = waited.cancelled_caught or spawned.process.returncode is None
            if not self._lingering:
                await group.remove()
        except (CgroupError, OSError) as exc:
            log.error("job %s: cgroup cleanup failed: %s", self.id, exc)
        if not self._lingering:
            await self._release_held()
        self._state = self._final_state()
        self._log.close()
        self._ended.set()
        status = self.status()
        log.info(
            "job %s: %s, exit code %s%s%s%s",
            self.id,
            status.state.value,
            status.exit_code,
            f", {status.signal_name}" if status.signal else "",
            ", OOM-killed" if status.oom_killed else "",
            ", escalated to SIGKILL" if status.escalated else "",
        )

    async def _release_held(self) -> None:
        if self._release is not None:
            try:
                await self._release()
            except OSError as exc:
                log.error("job %s: cleanup failed: %s", self.id, exc)

    def _final_state(self) -> JobState:
        if self._returncode is None:
            return JobState.FAILED  # never reaped (D state through the kill wait)
        if self._escalation is not None and self._escalation.requested:
            return JobState.STOPPED
        if self._returncode == 0:
            return JobState.FINISHED
        return JobState.FAILED


class _Countdown:
    """An event that fires once `count_down()` was called `n` times."""

    def __init__(self, n: int) -> None:
        self._left = n
        self._event = trio.Event()

    def count_down(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class _KillTarget:
    """What the stop escalation acts on: the job's group, killed the job's careful way."""

    def __init__(self, job: Job, group: JobGroup) -> None:
        self._job = job
        self._group = group

    def signal(self, signum: int) -> None:
        try:
            self._group.signal(signum)
        except OSError as exc:
            log.error("job %s: cannot signal its processes: %s", self._job.id, exc)

    async def kill(self) -> None:
        await self._job._kill_group(self._group, whole_cage=False)


def _now() -> datetime:
    return datetime.now(UTC)


def _pipe_holders(spawned: Spawned) -> list[int]:
    """Other processes with the job's stdout or stderr pipe open: found by the pipes' inodes
    in /proc/*/fd, the only trace left of a process that escaped every group we know of."""
    targets = set()
    for stream in (spawned.stdout, spawned.stderr):
        try:
            targets.add(f"pipe:[{os.fstat(stream.fileno()).st_ino}]")
        except (OSError, ValueError):
            continue  # closed meanwhile
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in targets:
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found


__all__ = ["Job", "JobSpec"]
