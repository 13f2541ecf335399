"""Isolating jobs: who a job runs as, and the cage it runs in.

A Supervisor that isolates (the default as root) runs each job

- as a transient unprivileged user of its own (systemd's DynamicUser idea: a uid/gid from a
  configured range, never shared by two live jobs, released when the job has ended; no
  supplementary groups, no capabilities, no_new_privs), or as a named local account;
- in PID, mount, IPC, UTS and cgroup namespaces of its own, and optionally a network namespace
  with only a loopback interface;
- with a private /tmp, /var/tmp and /dev/shm, the Supervisor's data directory and the paths it
  was told to hide (the server's TLS and configuration files) covered, the cgroup filesystems
  mounted afresh and read-only (showing its own group as their root, and no other job), and
  for a transient user the whole filesystem read-only except its own working directory and
  those private directories (systemd's ProtectSystem=strict).

This module plans; `cage/cage.c` (the `jobworker-cage` program, built with the package) carries
the plan out in the child, in order, and fails closed. Planning is pure: `cage_argv` turns a
`CagePlan` into the program's command line, and tests read it without a kernel.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import random
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import InvalidJobSpec, IsolationUnavailable, TransientUsersExhausted
from .status import RunAs

Network = Literal["host", "none"]
NETWORKS: tuple[Network, ...] = ("host", "none")

# Between the 16-bit range (where systemd's DynamicUser= takes 61184-65519) and the first
# block of subordinate ids that useradd hands out (SUB_UID_MIN 100000), so by default the
# transient users collide with neither. Ranges listed in /etc/subuid or /etc/subgid, and ids
# the user and group databases name, are left out of the pool anyway.
DEFAULT_TRANSIENT_UIDS = range(70000, 80000)
# One lock file for every Supervisor on the machine: a transient uid is taken by holding an
# open-file-description lock on the byte at its offset, which the kernel drops when the holder
# closes it or dies. So two servers never hand out the same uid, and a crash leaks none.
DEFAULT_LOCK_FILE = Path("/run/jobworker/transient-uids.lock")
# Directories a job always gets fresh and private (PrivateTmp=, plus POSIX shared memory).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Never covered as a whole: a TLS file kept in one of these is hidden by itself.
_SHARED_DIRS = frozenset(
    ("/", "/etc", "/root", "/home", "/usr", "/var", "/opt", "/srv", "/run", "/tmp", "/var/lib")
)

_CAGE = Path(__file__).resolve().parent / "jobworker-cage"


@dataclass(frozen=True, slots=True)
class Isolation:
    """How a Supervisor isolates its jobs.

    - transient_uids: where transient users come from (each job gets one uid, with gid = uid).
    - hide: paths no job may see, besides the Supervisor's data directory (the server passes its
      TLS and configuration files; for a file, its directory is covered too unless that is a
      shared one such as /etc).
    - lock_file: shared by every Supervisor on the machine that allocates from the same range.
    """

    transient_uids: range = DEFAULT_TRANSIENT_UIDS
    hide: tuple[str, ...] = ()
    lock_file: Path = DEFAULT_LOCK_FILE

    def __post_init__(self) -> None:
        r = self.transient_uids
        if r.step != 1 or len(r) == 0 or r.start < 1 or r.stop > 2**31:
            raise ValueError(f"transient_uids must be a non-empty range of ids in 1..2^31, not {r}")
        for path in self.hide:
            if not os.path.isabs(path):
                raise ValueError(f"paths to hide must be absolute, not {path!r}")


# --- who a job runs as ---------------------------------------------------------------------


def account(user: str | int) -> RunAs:
    """A local account by name or uid, with its primary and supplementary groups."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise InvalidJobSpec(f"no local account {user!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid}))
    return RunAs(
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        name=entry.pw_name,
        groups=groups,
        home=entry.pw_dir or None,
    )


def this_process() -> RunAs:
    """Who an unisolated job runs as: whoever runs the Supervisor."""
    uid, gid = os.getuid(), os.getgid()
    try:
        entry = pwd.getpwuid(uid)
        name, home = entry.pw_name, entry.pw_dir or None
    except KeyError:
        name, home = "", None
    return RunAs(uid=uid, gid=gid, name=name, groups=tuple(os.getgroups()), home=home)


class UidPool:
    """Transient uids, each held by one live job of any Supervisor on the machine."""

    def __init__(self, uids: range, lock_file: Path) -> None:
        self._uids = uids
        self._lock_file = lock_file
        self._fd: int | None = None
        self._free: deque[int] = deque()
        self._held: set[int] = set()

    def open(self) -> None:
        taken = _named_ids() | _subordinate_ids(self._uids)
        free = [uid for uid in self._uids if uid not in taken]
        if not free:
            raise IsolationUnavailable(
                f"no transient uid left in {self._uids.start}-{self._uids.stop - 1}: every one "
                "is a named user or group, or a subordinate id in /etc/subuid or /etc/subgid"
            )
        # Start somewhere random so that servers sharing the range do not queue on one uid.
        cut = random.randrange(len(free))
        self._free = deque(free[cut:] + free[:cut])
        try:
            self._lock_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IsolationUnavailable(
                f"cannot open {self._lock_file}: {exc.strerror}; transient users need it"
            ) from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops every lock still held
            self._fd = None

    def acquire(self) -> int:
        """A uid no live job holds, least recently released first; locked until release()."""
        assert self._fd is not None, "UidPool.open() first"
        for _ in range(len(self._free)):
            uid = self._free.popleft()
            if _lock(self._fd, uid, fcntl.F_WRLCK):
                self._held.add(uid)
                return uid
            self._free.append(uid)  # another Supervisor's: try it again later
        raise TransientUsersExhausted(
            f"every transient uid in {self._uids.start}-{self._uids.stop - 1} is in use"
        )

    def release(self, uid: int) -> None:
        if uid not in self._held:
            return
        self._held.discard(uid)
        if self._fd is not None:
            _lock(self._fd, uid, fcntl.F_UNLCK)
        self._free.append(uid)


# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("@hhqqi4x")


def _lock(fd: int, offset: int, kind: int) -> bool:
    request = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _named_ids() -> set[int]:
    return {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


def _subordinate_ids(within: range) -> set[int]:
    taken: set[int] = set()
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for start, count in parse_subordinate_ranges(text):
            lo, hi = max(start, within.start), min(start + count, within.stop)
            taken.update(range(lo, hi))
    return taken


def parse_subordinate_ranges(text: str) -> list[tuple[int, int]]:
    """(start, count) from /etc/subuid-style lines ``name:start:count``; others are skipped."""
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            ranges.append((int(parts[1]), int(parts[2])))
    return ranges


# --- the cage ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CagePlan:
    """Everything the cage needs to know about one job."""

    argv: Sequence[str]
    cwd: str
    run_as: RunAs
    network: Network
    cgroup_procs: Sequence[Path] = ()  # the files the job writes itself into, before exec
    # The cgroup filesystems as (mount point, type, options): the job mounts each afresh,
    # read-only, from inside its cgroup namespace (its own group is then their root).
    cgroupfs: Sequence[tuple[Path, str, str]] = ()
    hide: Sequence[str] = ()  # paths covered (the data directory, the server's secrets)
    bind: Sequence[str] = ()  # directories kept visible and writable (its own working directory)
    mqueue: str | None = None
    private_dirs: Sequence[str] = field(default=PRIVATE_DIRS)


def cage_argv(plan: CagePlan, *, report_fd: int, env_fd: int, lifeline_fd: int) -> list[str]:
    """The `jobworker-cage` command line that carries `plan` out (see cage/cage.c)."""
    argv = [
        os.fspath(_CAGE),
        "--report-fd",
        str(report_fd),
        "--env-fd",
        str(env_fd),
        "--lifeline-fd",
        str(lifeline_fd),
        "--chdir",
        plan.cwd,
    ]
    user = plan.run_as
    if user.uid != 0:
        argv += ["--uid", str(user.uid), "--gid", str(user.gid)]
        argv += ["--groups", ",".join(str(g) for g in user.groups)]
    if user.transient:
        argv.append("--readonly-root")
    if plan.network == "none":
        argv.append("--net-none")
    for directory in plan.private_dirs:
        if os.path.isdir(directory):
            argv += ["--tmpfs", directory]
    if plan.mqueue:
        argv += ["--mqueue", plan.mqueue]
    for path in plan.hide:
        argv += ["--hide", path]
    for path in plan.bind:
        argv += ["--bind", path]
    for procs in plan.cgroup_procs:
        argv += ["--cgroup", os.fspath(procs)]
    for point, fstype, options in plan.cgroupfs:
        argv += ["--cgroupfs", f"{fstype}:{options}:{os.fspath(point)}"]
    return [*argv, "--", *plan.argv]


def paths_to_hide(data_dir: Path, extra: Iterable[str]) -> list[str]:
    """The data directory, and each extra path with (unless shared) the directory holding it."""
    hidden: list[str] = [os.fspath(data_dir)]
    for path in extra:
        path = os.path.normpath(path)
        if os.path.isdir(path):
            candidates = [path]
        else:
            parent = os.path.dirname(path)
            candidates = [path] if parent in _SHARED_DIRS else [parent, path]
        for candidate in candidates:
            if candidate not in hidden and candidate not in _SHARED_DIRS:
                hidden.append(candidate)
    # A covered directory hides everything beneath it: covering a path inside it again would
    # fail (it no longer exists in the job's view) and is pointless.
    hidden.sort(key=len)
    kept: list[str] = []
    for path in hidden:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def cage_program() -> Path:
    """The `jobworker-cage` program, or IsolationUnavailable saying how to get it."""
    if not os.access(_CAGE, os.X_OK):
        raise IsolationUnavailable(
            f"{_CAGE} is missing: it is built when jobworker is installed (pip install needs a "
            "C compiler and libc's static library, Debian: gcc libc6-dev); or run with "
            "isolation off"
        )
    return _CAGE


def check_isolation_possible() -> None:
    """Isolation needs root (namespaces, mounts, setresuid) and the cage program."""
    if os.geteuid() != 0:
        raise IsolationUnavailable(
            "isolating jobs needs root (namespaces, mounts and changing user); "
            "run as root or with isolation off"
        )
    cage_program()


def mqueue_mount() -> str | None:
    """/dev/mqueue when it is a mount point: the job gets its IPC namespace's own there."""
    path = "/dev/mqueue"
    try:
        return path if os.path.ismount(path) else None
    except OSError:
        return None
