"""Resource limits: what a job may use, and what a Supervisor allows.

A `Limits` value is complete: every field is set. A job asks for `LimitOverrides` (any subset);
`LimitPolicy.resolve` fills the rest from the Supervisor's defaults and refuses anything above
its maximums. Nothing here writes cgroups; the backends turn a `Limits` into files.

Every range check is `_check`: `Limits` and `LimitOverrides` use it for what a limit can be at
all (a number, at least what the kernel enforces), `LimitPolicy` for what a Supervisor allows
(at most its maximum, and never more than the host has: `HostCapacity`). Above what the host
has a limit means nothing, and some values the kernel refuses outright, which would turn a
typo into a job in ERROR rather than a refusal naming the limit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# The byte units live in jobworker.units (a client needs them without the supervisor); the
# names stay importable from here, where the supervisor's API has always had them.
from ..units import GiB, KiB, MiB
from ..units import format_bytes as format_bytes
from ..units import parse_bytes as parse_bytes
from .errors import LimitOutOfRange

# The smallest CPU share the kernel's CFS bandwidth control accepts is a 1 ms quota per
# 100 ms period (cpu.cfs_quota_us / cpu.max reject quotas below 1000 µs).
CPU_PERIOD_US = 100_000
MIN_CPU = 0.01

# pids below this cannot even run a shell that forks one child.
MIN_PIDS = 2
# A memory limit below this cannot hold an exec'd interpreter; the kernel would accept it,
# but every job would die in exec, which is a confusing way to learn about a typo.
MIN_MEMORY_BYTES = 1 * MiB

# pids.max refuses more than PID_MAX_LIMIT (4M on 64-bit kernels), the most kernel.pid_max can be.
PID_MAX_LIMIT = 4 * 2**20
# io.max and blkio.throttle.*_bps_device read a u64, and U64_MAX itself means "max" (no limit):
# the largest rate that is still a limit. No host figure bounds a rate (disks differ).
MAX_IO_BPS = 2**64 - 2
# IOPS are an unsigned int in the kernel (blk-throttle): io.max clamps a larger riops/wiops to
# UINT_MAX, which means "max", and v1's *_iops_device silently truncates (2^32 read back as 0).
# Measured on v1 here: 4294967294 is kept, 4294967295 clears the limit, 4294967296 reads "0".
MAX_IOPS = 2**32 - 2

_MINIMUMS: dict[str, float] = {
    "cpu": MIN_CPU,
    "memory_bytes": MIN_MEMORY_BYTES,
    "io_read_bps": 1,
    "io_write_bps": 1,
    "pids": MIN_PIDS,
    "io_read_iops": 1,
    "io_write_iops": 1,
}
# Limits that may be None in a `Limits`: no limit at all (the kernel's "max"), their default.
# IOPS limits are opt-in: a default would slow every job doing small IO, where the bandwidth
# defaults already bound what a job moves.
_OPTIONAL = frozenset({"io_read_iops", "io_write_iops"})


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits applied to one job: seed 000's defaults, plus a pids cap against fork bombs."""

    cpu: float = 0.5  # cores: 0.5 = half of one core, 2 = two full cores
    memory_bytes: int = 1 * GiB  # RAM; swap is always forbidden
    io_read_bps: int = 100 * MiB  # per whole disk the job can reach
    io_write_bps: int = 100 * MiB
    pids: int = 4096
    io_read_iops: int | None = None  # read operations per second per disk; None: no limit
    io_write_iops: int | None = None

    def __post_init__(self) -> None:
        for name in _MINIMUMS:
            _check(name, getattr(self, name))

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per `CPU_PERIOD_US` period."""
        return round(self.cpu * CPU_PERIOD_US)

    def describe(self) -> str:
        return (
            f"cpu={self.cpu:g} memory={format_bytes(self.memory_bytes)} "
            f"io-read={format_bytes(self.io_read_bps)}/s "
            f"io-write={format_bytes(self.io_write_bps)}/s pids={self.pids}"
            + (f" io-read-iops={self.io_read_iops}" if self.io_read_iops is not None else "")
            + (f" io-write-iops={self.io_write_iops}" if self.io_write_iops is not None else "")
        )


@dataclass(frozen=True, slots=True)
class LimitOverrides:
    """A job's request: any field left None takes the Supervisor's default."""

    cpu: float | None = None
    memory_bytes: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    pids: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None

    def __post_init__(self) -> None:
        # Validate eagerly so a bad value is reported with its own name, not as a failed merge.
        for name in _MINIMUMS:
            value = getattr(self, name)
            if value is not None:
                _check(name, value)


@dataclass(frozen=True, slots=True)
class HostCapacity:
    """What this machine offers one job at most: no limit above it means anything.

    - cpus: the CPUs this process may run on (its affinity), or its own cgroup's CPU quota
      rounded up to whole CPUs when that is less.
    - memory_bytes: the RAM (MemTotal); swap is never allowed, so more is never usable.
    - pids: kernel.pid_max, the most processes and threads there can be at once.

    `probe()` reads them from the running kernel; tests pass their own."""

    cpus: float
    memory_bytes: int
    pids: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cpus) and self.cpus > 0 and self.memory_bytes > 0):
            raise ValueError(f"a host has some CPU and some memory: {self}")
        if not 0 < self.pids <= PID_MAX_LIMIT:
            raise ValueError(f"pid_max is between 1 and {PID_MAX_LIMIT}: {self}")

    @classmethod
    def probe(cls) -> HostCapacity:
        return cls(cpus=_usable_cpus(), memory_bytes=_mem_total(), pids=_pid_max())

    def ceiling(self, name: str) -> tuple[float, str]:
        """The most `name` (a `Limits` field) can be on this host, and that figure in words."""
        if name == "cpu":
            return self.cpus, f"this host's {self.cpus:g} CPUs"
        if name == "memory_bytes":
            return self.memory_bytes, f"this host's {format_bytes(self.memory_bytes)} of RAM"
        if name == "pids":
            return self.pids, f"this host's pid_max {self.pids}"
        if name in _OPTIONAL:
            return MAX_IOPS, "the largest IOPS limit the kernel takes"
        return MAX_IO_BPS, "the largest rate the kernel takes"


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """A Supervisor's defaults and maximums. A maximum of None means "what the host has"
    (`host`, probed when not given); a maximum above what the host has is refused."""

    defaults: Limits = field(default_factory=Limits)
    maximums: LimitOverrides = field(default_factory=LimitOverrides)
    host: HostCapacity = field(default_factory=HostCapacity.probe)

    def __post_init__(self) -> None:
        for name in _MINIMUMS:
            value = getattr(self.maximums, name)
            if value is not None:
                _check(name, value, self.host.ceiling(name), what="maximum")
        for name in _MINIMUMS:
            _check(name, getattr(self.defaults, name), self.maximum(name), what="default")

    def maximum(self, name: str) -> tuple[float, str]:
        """The most a job may ask for `name` (a `Limits` field), and why, in words."""
        configured = getattr(self.maximums, name)
        if configured is None:
            return self.host.ceiling(name)
        return configured, f"the maximum {_show(name, configured)}"

    def check(self, name: str, value: object) -> None:
        """LimitOutOfRange unless a job may ask for `value` as its `name` (a `Limits` field)."""
        _check(name, value, self.maximum(name))

    def resolve(self, overrides: LimitOverrides | Limits | None) -> Limits:
        """The complete limits for a job, or LimitOutOfRange if any exceeds its maximum."""
        if overrides is None:
            return self.defaults
        if isinstance(overrides, Limits):
            limits = overrides
        else:
            given = {
                f.name: getattr(overrides, f.name)
                for f in dataclasses.fields(overrides)
                if getattr(overrides, f.name) is not None
            }
            limits = dataclasses.replace(self.defaults, **given)
        for name in _MINIMUMS:
            _check(name, getattr(limits, name), self.maximum(name), what="requested")
        return limits


def _check(
    name: str, value: object, ceiling: tuple[float, str] | None = None, *, what: str = ""
) -> None:
    """The one range check: LimitOutOfRange, naming the limit and its allowed range, unless
    `value` is a number `name` can be, at least its minimum and at most `ceiling` (if any).
    None ("no limit", for the optional ones) is above any ceiling but the kernel's own."""
    low = _MINIMUMS[name]
    if ceiling is None:
        allowed = f"at least {_show(name, low)}"
    else:
        allowed = f"{_show(name, low)} to {_show(name, ceiling[0])}"
    if value is None and name in _OPTIONAL:
        if ceiling is None or ceiling[0] >= MAX_IOPS:
            return
        problem = f"is above {ceiling[1]}"
    elif isinstance(value, bool):
        problem = "is not a number"
    elif name == "cpu" and not (isinstance(value, (int, float)) and math.isfinite(value)):
        problem = "is not a finite number of cores"
    elif name != "cpu" and not isinstance(value, int):
        problem = "is not a whole number"
    elif value < low:  # type: ignore[operator]
        problem = f"is below the minimum {_show(name, low)}"
    elif ceiling is not None and value > ceiling[0]:  # type: ignore[operator]
        problem = f"is above {ceiling[1]}"
    else:
        return
    raise LimitOutOfRange(name, f"{_show(name, value)} {problem} (allowed: {allowed})", what=what)


