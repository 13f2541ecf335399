"""The server's event log: one line per event, on the ``jobworker.events`` logger.

Events: a job created, a stop requested, a job ended, and every authentication or authorization
failure, each with the identity concerned. Lines are ``<event> key=value ...``; a value that is
not a plain word is written as a JSON string (ASCII only), so a command line or a name can never
break a line in two or forge another event. The library configures no handler: the CLI does
(stderr), tests use caplog.
"""

from __future__ import annotations

import json
import logging
import re

from jobworker.supervisor import JobStatus

events = logging.getLogger("jobworker.events")

_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+%-]+")


def fields(**values: object) -> str:
    """``key=value`` pairs, in order; None values are left out."""
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        if not _PLAIN.fullmatch(text):
            text = json.dumps(text)  # ensure_ascii: no control or line-separator characters
        parts.append(f"{key}={text}")
    return " ".join(parts)


def exit_cause(status: JobStatus) -> str | None:
    """Why the job ended, beyond its exit code, in words; None when there is nothing to add."""
    causes = []
    if status.stop_requested_by is not None:
        causes.append(f"stopped by {status.stop_requested_by}")
    if status.escalated:
        causes.append("escalated to SIGKILL")
    if status.oom_killed:
        causes.append("OOM-killed")
    if status.pids_limit_hit:
        causes.append("pids limit hit")
    return "; ".join(causes) or None
