"""Where the cgroup hierarchies are, where this process sits in them, which disks a job reaches.

Parsing is pure (text in, values out) so it is tested on captured files; the thin readers at the
bottom are the only part that touches /proc and /sys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# The v1 controllers a job's limits and accounting need, and the freezer used for tree kill when
# no unified hierarchy offers cgroup.kill.
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")


@dataclass(frozen=True, slots=True)
class Mount:
    """One mounted cgroup hierarchy."""

    mount_point: Path
    root: PurePosixPath  # the hierarchy path shown at mount_point (not "/" inside some containers)
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the super options (e.g. {"cpu"}); v2: empty here


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a /proc/<pid>/mountinfo."""
    mounts = []
    for line in text.splitlines():
        # Fields: id parent maj:min root mount-point options [optional...] - fstype source superopts
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, super_options = tail[0], tail[2]
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(Mount(Path(mount_point), PurePosixPath(root), 2, frozenset()))
        elif fstype == "cgroup":
            options = frozenset(super_options.split(","))
            mounts.append(Mount(Path(mount_point), PurePosixPath(root), 1, options))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_proc_cgroup(text: str) -> tuple[dict[str, PurePosixPath], PurePosixPath | None]:
    """From /proc/<pid>/cgroup: (v1 controller → own path, own v2 path or None)."""
    v1: dict[str, PurePosixPath] = {}
    v2 = None
    for line in text.splitlines():
        hierarchy_id, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hierarchy_id == "0" and controllers == "":
            v2 = PurePosixPath(path)
        else:
            for controller in controllers.split(","):
                if controller:
                    v1[controller] = PurePosixPath(path)
    return v1, v2


def own_directory(mount: Mount, own_path: PurePosixPath) -> Path:
    """The directory of this process's own cgroup inside a mounted hierarchy."""
    try:
        relative = own_path.relative_to(mount.root)
    except ValueError:
        # The mount shows only a part of the hierarchy and we are outside it (a container
        # mounting a sibling subtree). Nothing beneath us is reachable through this mount.
        raise LookupError(
            f"own cgroup {own_path} is not visible under {mount.mount_point} (root {mount.root})"
        ) from None
    return mount.mount_point / relative


@dataclass(frozen=True, slots=True)
class Layout:
    """What this process sees: the v1 hierarchies by controller, and the unified one."""

    v1: dict[str, Path]  # controller → own cgroup directory in that hierarchy
    unified: Path | None  # own cgroup directory in the cgroup2 hierarchy


def read_layout(mountinfo: str, proc_cgroup: str) -> Layout:
    mounts = parse_mountinfo(mountinfo)
    own_v1, own_v2 = parse_proc_cgroup(proc_cgroup)
    v1: dict[str, Path] = {}
    unified = None
    for mount in mounts:
        try:
            if mount.version == 2 and own_v2 is not None and unified is None:
                unified = own_directory(mount, own_v2)
            elif mount.version == 1:
                for controller in mount.controllers:
                    if controller in own_v1 and controller not in v1:
                        v1[controller] = own_directory(mount, own_v1[controller])
        except LookupError:
            continue
    return Layout(v1=v1, unified=unified)


def cgroup_filesystems(mountinfo: str | None = None) -> list[tuple[Path, str, str]]:
    """Every mounted cgroup hierarchy as (mount point, type, options): what an isolated job
    mounts afresh from its cgroup namespace. A v1 hierarchy is named by its super options (its
    controllers, or name=...), less the ones a second mount must not repeat."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    found: list[tuple[Path, str, str]] = []
    for mount in parse_mountinfo(mountinfo):
        if any(point == mount.mount_point for point, _, _ in found):
            continue
        if mount.version == 2:
            found.append((mount.mount_point, "cgroup2", ""))
        else:
            kept = sorted(
                o for o in mount.controllers if o not in ("rw", "ro") and "release_agent" not in o
            )
            found.append((mount.mount_point, "cgroup", ",".join(kept)))
    return found


def current_layout() -> Layout:
    return read_layout(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
    )


# --- disks -----------------------------------------------------------------------------------


def disks_for(path: str | os.PathLike[str], *, sys_root: Path = Path("/sys")) -> list[str]:
    """The whole disks ("MAJ:MIN") a job working in `path` can reach, for io.max / blkio.

    The kernel takes whole disks only (a partition gives ENODEV and there is no `default` key),
    so resolve the filesystem under `path` to its disk: its device's sysfs entry, or that entry's
    parent when it is a partition. When the filesystem has no block device of its own (tmpfs,
    overlay, btrfs, 9p), the job can reach any disk: every non-virtual disk in /sys/block.
    """
    st_dev = os.stat(path).st_dev
    entry = sys_root / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}"
    if entry.exists():
        device = entry.resolve()
        if (device / "partition").exists():
            device = device.parent
        return [(device / "dev").read_text().strip()]
    return physical_disks(sys_root=sys_root)


def physical_disks(*, sys_root: Path = Path("/sys")) -> list[str]:
    disks = []
    block = sys_root / "block"
    if not block.is_dir():
        return disks
    for entry in sorted(block.iterdir()):
        if "/devices/virtual/" in str(entry.resolve()):
            continue  # loop, zram, dm, md: IO through them lands on a real disk, limited there
        disks.append((entry / "dev").read_text().strip())
    return disks
