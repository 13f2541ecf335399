"""The server's event log: one line per event, on the ``jobworker.events`` logger.

Events: a job created, a stop requested, a job ended, and every authentication or authorization
failure, each with the identity concerned. Lines are ``<event> key=value ...``; a value that is
not a plain word is written as a JSON string (ASCII only), so a command line or a name can never
break a line in two or forge another event. The library configures no handler: the CLI does
(stderr), tests use caplog.

The pairs stay structured too: `fields` returns the text with its values attached (`Fields`),
so a JSON formatter writes them as keys of its own rather than parsing text back. And the
identity of the call being served is in `caller` (set once a handler knows who calls): a line
logged anywhere under that call — a store error, the transport's INTERNAL — can carry it.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar

from jobworker.supervisor import JobStatus

events = logging.getLogger("jobworker.events")

# The identity (certificate CN) of the call the current task serves. A contextvar because each
# call runs in a task of its own (Trio copies the context into each new task), so a value set
# by one handler is never seen by another call's lines.
caller: ContextVar[str | None] = ContextVar("jobworker_caller", default=None)

_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+%-]+")


class Fields(str):
    """The ``key=value`` text of an event, with the values it was made of (`values`)."""

    values: dict[str, object]


def fields(**values: object) -> Fields:
    """``key=value`` pairs, in order; None values are left out."""
    parts = []
    kept: dict[str, object] = {}
    for key, value in values.items():
        if value is None:
            continue
        kept[key] = value
        text = value if isinstance(value, str) else str(value)
        if not _PLAIN.fullmatch(text):
            text = json.dumps(text)  # ensure_ascii: no control or line-separator characters
        parts.append(f"{key}={text}")
    text = Fields(" ".join(parts))
    text.values = kept
    return text


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
