"""`jobworker`: the server. Its commands (serve, certs) arrive with the JobService API."""

from __future__ import annotations

from cyclopts import App

import jobworker

app = App(
    name="jobworker",
    help="Run Linux commands as supervised jobs in cgroups, behind a mutual-TLS gRPC API.",
    version=jobworker.__version__,
)
