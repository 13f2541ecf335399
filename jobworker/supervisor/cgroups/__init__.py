"""Linux cgroups for jobs: discovery, per-job groups, limits, tree kill, accounting."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from ..errors import CgroupsUnavailable
from ..limits import Limits
from .backends import NoCgroups, V1Backend, V2Backend
from .discover import V2_CONTROLLERS, Layout, current_layout
from .group import JobGroup

CgroupMode = Literal["auto", "v2", "v1", "off"]


class Backend(Protocol):
    kind: str  # "v2", "v1" or "off"
    caveats: tuple[str, ...]  # limits the kernel applies only in part, in words

    @property
    def subtrees(self) -> tuple[Path, ...]:
        """The directories made for this Supervisor, one per hierarchy (none without cgroups);
        every job's group is ``<subtree>/<job id>``."""
        ...

    def create(self, job_id: str, limits: Limits, cwd: str) -> JobGroup: ...
    async def aclose(self) -> None: ...


def open_backend(mode: CgroupMode, name: str, *, layout: Layout | None = None) -> Backend:
    """The backend for `mode`, with this Supervisor's subtree (named `name`) created.

    "auto" takes cgroup v2 when this process's cgroup2 group offers every controller a job
    needs, else the v1 controllers (a hybrid machine), else refuses with the fix.
    """
    if mode == "off":
        return NoCgroups()
    if mode not in ("auto", "v1", "v2"):
        raise ValueError(f"cgroups must be 'auto', 'v2', 'v1' or 'off', not {mode!r}")
    layout = layout or current_layout()
    if mode == "v2" or (mode == "auto" and _v2_usable(layout)):
        if layout.unified is None:
            raise CgroupsUnavailable("no cgroup2 hierarchy is mounted")
        return V2Backend(layout.unified, name)
    return V1Backend(layout, name)


def _v2_usable(layout: Layout) -> bool:
    if layout.unified is None:
        return False
    own = layout.unified
    base = own.parent if own.name == V2Backend.SUPERVISOR_LEAF else own
    try:
        available = (base / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return all(c in available for c in V2_CONTROLLERS)


__all__ = ["Backend", "CgroupMode", "JobGroup", "open_backend"]
