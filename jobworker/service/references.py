"""Job references: what a request may put where it names a job, and which job that is.

A reference is a job's full id, its name, or a prefix of its id that only one job has, among
the jobs the caller may see (docker's habits, and git's for prefixes). It is read in the order
docker reads it:

1. a full id (a UUID in any case, with or without its dashes) is that job, or nothing — never a
   name (names may not look like ids) nor a prefix of another id;
2. an exact name: the caller's own job of that name first (names are unique per owner, so this
   is at most one). Only a viewer or admin sees other users' jobs; for them a name no job of
   their own has, held by one other user's job, is that job, and held by several users' jobs it
   is ambiguous: they must say which by id;
3. a prefix of exactly one id. Several: ambiguous, listing some of them.

Names shadow prefixes ("cafe" is the job named cafe, not the job whose id starts with cafe),
as in docker. The caller's scope is applied by the query, before anything is chosen: a plain
user's reference is looked for among its own jobs only, so an ambiguity, a candidate list or a
"not found" never reveals another user's job. A full id is looked up anywhere and then
authorized, the caller's hidden jobs answering exactly as unknown ids do (handlers.py).

Parsing (`parse`) and choosing among candidates (`choose`) are pure; the store finds the
candidates with two index lookups (store.py), whatever the number of jobs it keeps.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidRequest, NoSuchJob, shown
from .store import Record

# What a name may be (StartJobRequest.name): short, printable, safe in a shell and a path.
MAX_NAME_CHARS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FULL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = re.compile(r"[0-9a-f]+")
_HEX_DIGITS = frozenset("0123456789abcdef")
_DASHES = (8, 13, 18, 23)  # where a canonical id has its dashes
_ID_CHARS = 36
# Candidates an ambiguity names: enough to pick one, few enough for one line of a terminal.
SHOWN_CANDIDATES = 5
_NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference: exactly one of `job_id` (a full id, canonical) or the rest."""

    text: str  # as sent
    job_id: str | None = None
    name: str | None = None  # when it may be a name
    prefix: str | None = None  # when it may be the start of an id: canonical (lower, dashed)


def parse(text: str) -> Reference:
    """What `text` may refer to, or InvalidRequest saying why it refers to nothing ever."""
    if not text:
        raise InvalidRequest("job_id is empty: give a job's id, a unique prefix of it, or its name")
    if len(text) > MAX_NAME_CHARS:
        raise InvalidRequest(
            f"job_id {shown(text)} is {len(text)} characters long: a job id has {_ID_CHARS},"
            f" a name at most {MAX_NAME_CHARS}"
        )
    full = full_id(text)
    if full is not None:
        return Reference(text, job_id=full)
    name = text if _NAME.fullmatch(text) else None
    prefix = id_prefix(text)
    if name is None and prefix is None:
        raise InvalidRequest(
            f"job_id {shown(text)} is neither a job id, nor the start of one, nor a job name"
            f" ({_NAME_RULE})"
        )
    return Reference(text, name=name, prefix=prefix)


def full_id(text: str) -> str | None:
    """The canonical id (lower case, dashed) when `text` is a whole UUID, dashed or not."""
    lower = text.lower()
    if _FULL_ID.fullmatch(lower):
        return lower
    if len(lower) == 32 and _HEX.fullmatch(lower):
        return _dashed(lower)
    return None


def id_prefix(text: str) -> str | None:
    """The start of a canonical id that `text` is, dashed where the id has dashes (hex digits
    alone are read as a user copying an id without them); None when no id starts so."""
    lower = text.lower()
    if len(lower) < 32 and _HEX.fullmatch(lower):
        return _dashed(lower)
    if len(lower) >= _ID_CHARS:
        return None
    for i, char in enumerate(lower):
        if (char == "-") != (i in _DASHES) or (char != "-" and char not in _HEX_DIGITS):
            return None
    return lower


def _dashed(hex_digits: str) -> str:
    """Hex digits (at most 32) with dashes where a canonical id has them."""
    bounds = (0, 8, 12, 16, 20, 32)
    parts = [hex_digits[a:b] for a, b in itertools.pairwise(bounds) if a < len(hex_digits)]
    return "-".join(parts)


def name_of(text: str) -> str:
    """A valid StartJobRequest.name ("" when none is given), or InvalidRequest."""
    if not text:
        return ""
    if not _NAME.fullmatch(text):
        raise InvalidRequest(f"name {shown(text)} is not a job name: {_NAME_RULE}")
    if full_id(text) is not None:
        raise InvalidRequest(
            f"name {shown(text)} reads as a job id: a name may not be a UUID or 32 hex digits"
        )
    return text


class AmbiguousReference(InvalidRequest):
    """A name several users' jobs have (for a viewer or admin), or a prefix of several ids."""


def choose(ref: Reference, named: Sequence[Record], prefixed: Sequence[Record], me: str) -> Record:
    """The one job `ref` means, from the jobs in the caller's scope that have its name (the
    caller's own first, at most SHOWN_CANDIDATES + 1) and those whose id starts with its prefix
    (at most SHOWN_CANDIDATES + 1); NoSuchJob or AmbiguousReference otherwise."""
    own = [r for r in named if r.owner == me]
    if own:
        return own[0]
    if len(named) == 1:
        return named[0]
    if named:
        raise AmbiguousReference(
            f'jobs of several users are named "{ref.text}": {_candidates(named)};'
            " give the id (or the start of it) of the one you mean"
        )
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise AmbiguousReference(
            f'several jobs have ids starting with "{ref.text}": {_candidates(prefixed)};'
            " give more of the id, or the job's name"
        )
    raise NoSuchJob(not_found(ref))


def not_found(ref: Reference) -> str:
    """What a name or prefix that matches nothing gets: the same words whether no job has it or
    only jobs the caller may not see do (those were never looked at)."""
    # Every prefix is also a well-formed name, so only names may be nothing more.
    if ref.prefix is not None:
        return f'no job named "{ref.text}" or with an id starting with "{ref.text}"'
    return f'no job named "{ref.text}"'


def _candidates(records: Sequence[Record]) -> str:
    listed = []
    for record in records[:SHOWN_CANDIDATES]:
        named = f"name {record.name}, " if record.name else ""
        listed.append(f"{record.job_id} ({named}owner {record.owner})")
    if len(records) > SHOWN_CANDIDATES:
        listed.append("and more")
    return ", ".join(listed)
