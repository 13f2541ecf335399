"""Every role set x action x owned-or-not, against the rules of issue 4 written out again here
as plain conditions (not the table), plus what the decisions become on the wire."""

from __future__ import annotations

import itertools

import pytest

from jobworker.service import Action, Decision, Role, authorize

ROLE_SETS = [
    frozenset(combo) for n in range(len(Role) + 1) for combo in itertools.combinations(Role, n)
]


def expected(roles: frozenset[Role], action: Action, is_owner: bool) -> Decision:
    """Issue 4, sentence by sentence."""
    # "admin: everything on every job." (and several roles grant the union of their rights)
    if Role.ADMIN in roles:
        return Decision.ALLOW
    # "viewer: lists and reads the status and logs of every job; starts and stops nothing."
    # Issue 12: removing a job (rm, prune) is the owner's or an admin's, as stopping it is;
    # issue 14: so is signalling it (kill); issue 15: so is feeding its stdin (run -i).
    if Role.VIEWER in roles:
        if action in (Action.START, Action.STOP, Action.DELETE, Action.SIGNAL, Action.WRITE_INPUT):
            return Decision.DENY
        return Decision.ALLOW
    # "user: starts jobs; sees, stops and reads only the jobs it started." Listing every job
    # is a viewer's or admin's right: refused outright. Another's job does not exist for it.
    if action is Action.START:
        return Decision.ALLOW
    if action is Action.LIST:
        return Decision.ALLOW if is_owner else Decision.DENY
    return Decision.ALLOW if is_owner else Decision.HIDE


@pytest.mark.parametrize("is_owner", [True, False], ids=["own", "others"])
@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.name)
@pytest.mark.parametrize(
    "roles", ROLE_SETS, ids=lambda r: "+".join(sorted(x.value for x in r)) or "user"
)
def test_every_role_set_action_and_ownership(
    roles: frozenset[Role], action: Action, is_owner: bool
) -> None:
    assert authorize(roles, action, is_owner) is expected(roles, action, is_owner)


def test_roles_may_come_as_any_iterable() -> None:
    assert authorize([Role.VIEWER, Role.VIEWER], Action.STOP, False) is Decision.DENY
    assert authorize(iter([Role.ADMIN]), Action.STOP, False) is Decision.ALLOW
    assert authorize((), Action.STOP, False) is Decision.HIDE


def test_a_plain_user_never_learns_of_anothers_job() -> None:
    # The property owner isolation rests on, stated on its own: for a user, every action on
    # someone else's job is hidden, never merely denied.
    for action in (Action.STOP, Action.SIGNAL, Action.READ_STATUS, Action.READ_LOGS):
        assert authorize(frozenset(), action, is_owner=False) is Decision.HIDE


def test_every_action_has_words_for_its_refusal() -> None:
    """A refusal names what was refused: an action without words would fail the call with a
    KeyError instead of PERMISSION_DENIED."""
    from jobworker.service.handlers import _WHAT

    assert set(_WHAT) == set(Action)
