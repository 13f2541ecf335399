"""jobworker — a single-node job runner with a mutual-TLS gRPC API.

The supervisor library is usable on its own from any Trio program::

    import jobworker

    async with jobworker.Supervisor() as sup:
        job = await sup.start("echo", ["hello"])
        print(await job.wait())
"""

from .supervisor import *  # noqa: F403
from .supervisor import __all__ as __all__

__version__ = "0.1.0"
