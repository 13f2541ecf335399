"""The job store on its own: a real SQLite file, its schema version, paging against a model."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.service.store import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    Query,
    Record,
    StoreUnavailable,
    open_store,
)

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
    assert await store.ended_output_bytes() == 77  # answered through version 2's index
    await store.aclose()
    assert {"jobs_ended_seq", "jobs_output"} <= indexes(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()


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
