"""Job references (issue 14): a full id, a name, or a unique id prefix, wherever a request
names a job. Parsing on its own, then through the real server: the order of resolution,
ambiguity, names (validation, uniqueness, races), and the authorization boundary — a plain user
never resolves, nor learns of, another user's job by its name or a prefix of its id."""

from __future__ import annotations

import functools
import types
import uuid
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from jobworker.purgatory import GrpcError, Status
from jobworker.service import InvalidRequest, handlers
from jobworker.service.references import SHOWN_CANDIDATES, name_of, parse
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Served

NIL = "00000000-0000-0000-0000-000000000000"
ID = "5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a51"


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [ID, ID.upper(), ID.replace("-", ""), ID.replace("-", "").upper()])
def test_a_whole_id_in_any_spelling_is_that_id(text: str) -> None:
    ref = parse(text)
    assert (ref.job_id, ref.name, ref.prefix) == (ID, None, None)


def test_any_well_formed_uuid_is_an_id_even_one_no_job_can_have() -> None:
    # The nil UUID and other versions than 4: "not found", never "malformed".
    for text in (NIL, str(uuid.uuid1()), "ffffffff-ffff-ffff-ffff-ffffffffffff"):
        assert parse(text).job_id == text


@pytest.mark.parametrize(
    ("text", "name", "prefix"),
    [
        ("5c1b", "5c1b", "5c1b"),  # hex: a name, and the start of an id
        ("5C1B", "5C1B", "5c1b"),  # ids are lower case, names keep theirs
        ("5c1b7f1e3a9d", "5c1b7f1e3a9d", "5c1b7f1e-3a9d"),  # copied without its dashes
        ("5c1b7f1e-3a", "5c1b7f1e-3a", "5c1b7f1e-3a"),
        ("5c1b7f1e-", "5c1b7f1e-", "5c1b7f1e-"),  # a name may end in a dash
        ("build", "build", None),
        ("train.v2_final-1", "train.v2_final-1", None),
        ("5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a5", "5c1b7f1e-3a9d-4f6e-9b2a-0d4c8e7f6a5", ID[:-1]),
        (ID + "0", ID + "0", None),  # too long for an id: only a name
        ("5c1b-7f1e", "5c1b-7f1e", None),  # dashes where ids have none: only a name
    ],
)
def test_names_and_prefixes(text: str, name: str | None, prefix: str | None) -> None:
    ref = parse(text)
    assert (ref.job_id, ref.name, ref.prefix) == (None, name, prefix)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters long"),
        ("y" * 100_000, "100000 characters long"),
        ("-rf", "neither a job id"),
        (".hidden", "neither a job id"),
        ("a b", "neither a job id"),
        ("../../etc/passwd", "neither a job id"),
        ("\x1b]0;pwned\x07", "neither a job id"),
        ("caf\u00e9", "neither a job id"),
        ("{" + ID + "}", "neither a job id"),
        (ID + "\n", "neither a job id"),
    ],
)
def test_garbage_is_invalid_with_a_message_that_helps(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(text)
    message = str(caught.value)
    assert words in message and "job_id" in message and len(message) < 200
    assert message.isprintable()  # control characters shown escaped, never raw


def test_names_are_validated_as_the_schema_says() -> None:
    assert name_of("") == ""
    for good in ("a", "build", "A.b_c-9", "x" * 64, "cafe", "5c1b7f1e-3a"):
        assert name_of(good) == good
    for bad, words in [
        ("x" * 65, "not a job name"),
        ("-x", "not a job name"),
        ("_x", "not a job name"),
        ("a/b", "not a job name"),
        ("a b", "not a job name"),
        ("\x1b[2J", "not a job name"),
        (ID, "reads as a job id"),
        (ID.upper(), "reads as a job id"),
        (ID.replace("-", ""), "reads as a job id"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            name_of(bad)


# --- through the server ---------------------------------------------------------------------------

SLEEP = ("sleep", "600")


@pytest.fixture
def ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The ids the next StartJobs will give, in order, as the test appends them; once they run
    out, random ones again. So a test can make ids that share a prefix."""
    planned: list[str] = []
    monkeypatch.setattr(
        handlers,
        "uuid",
        types.SimpleNamespace(uuid4=lambda: planned.pop(0) if planned else uuid.uuid4()),
    )
    yield planned


async def error_of(call) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        await call
    return caught.value


async def test_a_job_is_its_id_its_name_and_any_unique_prefix_of_its_id(served: Served) -> None:
    alice = served.client("alice")
    job_id = await alice.start(*SLEEP, name="build")
    other = await alice.start(*SLEEP)
    status = await alice.status(job_id)
    assert status.name == "build"
    unique = next(n for n in range(1, 37) if not other.startswith(job_id[:n]))
    for ref in (job_id, job_id.upper(), job_id.replace("-", ""), "build", job_id[:unique]):
        assert (await alice.status(ref)).job_id == job_id, ref
    assert {j.job_id: j.name for j in await alice.list()} == {job_id: "build", other: ""}
    # Every call that names a job takes one: stop (and logs, wait, signal, delete) too.
    stopped = await alice.call("StopJob", pb.StopJobRequest(job_id="build"))
    assert stopped.status.job_id == job_id and stopped.status.name == "build"
    assert (await alice.wait("build")).state == pb.JOB_STATE_STOPPED
    await alice.call("DeleteJob", pb.DeleteJobRequest(job_id="build"))
    assert [j.job_id for j in await alice.list()] == [other]
    assert (await alice.stop(other[0])).job_id == other  # now alice's only job


async def test_well_formed_references_to_nothing_are_not_found(served: Served) -> None:
    alice = served.client("alice")
    for ref, message in [
        (NIL, f"job {NIL} not found"),
        (str(uuid.uuid1()), "not found"),
        ("nope", 'no job named "nope"'),
        ("cafe", 'no job named "cafe" or with an id starting with "cafe"'),
        ("5C1B7F1E-", 'no job named "5C1B7F1E-" or with an id starting with "5C1B7F1E-"'),
        (ID + "0", f'no job named "{ID}0"'),
    ]:
        for call in (alice.status(ref), alice.stop(ref), alice.logs(ref), alice.wait(ref)):
            error = await error_of(call)
            assert error.status is Status.NOT_FOUND and message in error.message, (ref, error)


async def test_a_name_shadows_a_prefix_as_in_docker(served: Served, ids: list[str]) -> None:
    alice = served.client("alice")
    ids += ["cafe0000-0000-4000-8000-000000000001"]
    by_prefix = await alice.start(*SLEEP)
    named = await alice.start(*SLEEP, name="cafe")
    assert (await alice.status("cafe")).job_id == named
    assert (await alice.status("cafe0")).job_id == by_prefix
    for job_id in (by_prefix, named):
        await alice.stop(job_id)


async def test_an_ambiguous_prefix_lists_some_candidates(served: Served, ids: list[str]) -> None:
    alice = served.client("alice")
    ids += [f"abc{n}0000-0000-4000-8000-00000000000{n}" for n in range(SHOWN_CANDIDATES + 1)]
    made = [await alice.start("true", name=f"j{n}") for n in range(SHOWN_CANDIDATES + 1)]
    error = await error_of(alice.status("abc"))
    assert error.status is Status.INVALID_ARGUMENT
    assert 'several jobs have ids starting with "abc"' in error.message
    for job_id in made[:SHOWN_CANDIDATES]:
        assert job_id in error.message
    assert made[-1] not in error.message and "and more" in error.message
    assert "(name j0, owner alice)" in error.message and "give more of the id" in error.message
    assert (await alice.status("abc1")).job_id == made[1]
    # Where several are ambiguous, the name still says which.
    assert (await alice.status("j3")).job_id == made[3]


async def test_a_user_never_resolves_nor_learns_of_another_users_job(
    served: Served, ids: list[str]
) -> None:
    alice, bob = served.client("alice"), served.client("bob")
    ids += ["dead0000-0000-4000-8000-00000000000a", "dead1111-0000-4000-8000-00000000000b"]
    alices = await alice.start(*SLEEP, name="secret")
    bobs = await bob.start(*SLEEP, name="mine")
    # bob's prefix "dead" matches alice's job too: for bob it is his job, not an ambiguity
    # that would reveal hers.
    assert (await bob.status("dead")).job_id == bobs
    assert (await alice.status("dead")).job_id == alices
    for me, theirs_name, theirs_prefix in ((bob, "secret", "dead0"), (alice, "mine", "dead1")):
        for action in (me.status, me.stop, me.logs, me.wait):
            for ref, nothing in ((theirs_name, "absent"), (theirs_prefix, "beef0")):
                hidden = await error_of(action(ref))
                missing = await error_of(action(nothing))
                assert hidden.status is missing.status is Status.NOT_FOUND
                assert hidden.message.replace(ref, "REF") == missing.message.replace(nothing, "REF")
                assert hidden.trailers == missing.trailers
        hidden = await error_of(me.signal(theirs_name, 10))
        assert hidden.status is Status.NOT_FOUND
    # Nothing happened to either job.
    assert (await alice.status(alices)).state == pb.JOB_STATE_RUNNING
    assert (await bob.status(bobs)).state == pb.JOB_STATE_RUNNING
    for me, job_id in ((alice, alices), (bob, bobs)):
        await me.stop(job_id)


async def test_viewers_and_admins_resolve_everyone_and_a_shared_name_is_ambiguous(
    served: Served, ids: list[str]
) -> None:
    alice, bob, vera, adam = (served.client(n) for n in ("alice", "bob", "vera", "adam"))
    ids += ["feed0000-0000-4000-8000-000000000001", "feed1111-0000-4000-8000-000000000002"]
    alices = await alice.start(*SLEEP, name="build")
    bobs = await bob.start(*SLEEP, name="build")
    assert (await vera.status("feed0")).job_id == alices
    error = await error_of(adam.status("feed"))
    assert error.status is Status.INVALID_ARGUMENT and alices in error.message
    assert bobs in error.message and "owner bob" in error.message
    for viewer_or_admin in (vera, adam):
        error = await error_of(viewer_or_admin.status("build"))
        assert error.status is Status.INVALID_ARGUMENT
        assert 'jobs of several users are named "build"' in error.message
        assert f"{alices} (name build, owner alice)" in error.message
        assert f"{bobs} (name build, owner bob)" in error.message
    # The caller's own job of that name is the one it means.
    adams = await adam.start("true", name="build")
    assert (await adam.status("build")).job_id == adams
    assert (await alice.status("build")).job_id == alices
    # A viewer may see the job, so it is told it may not stop it, not that it is missing.
    denied = await error_of(vera.stop("feed1"))
    assert denied.status is Status.PERMISSION_DENIED
    assert (await adam.stop("feed1")).stop_requested_by == "adam"
    await alice.stop("build")


async def test_names_are_unique_among_the_owners_kept_jobs(served: Served) -> None:
    alice, bob = served.client("alice"), served.client("bob")
    first = await alice.start("true", name="nightly")
    await alice.wait(first)
    await served.service.recorded(first)  # ended and kept: it still holds its name
    error = await error_of(alice.start("true", name="nightly"))
    assert error.status is Status.ALREADY_EXISTS
    assert first in error.message and '"nightly"' in error.message
    assert "finished" in error.message
    assert await bob.start("true", name="nightly")  # names are per owner
    await alice.call("DeleteJob", pb.DeleteJobRequest(job_id="nightly"))
    second = await alice.start("true", name="nightly")  # removed: free again
    assert (await alice.wait("nightly")).job_id == second


@pytest.mark.parametrize("name", ["-x", "a b", "x" * 65, ID, "\x1b[2J"])
async def test_a_bad_name_is_invalid_argument_and_starts_nothing(served: Served, name) -> None:
    alice = served.client("alice")
    error = await error_of(alice.start("true", name=name))
    assert error.status is Status.INVALID_ARGUMENT and "name" in error.message
    assert await alice.list() == []


async def test_of_concurrent_starts_with_one_name_exactly_one_wins(served: Served) -> None:
    alice = served.client("alice")
    outcomes: list[Status | str] = []

    async def start() -> None:
        try:
            outcomes.append(await alice.start(*SLEEP, name="once"))
        except GrpcError as exc:
            outcomes.append(exc.status)

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # the running-jobs cap of this server
            nursery.start_soon(start)
    [winner] = [o for o in outcomes if isinstance(o, str)]
    assert sorted(o.name for o in outcomes if isinstance(o, Status)) == ["ALREADY_EXISTS"] * 2
    assert [j.job_id for j in await alice.list()] == [winner]  # the losers left no record
    assert served.service.running_jobs == 1  # nor a slot
    await alice.stop("once")


@pytest.mark.parametrize("held", ["start", "_spawn"], ids=["recorded", "spawning"])
async def test_a_job_found_while_it_is_being_started_is_answered_once_it_runs(
    served: Served, monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    # Its record is written before its process starts, and the Supervisor holds it while it
    # spawns: a name or prefix may find it then, when there is nothing to stop yet.
    alice = served.client("alice")
    proceed, reached = trio.Event(), trio.Event()
    step = getattr(served.supervisor, held)

    async def held_step(*args, **kwargs):
        reached.set()
        await proceed.wait()
        return await step(*args, **kwargs)

    monkeypatch.setattr(served.supervisor, held, held_step)
    got: dict[str, object] = {}

    async def call(key: str, coroutine_function, *args) -> None:
        got[key] = await coroutine_function(*args)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "id", functools.partial(alice.start, *SLEEP, name="early"))
        # Not wait_all_tasks_blocked: a task waiting on the store's worker thread counts as
        # blocked, so it could return before the record is written or the lookups are done.
        await reached.wait()  # recorded, its start held
        nursery.start_soon(call, "status", alice.status, "early")
        nursery.start_soon(call, "stop", alice.stop, "early")
        [starting] = served.service._starting.values()
        while starting.statistics().tasks_waiting < 2:  # both found it, and wait for its start
            await trio.testing.wait_all_tasks_blocked()
        assert got == {}  # neither answers from a record whose job does not run yet
        proceed.set()
    status, stopped = got["status"], got["stop"]
    assert isinstance(status, pb.JobStatus) and isinstance(stopped, pb.JobStatus)
    assert status.job_id == stopped.job_id == got["id"] and status.HasField("pid")
    assert stopped.state == pb.JOB_STATE_STOPPED and stopped.stop_requested_by == "alice"
