"""The three ways a Supervisor can hold jobs: cgroup v2, cgroup v1 (hybrid), or no cgroups.

Every Supervisor gets a subtree of its own, ``<own cgroup>/jobworker-<8 hex>/``, in each
hierarchy it uses, and each job a group ``<subtree>/<job id>`` beneath it: never at a hierarchy
root, always beneath the cgroup this process was given (CGROUPS.md; what systemd delegation asks).
Groups are never reused: a killed job's orphans may still be counted for a second or so.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from ..errors import CgroupError, CgroupsUnavailable
from ..limits import Limits
from . import fs
from .discover import V1_CONTROLLERS, V2_CONTROLLERS, Layout, disks_for, physical_disks
from .group import CgroupGroup, JobGroup, ProcessGroup, V1Group, V2Group
from .plan import v1_settings, v2_settings

log = logging.getLogger("jobworker.supervisor")

_FIX = (
    "run jobworker as root, or give it a delegated cgroup (systemd: Delegate=yes, e.g. "
    "`systemd-run --scope -p Delegate=yes jobworker serve`); or pass cgroups='off' "
    "(`--cgroups off`) to run jobs without limits"
)


class _CgroupBackend:
    kind: str
    # Limits the kernel applies only in part here, in words, for every job's status.
    caveats: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._subtrees: list[Path] = []

    @property
    def subtrees(self) -> tuple[Path, ...]:
        return tuple(self._subtrees)

    def _undo(self) -> None:
        """Remove the (still empty) subtrees made by a constructor that then failed."""
        for path in reversed(self._subtrees):
            try:
                os.rmdir(path)
            except OSError:
                pass
        self._subtrees.clear()

    # Tests against a fake cgroup tree override this to populate control files, as the kernel does.
    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def _make_subtree(self, path: Path) -> None:
        try:
            self._mkdir(path)
        except PermissionError as exc:
            raise CgroupsUnavailable(
                f"cannot create cgroup {path}: {exc.strerror}; {_FIX}"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise CgroupsUnavailable(f"cannot create cgroup {path}: read-only; {_FIX}") from exc
            raise CgroupsUnavailable(f"cannot create cgroup {path}: {exc.strerror}") from exc
        self._subtrees.append(path)

    def _make_job_dirs(self, dirs: dict[str, Path], settings: list[tuple[str, str, str]]) -> None:
        """Create a job's directories and write its limits; on any failure leave nothing behind."""
        made: list[Path] = []
        try:
            for directory in dirs.values():
                try:
                    self._mkdir(directory)
                except OSError as exc:
                    raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from exc
                made.append(directory)
            for key, name, value in settings:
                fs.write(dirs[key] / name, value)
        except BaseException:
            for directory in reversed(made):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass  # reported by the leak check; the original error matters more
            raise

    async def aclose(self) -> None:
        """Remove the subtrees. One still holding a job's group (processes that outlived
        SIGKILL, which their job has logged) is left in place, and said so; the rest go."""
        for path in reversed(self._subtrees):
            left = [p.name for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
            if left:
                log.error("cgroup %s left in place: it still holds %s", path, ", ".join(left))
                continue
            try:
                await fs.rmdir(path)
            except CgroupError as exc:
                log.error("cgroup subtree left in place: %s", exc)
        self._subtrees.clear()


class V2Backend(_CgroupBackend):
    """A pure cgroup2 hierarchy with the cpu, memory, io and pids controllers."""

    kind = "v2"
    # cgroup2's "no internal processes" rule: a group that hands controllers to its children
    # may hold no processes itself. So the supervisor first moves itself into this leaf.
    SUPERVISOR_LEAF = "jobworker-supervisor"

    def __init__(self, own: Path, name: str) -> None:
        super().__init__()
        try:
            self._setup(own, name)
        except BaseException:
            self._undo()
            raise

    def _setup(self, own: Path, name: str) -> None:
        base = own.parent if own.name == self.SUPERVISOR_LEAF else own
        try:
            available = fs.read(base / "cgroup.controllers").split()
        except OSError as exc:
            raise CgroupsUnavailable(
                f"cannot read {base}/cgroup.controllers: {exc.strerror}"
            ) from exc
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupsUnavailable(
                f"cgroup v2 controllers {' '.join(missing)} are not available in {base}; {_FIX}"
            )
        if own.name != self.SUPERVISOR_LEAF:
            leaf = base / self.SUPERVISOR_LEAF
            if not leaf.is_dir():
                self._make_subtree(leaf)
                self._subtrees.remove(leaf)  # it holds this process: it stays while we live
            self._move_self(leaf)
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        self._enable(base, enable)
        self.subtree = base / name
        self._make_subtree(self.subtree)
        self._enable(self.subtree, enable)
        # memory.swap.max exists only with swap accounting; without it, "no swap" can be
        # promised only when there is no swap at all.
        self._swap_file = (self.subtree / "memory.swap.max").exists()
        if not self._swap_file and _swap_enabled():
            raise CgroupsUnavailable(
                "swap is on but the kernel has no memory.swap.max, so jobs could swap beyond "
                "their memory limit; enable swap accounting (swapaccount=1) or turn swap off"
            )

    def _move_self(self, leaf: Path) -> None:
        try:
            fs.write(leaf / "cgroup.procs", str(os.getpid()))
        except CgroupError as exc:
            raise CgroupsUnavailable(
                f"cannot move the supervisor into {leaf}: {exc}; {_FIX}"
            ) from exc

    def _enable(self, group: Path, controllers: str) -> None:
        try:
            fs.write(group / "cgroup.subtree_control", controllers)
        except CgroupError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EBUSY:
                raise CgroupsUnavailable(
                    f"cannot enable controllers in {group}: other processes share this cgroup; "
                    f"give jobworker a cgroup of its own (systemd: Delegate=yes)"
                ) from exc
            raise CgroupsUnavailable(f"{exc}; {_FIX}") from exc

    def create(self, job_id: str, limits: Limits, cwd: str) -> JobGroup:
        leaf = self.subtree / job_id
        settings = v2_settings(limits, _disks(cwd), swap_file=self._swap_file)
        self._make_job_dirs({"v2": leaf}, [("v2", name, value) for name, value in settings])
        return V2Group(leaf)


class V1Backend(_CgroupBackend):
    """cgroup v1 controllers, each on its own mount (a hybrid layout), plus — when the unified
    hierarchy is mounted — a cgroup2 leaf per job for cgroup.kill and cgroup.events."""

    kind = "v1"
    # Measured here (shared/CGROUPS.md): 298 MB/s of buffered writes under a 100 MiB/s limit,
    # because writeback runs outside the job's group; direct, synced and read IO are throttled.
    caveats = (
        "io write limit: cgroup v1 throttles direct and synced writes only (bandwidth and "
        "IOPS alike); buffered writes reach the disk through the kernel's writeback, which no "
        "job's limit slows",
    )

    def __init__(self, layout: Layout, name: str, *, use_unified: bool = True) -> None:
        super().__init__()
        try:
            self._setup(layout, name, use_unified)
        except BaseException:
            self._undo()
            raise

    def _setup(self, layout: Layout, name: str, use_unified: bool) -> None:
        missing = [c for c in V1_CONTROLLERS if c not in layout.v1]
        if missing:
            raise CgroupsUnavailable(f"cgroup v1 controllers {' '.join(missing)} are not mounted")
        self._bases = {c: layout.v1[c] / name for c in V1_CONTROLLERS}
        self._notify_key: str | None = None
        if use_unified and layout.unified is not None:
            unified = layout.unified / name
            self._make_subtree(unified)
            if (unified / "cgroup.kill").exists():  # kernel >= 5.14
                self._bases["unified"] = unified
                self._notify_key = "unified"
            else:
                os.rmdir(unified)
                self._subtrees.remove(unified)
        if self._notify_key is None:
            if "freezer" not in layout.v1:
                raise CgroupsUnavailable(
                    "cannot kill process trees: no cgroup.kill (kernel < 5.14 or no unified "
                    "hierarchy) and no v1 freezer"
                )
            self._bases["freezer"] = layout.v1["freezer"] / name
        for key, path in self._bases.items():
            if key != "unified":
                self._make_subtree(path)
        self._memsw_file = (self._bases["memory"] / "memory.memsw.limit_in_bytes").exists()
        if not self._memsw_file and _swap_enabled():
            raise CgroupsUnavailable(
                "swap is on but the kernel has no memory.memsw, so jobs could swap beyond their "
                "memory limit; enable swap accounting (swapaccount=1) or turn swap off"
            )

    def create(self, job_id: str, limits: Limits, cwd: str) -> JobGroup:
        dirs = {key: base / job_id for key, base in self._bases.items()}
        settings = v1_settings(limits, _disks(cwd), memsw_file=self._memsw_file)
        self._make_job_dirs(dirs, settings)
        notify_dir = dirs[self._notify_key] if self._notify_key else None
        return V1Group(dirs, notify_dir=notify_dir)


class NoCgroups:
    """cgroups="off": jobs run without limits, in a process group of their own."""

    kind = "off"
    caveats: tuple[str, ...] = ()
    subtrees: tuple[Path, ...] = ()

    def create(self, job_id: str, limits: Limits | None, cwd: str) -> JobGroup:
        return ProcessGroup()

    async def aclose(self) -> None:
        pass


def _disks(cwd: str) -> list[str]:
    try:
        disks = disks_for(cwd)
    except OSError:
        # The directory is unusable; spawning will say precisely why. Limit every disk meanwhile.
        disks = physical_disks()
    if not disks:
        raise CgroupError(f"no disk found for {cwd}: IO limits cannot be applied")
    return disks


def _swap_enabled() -> bool:
    with open("/proc/swaps", encoding="ascii") as f:
        return len(f.read().splitlines()) > 1


__all__ = ["CgroupGroup", "NoCgroups", "V1Backend", "V2Backend"]
