"""jobworker — a single-node job runner with a mutual-TLS gRPC API.

The supervisor library is usable on its own from any Trio program::

    import jobworker

    async with jobworker.Supervisor() as sup:
        job = await sup.start("echo", ["hello"])
        print(await job.wait())
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .supervisor import *  # noqa: F403
    from .supervisor import __all__ as __all__


def __getattr__(name: str) -> Any:
    # The supervisor's names, loaded on first use (PEP 562): every `jobworker.*` import runs
    # this file first, and jobctl, a client, must not pay for the server's modules (cgroups,
    # spawning, the output log) to read `__version__` or a generated message. A submodule's
    # name is left to the import system (`from jobworker import cli` asks here first).
    if (name.startswith("__") and name != "__all__") or (
        importlib.util.find_spec(f"{__name__}.{name}") is not None
    ):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    supervisor = importlib.import_module(f"{__name__}.supervisor")
    if name == "__all__":
        return supervisor.__all__
    if name not in supervisor.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(supervisor, name)
    return value


def __dir__() -> list[str]:
    supervisor = importlib.import_module(f"{__name__}.supervisor")
    return sorted({*globals(), *supervisor.__all__})
