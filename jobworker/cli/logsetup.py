"""Where `jobworker serve`'s log lines go and how they look: stderr, as text or JSON lines.

Text (the default), one line per record::

    2026-12-06T03:31:11.042Z jobworker.events INFO job created job=… owner=alice …

JSON, one object per line, for collectors that would otherwise parse text back::

    {"time": "2026-12-06T03:31:11.042Z", "level": "info", "logger": "jobworker.events",
     "message": "job created", "identity": "alice", "job": "…", "owner": "alice", …}

An event's ``key=value`` pairs (`events.fields`) become keys of the object, so a collector
filters on ``owner`` without a regular expression. ``identity`` is the caller whose call logged
the line (`events.caller`, set by the service once it knows who calls) or, for a line no call
logged (a job's end, a shutdown's stop), the identity the event concerns: its ``identity`` or
``owner`` field. In text, a line logged under a call that does not name its caller already (a
store error, the transport's INTERNAL) ends with ``identity=NAME``.

`configure_logging` may be called again (a configuration reload): the one handler is kept and
only its formatter and the levels change, so no line is lost or written twice meanwhile.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from jobworker.service.events import Fields, caller, fields

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Keys of every JSON line; an event field of the same name is written as "field.<name>".
_RESERVED = ("time", "level", "logger", "message", "identity", "exception")

_handler = logging.StreamHandler(sys.stderr)


def configure_logging(*, format: str = "text", level: str = "info") -> None:
    """Everything under the "jobworker" logger to stderr at `level` and above: events (job
    created, stopped, ended, authorization failures), the transport's connection problems, and
    our own lines. The supervisor's per-job lines repeat the events, so below warning they
    show only at debug."""
    _handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger("jobworker")
    root.handlers[:] = [_handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
    supervisor = logging.DEBUG if level == "debug" else max(LEVELS[level], logging.WARNING)
    logging.getLogger("jobworker.supervisor").setLevel(supervisor)


def _stamp(record: logging.LogRecord) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{whole}.{int(record.msecs):03d}Z"


def _fields_of(record: logging.LogRecord) -> dict[str, object]:
    args = record.args if isinstance(record.args, tuple) else ()
    found: dict[str, object] = {}
    for arg in args:
        if isinstance(arg, Fields):
            found.update(arg.values)
    return found


class TextFormatter(logging.Formatter):
    """UTC timestamp with milliseconds, logger, level, message[, identity=NAME]."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _stamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        who = caller.get()
        if who is not None and not _fields_of(record).keys() & {"identity", "by", "owner"}:
            line += f" {fields(identity=who)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record (ASCII only: no character of a value can end a line)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = _fields_of(record)
        message = record.getMessage()
        if extra:
            # The text without its key=value pairs: they are keys of the object instead.
            args = tuple("" if isinstance(a, Fields) else a for a in record.args or ())
            try:
                message = (record.msg % args).strip()
            except (TypeError, ValueError):
                pass
        line: dict[str, Any] = {
            "time": _stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        identity = caller.get() or extra.get("identity") or extra.get("owner")
        if identity is not None:
            line["identity"] = identity
        for key, value in extra.items():
            if key == "identity" and value == identity:
                continue
            name = f"field.{key}" if key in _RESERVED else key
            line[name] = value if isinstance(value, int | float | bool | str) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)