def _show(name: str, value: object) -> str:
    """A limit's value as messages spell it: cores, a count, or an exact size."""
    if value is None:
        return "unset (no limit)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)
    if name == "cpu" or not isinstance(value, int):
        return f"{value:g}"  # 0.5, nan, 1e+300
    if name == "pids" or name in _OPTIONAL:
        return str(value)
    return format_bytes(value)


# --- what the host has: thin readers of /proc and /sys --------------------------------------


def _usable_cpus() -> float:
    return usable_cpus(len(os.sched_getaffinity(0)), _own_cpu_quota())


def usable_cpus(affinity: int, quota: float | None) -> float:
    """The CPUs a job could use: those this process may run on, or fewer when its cgroup's
    `quota` (in CPUs; None: no quota) says so. The quota is rounded up: a server confined to
    0.25 CPU still lets a job ask for the usual 0.5 (its parent's quota throttles both
    alike), and a job is never let ask for more CPUs than there are."""
    if quota is None:
        return float(affinity)
    return float(min(affinity, max(1, math.ceil(quota))))


def _own_cpu_quota() -> float | None:
    """The tightest CPU quota (in CPUs) on this process's own cgroup and its ancestors; None
    when there is none or it cannot be read."""
    from .cgroups.discover import current_layout  # the cgroups package imports this module

    try:
        layout = current_layout()
    except OSError:
        return None
    quotas: list[float] = []
    if layout.unified is not None:
        for directory in _up_to_mount(layout.unified):
            quota, _, period = _read(directory / "cpu.max").partition(" ")
            if quota not in ("", "max") and period:
                quotas.append(_ratio(quota, period))
    if "cpu" in layout.v1:
        for directory in _up_to_mount(layout.v1["cpu"]):
            quota, period = (
                _read(directory / "cpu.cfs_quota_us"),
                _read(directory / "cpu.cfs_period_us"),
            )
            if quota and period and not quota.startswith("-"):
                quotas.append(_ratio(quota, period))
    quotas = [q for q in quotas if q > 0]
    return min(quotas) if quotas else None


def _up_to_mount(directory: Path) -> list[Path]:
    """`directory` and its ancestors that are cgroups (they have cgroup.procs)."""
    found = []
    while (directory / "cgroup.procs").exists():
        found.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    return found


def _ratio(quota: str, period: str) -> float:
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return 0.0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            return int(value.split()[0]) * KiB  # the kernel says "kB" and means KiB
    raise OSError("/proc/meminfo has no MemTotal")


def _pid_max() -> int:
    text = _read(Path("/proc/sys/kernel/pid_max"))
    return min(int(text), PID_MAX_LIMIT) if text.isdigit() else PID_MAX_LIMIT
