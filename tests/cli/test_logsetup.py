"""The server's log lines as text and as JSON: event fields stay structured, and the caller's
identity is kept on every line logged under its call."""

from __future__ import annotations

import contextvars
import json
import logging
import sys

import pytest

from jobworker.cli.logsetup import JsonFormatter, TextFormatter, configure_logging
from jobworker.service.events import caller, fields


def record(msg: str, *args: object, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.getLogger("jobworker.events").makeRecord(
        "jobworker.events", level, __file__, 1, msg, args, exc_info
    )


def in_call(identity: str | None, fn):
    """`fn()` as a handler's task would run it: with the caller set in a context of its own."""

    def run():
        if identity is not None:
            caller.set(identity)
        return fn()

    return contextvars.Context().run(run)


def test_json_lines_carry_event_fields_as_keys() -> None:
    line = JsonFormatter().format(
        record("job ended %s", fields(job="j1", owner="alice", exit_code=3, signal=None))
    )
    assert "\n" not in line
    obj = json.loads(line)
    assert obj.pop("time").endswith("Z")
    assert obj == {
        "level": "info",
        "logger": "jobworker.events",
        "message": "job ended",
        "identity": "alice",  # no call logged it: the identity the event concerns
        "job": "j1",
        "owner": "alice",
        "exit_code": 3,
    }


def test_json_identity_is_the_caller_under_a_call_and_reserved_names_are_kept_apart() -> None:
    rec = record("stop requested %s", fields(job="j1", owner="alice", by="carol", level="x\ny"))
    obj = json.loads(in_call("carol", lambda: JsonFormatter().format(rec)))
    assert (obj["identity"], obj["owner"], obj["level"], obj["field.level"]) == (
        "carol",
        "alice",
        "info",
        "x\ny",
    )
    plain = json.loads(in_call(None, lambda: JsonFormatter().format(record("stopped"))))
    assert "identity" not in plain and plain["message"] == "stopped"


def test_json_keeps_the_traceback_of_an_error() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record("store failed: %s", "boom", level=logging.ERROR, exc_info=sys.exc_info())
    obj = json.loads(in_call("bob", lambda: JsonFormatter().format(rec)))
    assert obj["message"] == "store failed: boom" and obj["identity"] == "bob"
    assert obj["level"] == "error" and "RuntimeError: boom" in obj["exception"]


def test_text_lines_name_the_caller_unless_the_event_already_does() -> None:
    error = record("job %s: cannot record its status: %s", "j1", "disk full")
    line = in_call("alice", lambda: TextFormatter().format(error))
    assert line.endswith(" jobworker.events INFO job j1: cannot record its status: disk full"
                         " identity=alice")  # fmt: skip
    event = record("stop requested %s", fields(job="j1", owner="bob", by="alice"))
    line = in_call("alice", lambda: TextFormatter().format(event))
    assert line.endswith("INFO stop requested job=j1 owner=bob by=alice")
    assert not in_call(None, lambda: TextFormatter().format(error)).endswith("identity=alice")


@pytest.fixture
def restore_logging():
    names = ("jobworker", "jobworker.supervisor")
    saved = [(logging.getLogger(n).level, logging.getLogger(n).handlers[:]) for n in names]
    propagate = logging.getLogger("jobworker").propagate
    yield
    for name, (level, handlers) in zip(names, saved, strict=True):
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers
    logging.getLogger("jobworker").propagate = propagate


@pytest.mark.parametrize(
    ("level", "root", "supervisor"),
    [
        ("debug", logging.DEBUG, logging.DEBUG),  # -v: the supervisor's own lines too
        ("info", logging.INFO, logging.WARNING),
        ("warning", logging.WARNING, logging.WARNING),
        ("error", logging.ERROR, logging.ERROR),
    ],
)
def test_levels_and_a_second_configuration_replaces_the_first(
    restore_logging, level: str, root: int, supervisor: int
) -> None:
    configure_logging(format="json", level="debug")
    configure_logging(format="text", level=level)
    top = logging.getLogger("jobworker")
    assert len(top.handlers) == 1 and isinstance(top.handlers[0].formatter, TextFormatter)
    assert (top.level, logging.getLogger("jobworker.supervisor").level) == (root, supervisor)
