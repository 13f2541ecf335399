"""Resource limits: what a job may use, and what a Supervisor allows.

A `Limits` value is complete: every field is set. A job asks for `LimitOverrides` (any subset);
`LimitPolicy.resolve` fills the rest from the Supervisor's defaults and refuses anything above
its maximums. Nothing here touches cgroups; the backends turn a `Limits` into files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import InvalidJobSpec

KiB = 2**10
MiB = 2**20
GiB = 2**30

# The smallest CPU share the kernel's CFS bandwidth control accepts is a 1 ms quota per
# 100 ms period (cpu.cfs_quota_us / cpu.max reject quotas below 1000 µs).
CPU_PERIOD_US = 100_000
MIN_CPU = 0.01

# pids below this cannot even run a shell that forks one child.
MIN_PIDS = 2
# A memory limit below this cannot hold an exec'd interpreter; the kernel would accept it,
# but every job would die in exec, which is a confusing way to learn about a typo.
MIN_MEMORY_BYTES = 1 * MiB


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits applied to one job: seed 000's defaults, plus a pids cap against fork bombs."""

    cpu: float = 0.5  # cores: 0.5 = half of one core, 2 = two full cores
    memory_bytes: int = 1 * GiB  # RAM; swap is always forbidden
    io_read_bps: int = 100 * MiB  # per whole disk the job can reach
    io_write_bps: int = 100 * MiB
    pids: int = 4096

    def __post_init__(self) -> None:
        _check_cpu("cpu", self.cpu)
        _check_int("memory_bytes", self.memory_bytes, MIN_MEMORY_BYTES)
        _check_int("io_read_bps", self.io_read_bps, 1)
        _check_int("io_write_bps", self.io_write_bps, 1)
        _check_int("pids", self.pids, MIN_PIDS)

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per `CPU_PERIOD_US` period."""
        return round(self.cpu * CPU_PERIOD_US)

    def describe(self) -> str:
        return (
            f"cpu={self.cpu:g} memory={format_bytes(self.memory_bytes)} "
            f"io-read={format_bytes(self.io_read_bps)}/s "
            f"io-write={format_bytes(self.io_write_bps)}/s pids={self.pids}"
        )


@dataclass(frozen=True, slots=True)
class LimitOverrides:
    """A job's request: any field left None takes the Supervisor's default."""

    cpu: float | None = None
    memory_bytes: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        # Validate eagerly so a bad value is reported with its own name, not as a failed merge.
        if self.cpu is not None:
            _check_cpu("cpu", self.cpu)
        for name, minimum in (
            ("memory_bytes", MIN_MEMORY_BYTES),
            ("io_read_bps", 1),
            ("io_write_bps", 1),
            ("pids", MIN_PIDS),
        ):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """A Supervisor's defaults and maximums. A maximum of None means "no maximum"."""

    defaults: Limits = field(default_factory=Limits)
    maximums: LimitOverrides = field(default_factory=LimitOverrides)

    def __post_init__(self) -> None:
        self._check_within_maximums(self.defaults, what="default")

    def resolve(self, overrides: LimitOverrides | Limits | None) -> Limits:
        """The complete limits for a job, or InvalidJobSpec if any exceeds its maximum."""
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
        self._check_within_maximums(limits, what="requested")
        return limits

    def _check_within_maximums(self, limits: Limits, *, what: str) -> None:
        for f in dataclasses.fields(LimitOverrides):
            maximum = getattr(self.maximums, f.name)
            value = getattr(limits, f.name)
            if maximum is not None and value > maximum:
                raise InvalidJobSpec(
                    f"{what} {f.name} {_show(f.name, value)} is above the maximum "
                    f"{_show(f.name, maximum)}"
                )


def _check_cpu(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJobSpec(f"{name} must be a number of cores, got {value!r}")
    if not math.isfinite(value) or value < MIN_CPU:
        raise InvalidJobSpec(f"{name} must be at least {MIN_CPU} cores, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobSpec(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidJobSpec(f"{name} must be at least {_show(name, minimum)}, got {value!r}")


def _show(name: str, value: float) -> str:
    if name == "cpu" or name == "pids":
        return f"{value:g}"
    return format_bytes(int(value))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 2**40}


def parse_bytes(text: str) -> int:
    """Parse a size such as ``512M``, ``1GiB``, ``100m`` or ``4096`` (binary units, like docker).

    Raises ValueError with the offending text.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512K, 100M, 1G)")
    number, unit, _ = match.groups()
    value = float(number) * _SCALE[unit.lower()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_bytes(value: int) -> str:
    """The shortest exact binary-unit spelling: 1073741824 → ``1G``, 1536 → ``1.5K``."""
    for unit in ("T", "G", "M", "K"):
        scale = _SCALE[unit.lower()]
        if value >= scale and (value * 100) % scale == 0:
            return f"{value / scale:g}{unit}"
    return str(value)
