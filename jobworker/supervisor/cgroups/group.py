"""One job's group of processes: place, signal, kill, wait, account, remove.

`CgroupGroup` is a job's set of cgroup directories (one per v1 hierarchy, or one cgroup2 leaf,
plus the unified leaf on hybrid machines). `ProcessGroup` is the fallback for cgroups="off":
a session/process group, which a process that calls setsid() leaves — the reason cgroups are
the default.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..status import Usage
from . import fs
from .plan import parse_flat_keyed, v1_usage, v2_usage


class JobGroup(Protocol):
    """What the job tree needs from the thing that holds a job's processes."""

    # Files the child writes its own pid into, before exec (see spawn.py). Empty: nothing to do.
    procs_files: tuple[Path, ...]

    def attach(self, pid: int) -> None: ...
    def signal(self, signum: int) -> None: ...
    async def kill(self) -> None: ...
    async def wait_empty(self) -> None: ...
    def usage(self) -> Usage: ...
    def oom_kills(self) -> int: ...
    def pids_limit_hits(self) -> int: ...
    async def remove(self) -> None: ...


class CgroupGroup:
    """A job's cgroup directories. Subclasses read the version-specific counters."""

    def __init__(self, dirs: dict[str, Path], *, notify_dir: Path | None) -> None:
        self.dirs = dirs
        self.procs_files = tuple(d / "cgroup.procs" for d in dirs.values())
        # The cgroup2 directory (a v2 leaf, or the unified leaf on hybrid machines): it has
        # cgroup.kill and cgroup.events. None on pure v1, where the freezer does the killing.
        self._notify_dir = notify_dir
        self._listing = (notify_dir or next(iter(dirs.values()))) / "cgroup.procs"

    def attach(self, pid: int) -> None:
        # The child placed itself before exec; there is nothing left to do.
        pass

    def signal(self, signum: int) -> None:
        """Send `signum` to every process in the group (a polite signal: a process forked
        during this loop may miss it; kill() is the one that cannot be escaped)."""
        for pid in fs.pids(self._listing):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    async def kill(self) -> None:
        """SIGKILL every process in the group, including ones forking right now."""
        if self._notify_dir is not None:
            # Atomic against fork: the kernel kills the whole group, new children included.
            fs.write(self._notify_dir / "cgroup.kill", "1")
        elif "freezer" in self.dirs:
            await self._freeze_and_kill()
        else:
            # Only a group found half removed after a crash lacks both (a backend never makes
            # one): whatever is left in it gets a plain kill loop.
            self.signal(signal.SIGKILL)

    async def _freeze_and_kill(self) -> None:
        # v1 without cgroup.kill: a kill loop over cgroup.procs races with fork (measured: three
        # passes needed). Frozen processes cannot fork; SIGKILL them, then thaw so they die.
        state = self.dirs["freezer"] / "freezer.state"
        fs.write(state, "FROZEN")
        backoff = fs.Backoff()
        while fs.read(state).strip() != "FROZEN":
            await backoff.wait()
        for pid in fs.pids(self.dirs["freezer"] / "cgroup.procs"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        fs.write(state, "THAWED")

    async def wait_empty(self) -> None:
        if self._notify_dir is None:
            backoff = fs.Backoff()
            while fs.pids(self._listing):
                await backoff.wait()
            return
        events = self._notify_dir / "cgroup.events"

        def populated() -> bool:
            return parse_flat_keyed(fs.read(events)).get("populated", 0) != 0

        if not populated():
            return  # the common case: nothing left by the time the leader was reaped
        # Watch first, then look again: a change between the two is still seen.
        watch = fs.Inotify(events)
        try:
            while populated():
                await watch.changed()
        finally:
            await watch.aclose()

    async def remove(self) -> None:
        first_error = None
        for directory in self.dirs.values():
            try:
                # A job run as root may have made groups of its own beneath its group: they
                # go first, deepest first (cgroupfs removes only empty groups).
                for child in sorted(fs.subgroups(directory), key=lambda p: -len(p.parts)):
                    await fs.rmdir(child)
                await fs.rmdir(directory)
            except Exception as exc:  # try every directory, report the first failure
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def usage(self) -> Usage:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def pids_limit_hits(self) -> int:
        raise NotImplementedError


class V2Group(CgroupGroup):
    def __init__(self, leaf: Path) -> None:
        super().__init__({"v2": leaf}, notify_dir=leaf)
        self._leaf = leaf
        # Read for every status of a running job: the paths are made once.
        self._usage_files = tuple(
            os.fspath(leaf / name)
            for name in ("cpu.stat", "memory.peak", "io.stat", "memory.current")
        )

    def usage(self) -> Usage:
        cpu_stat, memory_peak, io_stat, memory_current = self._usage_files
        return v2_usage(
            fs.read(cpu_stat),
            fs.read_optional(memory_peak),  # kernel >= 5.19
            fs.read_optional(io_stat),
            fs.read(memory_current),
        )

    def oom_kills(self) -> int:
        return parse_flat_keyed(fs.read(self._leaf / "memory.events")).get("oom_kill", 0)

    def pids_limit_hits(self) -> int:
        return parse_flat_keyed(fs.read(self._leaf / "pids.events")).get("max", 0)


class V1Group(CgroupGroup):
    # What v1_usage reads, in its order, by controller. memory.usage_in_bytes: the charged
    # pages, page cache included, which the memory limit is compared with.
    _USAGE = (
        ("cpuacct", "cpuacct.usage"),
        ("cpu", "cpu.stat"),
        ("memory", "memory.max_usage_in_bytes"),
        ("blkio", "blkio.throttle.io_service_bytes"),
        ("memory", "memory.usage_in_bytes"),
    )

    def __init__(self, dirs: dict[str, Path], *, notify_dir: Path | None) -> None:
        super().__init__(dirs, notify_dir=notify_dir)
        # Read for every status of a running job: the paths are made once.
        self._usage_files = tuple(os.fspath(dirs[c] / name) for c, name in self._USAGE)

    def usage(self) -> Usage:
        return v1_usage(*(fs.read(path) for path in self._usage_files))

    def oom_kills(self) -> int:
        # v1 has no memory.events; failcnt is unreliable with memsw. oom_control counts kills.
        oom_control = fs.read(self.dirs["memory"] / "memory.oom_control")
        return parse_flat_keyed(oom_control).get("oom_kill", 0)

    def pids_limit_hits(self) -> int:
        return parse_flat_keyed(fs.read(self.dirs["pids"] / "pids.events")).get("max", 0)


def left_behind(dirs: Sequence[Path]) -> CgroupGroup:
    """The group of a job whose Supervisor is gone, from the directories it left (one per
    hierarchy): to kill what is still in it, wait, and remove it, as for a live job. The
    directories say which one offers cgroup.kill and which one is the v1 freezer."""
    notify = next((d for d in dirs if (d / "cgroup.kill").exists()), None)
    keyed = {("freezer" if (d / "freezer.state").exists() else os.fspath(d)): d for d in dirs}
    return CgroupGroup(keyed, notify_dir=notify)


class ProcessGroup:
    """cgroups="off": the job's session is its group. No limits, no accounting, and a process
    that calls setsid() escapes the tree kill — which is why this is only used when asked for."""

    procs_files: tuple[Path, ...] = ()

    def __init__(self) -> None:
        self._pgid: int | None = None

    def attach(self, pid: int) -> None:
        self._pgid = pid  # spawned with start_new_session: the leader's pid is the group's id

    def signal(self, signum: int) -> None:
        if self._pgid is not None:
            try:
                os.killpg(self._pgid, signum)
            except ProcessLookupError:
                pass

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait_empty(self) -> None:
        # Nothing to watch: a process group has no "populated" notification. The killed members
        # close their pipe ends, which the output pumps see.
        pass

    def usage(self) -> Usage:
        return Usage()

    def oom_kills(self) -> int:
        return 0

    def pids_limit_hits(self) -> int:
        return 0

    async def remove(self) -> None:
        pass
