"""`jobctl`: the client. Its commands (start, stop, status, logs, list, run) arrive with the
JobService API."""

from __future__ import annotations

from cyclopts import App

import jobworker

app = App(
    name="jobctl",
    help="Start, stop, inspect and follow jobs on a jobworker server.",
    version=jobworker.__version__,
)
