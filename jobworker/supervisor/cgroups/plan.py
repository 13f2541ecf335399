"""Pure translation between our values and cgroup file contents, for both cgroup versions.

`*_settings` say which file gets which text, in the order it must be written; the parsers read
the kernel's counters back. No I/O here: the backends do the writing and reading.
"""

from __future__ import annotations

from ..limits import CPU_PERIOD_US, Limits
from ..status import Usage


def v2_settings(limits: Limits, disks: list[str], *, swap_file: bool) -> list[tuple[str, str]]:
    """(file, content) for a job's leaf in a cgroup2 hierarchy with cpu, memory, io and pids."""
    settings = [
        ("cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"),
        ("memory.max", str(limits.memory_bytes)),
    ]
    if swap_file:
        settings.append(("memory.swap.max", "0"))
    # On OOM, kill the whole job rather than one process of it: a job missing a random
    # process is worse than a job that failed with a clear cause.
    settings.append(("memory.oom.group", "1"))
    # One line per whole disk; io.max has no "default" key (EINVAL), partitions give ENODEV.
    for disk in disks:
        line = f"{disk} rbps={limits.io_read_bps} wbps={limits.io_write_bps}"
        # An IOPS limit left out stays "max" (a new group has none).
        if limits.io_read_iops is not None:
            line += f" riops={limits.io_read_iops}"
        if limits.io_write_iops is not None:
            line += f" wiops={limits.io_write_iops}"
        settings.append(("io.max", line))
    settings.append(("pids.max", str(limits.pids)))
    return settings


def v1_settings(
    limits: Limits, disks: list[str], *, memsw_file: bool
) -> list[tuple[str, str, str]]:
    """(controller, file, content) for a job's groups in cgroup v1 hierarchies."""
    settings = [
        ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        ("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)),
        # memory first, then memory+swap at the same value (= no swap). The kernel requires
        # memsw >= memory at every step, so this order is the one that works when lowering
        # from "unlimited" (the reverse gives EINVAL).
        ("memory", "memory.limit_in_bytes", str(limits.memory_bytes)),
    ]
    if memsw_file:
        settings.append(("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes)))
    for disk in disks:
        settings.append(("blkio", "blkio.throttle.read_bps_device", f"{disk} {limits.io_read_bps}"))
        settings.append(
            ("blkio", "blkio.throttle.write_bps_device", f"{disk} {limits.io_write_bps}")
        )
        if limits.io_read_iops is not None:
            settings.append(
                ("blkio", "blkio.throttle.read_iops_device", f"{disk} {limits.io_read_iops}")
            )
        if limits.io_write_iops is not None:
            settings.append(
                ("blkio", "blkio.throttle.write_iops_device", f"{disk} {limits.io_write_iops}")
            )
    settings.append(("pids", "pids.max", str(limits.pids)))
    return settings


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, pids.events, memory.oom_control)."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


def parse_v2_io_stat(text: str) -> tuple[int, int]:
    """(read bytes, written bytes) summed over devices, from io.stat lines
    ``MAJ:MIN rbytes=N wbytes=N rios=N ...``."""
    read = written = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                written += int(value)
    return read, written


def parse_v1_io_service_bytes(text: str) -> tuple[int, int]:
    """(read bytes, written bytes) summed over devices, from blkio.throttle.io_service_bytes
    lines ``MAJ:MIN Read N`` (plus Write, Sync, Async, Discard, Total, and a final ``Total N``)."""
    read = written = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        if fields[1] == "Read":
            read += int(fields[2])
        elif fields[1] == "Write":
            written += int(fields[2])
    return read, written


def v2_usage(
    cpu_stat: str,
    memory_peak: str | None,
    io_stat: str | None,
    memory_current: str | None = None,
) -> Usage:
    cpu = parse_flat_keyed(cpu_stat)
    read, written = parse_v2_io_stat(io_stat) if io_stat is not None else (None, None)
    return Usage(
        cpu_s=_seconds(cpu.get("usage_usec"), 1e6),
        cpu_throttled_s=_seconds(cpu.get("throttled_usec"), 1e6),
        memory_bytes=int(memory_current) if memory_current else None,
        memory_peak_bytes=int(memory_peak) if memory_peak else None,
        io_read_bytes=read,
        io_write_bytes=written,
    )


def v1_usage(
    cpuacct_usage: str,
    cpu_stat: str,
    max_usage: str,
    io_service_bytes: str,
    usage: str | None = None,
) -> Usage:
    read, written = parse_v1_io_service_bytes(io_service_bytes)
    return Usage(
        cpu_s=int(cpuacct_usage) / 1e9,
        cpu_throttled_s=_seconds(parse_flat_keyed(cpu_stat).get("throttled_time"), 1e9),
        memory_bytes=int(usage) if usage else None,
        memory_peak_bytes=int(max_usage),
        io_read_bytes=read,
        io_write_bytes=written,
    )


def _seconds(value: int | None, per_second: float) -> float | None:
    return None if value is None else value / per_second
