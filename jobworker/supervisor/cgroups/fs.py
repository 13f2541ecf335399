"""Small, careful file operations on cgroupfs.

cgroupfs reports most errors at write(2) time (EINVAL for a bad value, ENODEV for a partition,
EBUSY for a populated group), so every write is one os.write on a fresh fd and its error is
turned into a CgroupError naming the file and the value.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import trio

from ..errors import CgroupError

# Polling bounds for the few kernel states that have no notification (v1 freezer state,
# v1 emptiness, the EBUSY window of rmdir): short first, then backing off.
_FIRST_POLL_S = 0.001
_MAX_POLL_S = 0.05


def write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read(path: Path | str) -> str:
    # os.read, not open(): no buffered text layer around a file of a few bytes. Live usage is
    # several of these per running job per status (ListJobs for `jobctl top` reads every
    # running job's), where that layer cost more than the kernel's side.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii")


def read_optional(path: Path | str) -> str | None:
    try:
        return read(path)
    except FileNotFoundError:
        return None


def pids(procs_file: Path) -> list[int]:
    try:
        return [int(line) for line in read(procs_file).split()]
    except FileNotFoundError:
        return []


def subgroups(directory: Path) -> list[Path]:
    """Every group beneath `directory` (not itself); none if it is gone."""
    found = []
    for top, dirs, _ in os.walk(directory):
        found.extend(Path(top) / name for name in dirs)
    return found


class Backoff:
    """Ever longer waits, for kernel states nobody notifies us about."""

    def __init__(self) -> None:
        self._delay_s = _FIRST_POLL_S

    async def wait(self) -> None:
        await trio.sleep(self._delay_s)
        self._delay_s = min(self._delay_s * 2, _MAX_POLL_S)


async def rmdir(path: Path, *, timeout_s: float = 5.0) -> None:
    """Remove a cgroup directory, retrying while the kernel still counts exiting tasks (EBUSY)."""
    backoff = Backoff()
    with trio.move_on_after(timeout_s):
        while True:
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove {path}: {exc.strerror}") from exc
            await backoff.wait()
    raise CgroupError(f"cannot remove {path}: still busy after {timeout_s:g} s")


# --- inotify: the notification cgroup.events offers to an event loop --------------------------
#
# cgroup.events signals a change with POLLPRI|POLLERR, and kernfs reports it as always readable,
# so an epoll-based loop (trio's) cannot wait on it directly: it would spin. inotify IN_MODIFY on
# the same file fires on the same kernfs notification and gives an ordinary readable fd.

_IN_MODIFY = 0x00000002
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self, path: Path) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _os_error(f"inotify_init1 for {path}")
        self._fd = fd
        if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            os.close(fd)
            raise _os_error(f"inotify_add_watch {path}")

    async def changed(self) -> None:
        await trio.lowlevel.wait_readable(self._fd)
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass

    async def aclose(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        trio.lowlevel.notify_closing(fd)
        # Closing an instance that holds a watch can wait for an RCU grace period (30 closes
        # here: median 0.1 ms, worst 16 ms): never on the event loop's thread. Bounded, so
        # shield it.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.close, fd)


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")
