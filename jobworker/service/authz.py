"""Authorization: who may do what to which job. One pure function over one table.

Rules (issue 4): a plain user (no role) starts jobs and sees, stops and reads only its own;
another's job is hidden from it (NOT_FOUND, exactly as for a job that does not exist, so it
never learns that the job exists). A viewer lists and reads the status and logs of every job
and starts and stops nothing (PERMISSION_DENIED: it may see the job, so hiding it would be a
lie). An admin may do everything to every job.

Decisions where the issue is silent:

* Several roles grant the union of their rights: for each role the table gives a decision and
  the most permissive one wins, ALLOW over DENY over HIDE (a caller that may see a job is told
  it exists). So admin+viewer is admin.
* Roles are only ``Role`` values: OU values we do not know never reach this function (see
  identity.py), so they grant nothing.
* START concerns no existing job; the new job is the caller's, so ownership never changes the
  decision. LIST with ``is_owner=True`` lists the caller's own jobs, ``is_owner=False`` every job.
* A viewer that owns a job (a CN that was a plain user before) still stops nothing: "stops
  nothing" is the role's promise.
* DELETE (issue 12: `jobctl rm` and `prune`) is the owner's or an admin's, like STOP; a prune
  of every user's jobs asks for it with ``is_owner=False``: admin only.
* SIGNAL (issue 14: `jobctl kill`) acts on a job's processes as a stop does: like STOP.
  Waiting for a job's end (WaitJob) reads its status: READ_STATUS.
* WRITE_INPUT (issue 15: `jobctl run -i`) feeds the job what it reads: what it does with it is
  acting on the job, so like STOP (a viewer only watches).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from .identity import Role


class Action(enum.Enum):
    START = "start"
    STOP = "stop"
    SIGNAL = "signal"
    READ_STATUS = "status"
    READ_LOGS = "logs"
    LIST = "list"
    DELETE = "delete"
    WRITE_INPUT = "input"


class Decision(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"  # PERMISSION_DENIED
    HIDE = "hide"  # NOT_FOUND, indistinguishable from a job that does not exist


# Most permissive first: with several roles, the first of these any role grants wins.
_PRECEDENCE = (Decision.ALLOW, Decision.DENY, Decision.HIDE)

_A, _D, _H = Decision.ALLOW, Decision.DENY, Decision.HIDE

# (action, caller owns the job) -> the decision for a plain user, a viewer, an admin.
# fmt: off
_TABLE: dict[tuple[Action, bool], tuple[Decision, Decision, Decision]] = {
    #                               user  viewer admin
    (Action.START,       True):    (_A,   _D,    _A),
    (Action.START,       False):   (_A,   _D,    _A),
    (Action.STOP,        True):    (_A,   _D,    _A),
    (Action.STOP,        False):   (_H,   _D,    _A),
    (Action.SIGNAL,      True):    (_A,   _D,    _A),
    (Action.SIGNAL,      False):   (_H,   _D,    _A),
    (Action.READ_STATUS, True):    (_A,   _A,    _A),
    (Action.READ_STATUS, False):   (_H,   _A,    _A),
    (Action.READ_LOGS,   True):    (_A,   _A,    _A),
    (Action.READ_LOGS,   False):   (_H,   _A,    _A),
    (Action.LIST,        True):    (_A,   _A,    _A),
    (Action.LIST,        False):   (_D,   _A,    _A),
    (Action.DELETE,      True):    (_A,   _D,    _A),
    (Action.DELETE,      False):   (_H,   _D,    _A),
    (Action.WRITE_INPUT, True):    (_A,   _D,    _A),
    (Action.WRITE_INPUT, False):   (_H,   _D,    _A),
}
# fmt: on
_USER = None  # the column of a caller with no role at all
_COLUMN = {_USER: 0, Role.VIEWER: 1, Role.ADMIN: 2}


def authorize(roles: Iterable[Role], action: Action, is_owner: bool) -> Decision:
    """May a caller with `roles` (empty: a plain user) do `action` to a job it owns or not?"""
    row = _TABLE[action, is_owner]
    granted = {row[_COLUMN[role]] for role in roles} or {row[_COLUMN[_USER]]}
    return next(decision for decision in _PRECEDENCE if decision in granted)
