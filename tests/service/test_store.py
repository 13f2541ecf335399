"""The job store on its own: a real SQLite file, its schema version, paging against a model."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.service.store import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    NameInUse,
    Query,
    Record,
    StoreUnavailable,
    open_store,
)
from jobworker.v1 import jobworker_pb2 as pb

STATES = (1, 2, 3, 4, 5)  # jobworker.v1.JobState values


def record(n: int, *, owner: str = "alice", state: int = 1, ended: float | None = None) -> Record:
    return Record(
        job_id=f"00000000-0000-4000-8000-{n:012d}",
        owner=owner,
        state=state,
        created_at=1000.0 + n,
        status=f"status {n}".encode(),
        ended_at=ended,
        run_id=1,
    )


async def test_records_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.db"
    umask = os.umask(0o022)
    try:
        store = await open_store(path)
    finally:
        os.umask(umask)
    run = await store.begin_run(123, ["/sys/fs/cgroup/pids/jobworker-x"])
    await store.insert(record(1))
    # The owner's alone (records hold command lines), though the umask would allow more.
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {
        name: 0o600 for name in ("jobworker.db", "jobworker.db-wal", "jobworker.db-shm")
    }
    await store.update(record(1, state=2, ended=1005.0))
    await store.aclose()
    store = await open_store(path)
    got = await store.get(record(1).job_id)
    assert got is not None
    assert (got.state, got.ended_at, got.status, got.run_id) == (2, 1005.0, b"status 1", 1)
    assert (await store.runs())[run].subtrees == ("/sys/fs/cgroup/pids/jobworker-x",)
    assert await store.get("no-such-id") is None
    await store.aclose()
    # WAL, and the schema version this code writes.
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


async def test_a_newer_schema_is_refused_not_downgraded(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreUnavailable, match="newer than this jobworker's"):
        await open_store(path)


async def test_a_broken_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=str(path)):
        await open_store(path)


def write_version_1(path: Path) -> None:
    """A file as the jobworker that wrote schema version 1 left it, with one ended job."""
    db = sqlite3.connect(path)
    for statement in _MIGRATIONS[1]:
        db.execute(statement)
    db.execute("INSERT INTO runs (pid, started_at) VALUES (1, 1000.0)")
    db.execute(
        "INSERT INTO jobs (job_id, run_id, owner, state, created_at, ended_at, output_bytes,"
        " status) VALUES ('00000000-0000-4000-8000-000000000001', 1, 'alice', 2, 1001.0,"
        " 1002.0, 77, x'0a01')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def indexes(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        db.close()


async def test_an_older_schema_is_migrated_keeping_every_record(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.db"
    write_version_1(path)
    store = await open_store(path)
    got = await store.get("00000000-0000-4000-8000-000000000001")
    assert got is not None and (got.owner, got.ended_at, got.status) == ("alice", 1002.0, b"\n\x01")
    assert got.name == ""  # version 3's column, empty for records made before it
    assert await store.ended_output_bytes() == 77  # answered through version 2's index
    await store.aclose()
    assert {"jobs_ended_seq", "jobs_output", "jobs_name", "jobs_owner_id"} <= indexes(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    db.close()


# Made by the jobworker of schema version 2 (commit ad348ec), as a server leaves it: a server
# ran three jobs through its JobService — alice's `sh -c "echo hello"` (finished, 6 bytes of
# output), bob's `sleep 600` (stopped by the server's shutdown), alice's `/nonexistent` (error).
VERSION_2_FILE = Path(__file__).parent / "data" / "jobworker-schema-2.db"
VERSION_2_JOBS = {
    "6539f0d6-80ff-4f03-84b5-0fb799283e4f": ("alice", pb.JOB_STATE_FINISHED, "sh"),
    "90ee8a7f-81bf-4b53-bba2-3067208efe25": ("bob", pb.JOB_STATE_STOPPED, "sleep"),
    "2ec987fb-c1df-4114-aac9-c44495be1419": ("alice", pb.JOB_STATE_ERROR, "/nonexistent"),
}


async def test_a_file_a_version_2_server_wrote_is_migrated_and_names_work(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.db"
    shutil.copyfile(VERSION_2_FILE, path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    store = await open_store(path)
    for job_id, (owner, state, command) in VERSION_2_JOBS.items():
        got = await store.get(job_id)
        assert got is not None and (got.owner, got.state, got.name) == (owner, state, "")
        status = pb.JobStatus.FromString(got.status)
        assert (status.job_id, status.command, status.name) == (job_id, command, "")
    finished = await store.get("6539f0d6-80ff-4f03-84b5-0fb799283e4f")
    assert finished is not None and finished.output_bytes == 6
    # Version 3 at work on the old records: prefixes, and names for new ones.
    named, prefixed = await store.candidates(
        name=None, prefix="6539", owner="alice", me="alice", limit=6
    )
    assert (named, [r.job_id for r in prefixed]) == ([], [*VERSION_2_JOBS][:1])
    new = dataclasses.replace(record(1), name="build", run_id=finished.run_id)
    await store.insert(new)
    await store.aclose()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = await open_store(path)  # at the current version: nothing more to do
    got = await store.get(new.job_id)
    assert got is not None and got.name == "build"
    assert await store.count() == 4
    await store.aclose()


async def test_a_migration_that_fails_leaves_the_file_at_the_version_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobworker.db"
    write_version_1(path)
    db = sqlite3.connect(path)  # something in the way of version 2's second statement
    db.execute("CREATE TABLE jobs_output (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailable, match="jobs_output"):
        await open_store(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    assert "jobs_ended_seq" not in indexes(path)  # the first statement was rolled back too


async def store_with_a_run():
    store = await open_store(":memory:")
    assert await store.begin_run(1, []) == 1  # the run record(...) names
    return store


async def test_a_write_that_fails_raises_store_unavailable(tmp_path: Path) -> None:
    store = await store_with_a_run()
    await store.insert(record(1))
    with pytest.raises(StoreUnavailable, match="UNIQUE"):
        await store.insert(record(1))
    await store.aclose()


async def test_retention_finds_what_is_too_old_or_too_many(tmp_path: Path) -> None:
    store = await store_with_a_run()
    for n in range(1, 9):
        ended = None if n == 8 else 2000.0 + n  # job 8 still runs
        await store.insert(record(n, owner="bob" if n % 2 else "alice", ended=ended))
    # Ended before 2003: jobs 1 and 2. Beyond the newest 4 ended (7, 6, 5, 4): 1, 2, 3.
    expired = await store.expired(ended_before=2003.0, keep=4)
    assert [r.created_at for r in expired] == [1001.0, 1002.0, 1003.0]
    # A prune of bob's: no count, only the time.
    pruned = await store.expired(ended_before=2006.0, keep=None, owner="bob")
    assert [r.created_at for r in pruned] == [1001.0, 1003.0, 1005.0]
    assert [r.created_at for r in await store.unfinished()] == [1008.0]
    await store.aclose()


queries = st.builds(
    Query,
    owner=st.sampled_from([None, "alice", "bob"]),
    states=st.lists(st.sampled_from(STATES), unique=True, max_size=3).map(tuple),
    created_after=st.sampled_from([None, 1000.0, 1010.5]),
    newest_first=st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    jobs=st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), st.sampled_from(STATES)), max_size=40
    ),
    query=queries,
    page_size=st.integers(1, 7),
)
def test_paging_yields_exactly_the_matching_records_once_in_order(jobs, query, page_size) -> None:
    async def main() -> None:
        store = await store_with_a_run()
        for n, (owner, state) in enumerate(jobs):
            await store.insert(record(n, owner=owner, state=state))
        expected = [
            record(n).job_id
            for n, (owner, state) in enumerate(jobs)
            if (query.owner is None or owner == query.owner)
            and (not query.states or state in query.states)
            and (query.created_after is None or 1000.0 + n > query.created_after)
        ]
        if query.newest_first:
            expected.reverse()
        got, after = [], None
        while True:
            page, after = await store.page(query, after_seq=after, limit=page_size)
            assert len(page) <= page_size
            got += [r.job_id for r in page]
            if after is None:
                break
        assert got == expected
        await store.aclose()

    trio.run(main)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Per job: its owner, and when it ended (None: still running); ends in any order.
    jobs=st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), st.none() | st.integers(0, 20)), max_size=30
    ),
    ended_before=st.integers(0, 21),
    keep=st.none() | st.integers(0, 12),
    owner=st.sampled_from([None, "alice", "bob"]),
)
def test_expired_is_exactly_what_is_too_old_or_beyond_the_newest_kept(
    jobs, ended_before, keep, owner
) -> None:
    async def main() -> None:
        store = await store_with_a_run()
        for n, (who, ended) in enumerate(jobs):
            await store.insert(
                record(n, owner=who, ended=None if ended is None else 2000.0 + ended)
            )
        ended_ones = [
            n for n, (who, ended) in enumerate(jobs)
            if ended is not None and (owner is None or who == owner)
        ]  # fmt: skip
        kept = set() if keep is None or keep == 0 else set(ended_ones[-keep:])
        expected = [
            record(n).job_id
            for n in ended_ones
            if 2000.0 + jobs[n][1] < 2000.0 + ended_before or (keep is not None and n not in kept)
        ]
        got = await store.expired(ended_before=2000.0 + ended_before, keep=keep, owner=owner)
        assert [r.job_id for r in got] == expected
        await store.aclose()

    trio.run(main)


# --- names and id prefixes (job references) -------------------------------------------------------


async def test_a_name_is_unique_per_owner_until_its_record_goes() -> None:
    store = await store_with_a_run()
    first = dataclasses.replace(record(1), name="build")
    await store.insert(first)
    with pytest.raises(NameInUse) as caught:
        await store.insert(dataclasses.replace(record(2), name="build"))
    assert caught.value.holder.job_id == first.job_id
    assert await store.get(record(2).job_id) is None  # nothing of the loser was written
    await store.insert(dataclasses.replace(record(3, owner="bob"), name="build"))  # bob's own
    await store.insert(record(4))  # no name: any number of those
    await store.insert(record(5))
    await store.delete([first.job_id])
    await store.insert(dataclasses.replace(record(2), name="build"))  # free again
    await store.aclose()


async def test_of_concurrent_inserts_with_one_name_exactly_one_succeeds() -> None:
    store = await store_with_a_run()
    outcomes: list[str] = []

    async def insert(n: int) -> None:
        try:
            await store.insert(dataclasses.replace(record(n), name="race"))
            outcomes.append("inserted")
        except NameInUse:
            outcomes.append("taken")

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(insert, n)
    assert sorted(outcomes) == ["inserted"] + ["taken"] * 19
    await store.aclose()


async def test_candidates_prefer_the_callers_own_name_and_range_over_ids() -> None:
    store = await store_with_a_run()
    ids = [
        f"{head}-0000-4000-8000-00000000000{n}"
        for n, head in enumerate(["aa000000", "aa110000", "ab000000", "aa220000"], 1)
    ]
    owners = ["alice", "bob", "alice", "alice"]
    names = ["build", "build", "", "test"]
    for n, (job_id, owner, name) in enumerate(zip(ids, owners, names, strict=True)):
        await store.insert(dataclasses.replace(record(n), job_id=job_id, owner=owner, name=name))

    async def find(name, prefix, owner, me="alice", limit=6):
        named, prefixed = await store.candidates(
            name=name, prefix=prefix, owner=owner, me=me, limit=limit
        )
        return [r.job_id for r in named], [r.job_id for r in prefixed]

    assert await find("build", None, None) == ([ids[0]], [])  # alice's own, alone
    assert await find("build", None, None, me="adam") == ([ids[0], ids[1]], [])  # by owner
    assert await find("build", None, "bob", me="bob") == ([ids[1]], [])
    assert await find("test", None, "bob", me="bob") == ([], [])  # alice's: out of scope
    assert await find(None, "aa", None) == ([], [ids[0], ids[1], ids[3]])  # in id order
    assert await find(None, "aa", "alice") == ([], [ids[0], ids[3]])
    assert await find(None, "aa", None, limit=2) == ([], [ids[0], ids[1]])
    assert await find(None, "aa1", "alice") == ([], [])
    assert await find(None, ids[2], None) == ([], [ids[2]])  # a whole id is its own prefix
    await store.aclose()


async def test_reference_lookups_are_index_searches_never_scans() -> None:
    # At 100k jobs a scan per call would cost what an index search does not: the plan says
    # which one SQLite does, whatever the data (no statistics are gathered).
    store = await store_with_a_run()
    for n in range(50):
        await store.insert(dataclasses.replace(record(n), name=f"job{n}"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    for owner in (None, "alice"):
        await store.candidates(
            name="job7", prefix="00000000-0000-4", owner=owner, me="bob", limit=6
        )
    store._db.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) >= 4

    def plan(sql: str) -> list[str]:
        return [row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql)]

    for sql in selects:
        details = await trio.to_thread.run_sync(plan, sql)
        assert details and all(d.startswith("SEARCH jobs USING") for d in details), (sql, details)
    await store.aclose()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Ids from a small alphabet so that prefixes are shared; owners and names likewise.
    jobs=st.lists(
        st.tuples(
            st.text("ab", min_size=4, max_size=4),
            st.sampled_from(["alice", "bob"]),
            st.sampled_from(["", "x", "y"]),
        ),
        max_size=12,
        unique_by=lambda j: j[0],
    ),
    prefix=st.text("ab", max_size=4),
    name=st.sampled_from(["x", "y"]),
    owner=st.sampled_from([None, "alice", "bob"]),
    me=st.sampled_from(["alice", "bob", "adam"]),
    limit=st.integers(1, 4),
)
def test_candidates_are_exactly_the_matching_records(jobs, prefix, name, owner, me, limit) -> None:
    async def main() -> None:
        store = await store_with_a_run()
        inserted = []
        for n, (head, who, label) in enumerate(jobs):
            rec = dataclasses.replace(
                record(n), job_id=head + f"0000-0000-4000-8000-{n:012d}", owner=who, name=label
            )
            try:
                await store.insert(rec)
                inserted.append(rec)
            except NameInUse:
                pass  # the model keeps only what the store took
        named, prefixed = await store.candidates(
            name=name, prefix=prefix or None, owner=owner, me=me, limit=limit
        )
        scope = [r for r in inserted if owner is None or r.owner == owner]
        mine = [r.job_id for r in scope if r.name == name and r.owner == (owner or me)]
        others = sorted((r.owner, r.job_id) for r in scope if r.name == name)
        expected_named = mine or ([j for _, j in others][:limit] if owner is None else [])
        assert [r.job_id for r in named] == expected_named
        expected = sorted(r.job_id for r in scope if r.job_id.startswith(prefix))[:limit]
        assert [r.job_id for r in prefixed] == (expected if prefix else [])
        await store.aclose()

    trio.run(main)
