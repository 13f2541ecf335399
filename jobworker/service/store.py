"""Job records in SQLite: what a server was told and showed survives its restarts and crashes.

Theory of operation
-------------------
One file, ``<data dir>/jobworker.db``, in WAL mode: a crashed server leaves at worst its last
transactions unwritten, never a broken file, and readers never wait for the writer. The
supervisor library knows nothing of it: the service writes a record *before* it acts (a job's
creation, before the process starts) and *after* it observes (its start, a stop request, its
end), and serves ended jobs from here, so the supervisor can forget them.

A record is the job's last known ``JobStatus`` message (serialized), plus the columns queries
need: owner, state, creation order, times, the output it keeps on disk, and the server run that
started it. A run records the cgroup subtrees its Supervisor made, so that a restart after a
crash can find, kill and remove what a lost job left (recovery.py), and nothing else.

Every call runs in a worker thread, one at a time (a CapacityLimiter of 1 around one
connection): SQLite blocks, the event loop must not. A write that fails raises
``StoreUnavailable``; the service answers UNAVAILABLE rather than act without a record.

The schema has a version (``PRAGMA user_version``) and migrations from each version to the
next; a file newer than this code is refused, never downgraded.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

SCHEMA_VERSION = 3

# Statements that take a file from version N-1 to version N, in order.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE runs (
            run_id INTEGER PRIMARY KEY,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            subtrees TEXT NOT NULL DEFAULT '[]'  -- JSON: the cgroup subtrees it made
        )""",
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, for paging
            job_id TEXT NOT NULL UNIQUE,
            run_id INTEGER NOT NULL REFERENCES runs(run_id),
            owner TEXT NOT NULL,
            state INTEGER NOT NULL,  -- jobworker.v1.JobState
            created_at REAL NOT NULL,
            ended_at REAL,
            output_bytes INTEGER NOT NULL DEFAULT 0,  -- what its log keeps on disk
            output_end INTEGER NOT NULL DEFAULT 0,  -- the offset just past its output
            output_removed INTEGER NOT NULL DEFAULT 0,  -- its log was removed (budget)
            status BLOB NOT NULL  -- jobworker.v1.JobStatus, serialized
        )""",
        "CREATE INDEX jobs_owner ON jobs (owner, seq)",
        "CREATE INDEX jobs_state ON jobs (state, seq)",
        "CREATE INDEX jobs_ended ON jobs (ended_at) WHERE ended_at IS NOT NULL",
    ),
    # Retention runs after job ends: its questions ("the 10,000th newest ended job", "all
    # ended output together") must not scan every record and its status blob each time.
    2: (
        "CREATE INDEX jobs_ended_seq ON jobs (seq) WHERE ended_at IS NOT NULL",
        "CREATE INDEX jobs_output ON jobs (seq, output_bytes)"
        " WHERE ended_at IS NOT NULL AND output_removed = 0",
    ),
    # Job references (references.py): names, unique per owner among the jobs kept, and id
    # prefixes, each found by one index lookup or range, however many jobs are kept. The
    # unique index is what makes two concurrent starts with one name yield one job.
    3: (
        "ALTER TABLE jobs ADD COLUMN name TEXT",  # NULL: none
        "CREATE UNIQUE INDEX jobs_name ON jobs (name, owner) WHERE name IS NOT NULL",
        "CREATE INDEX jobs_owner_id ON jobs (owner, job_id)",
    ),
}

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store cannot be read or written (disk full, a broken file): the message says why."""


class NameInUse(Exception):
    """A record of the same owner already has this name: `holder`."""

    def __init__(self, holder: Record) -> None:
        super().__init__(f"{holder.owner} already has a job named {holder.name}: {holder.job_id}")
        self.holder = holder


@dataclass(frozen=True, slots=True)
class Record:
    """One job as the store keeps it."""

    job_id: str
    owner: str
    state: int
    created_at: float  # seconds since the epoch
    status: bytes  # a serialized jobworker.v1.JobStatus
    ended_at: float | None = None
    output_bytes: int = 0
    output_end: int = 0
    output_removed: bool = False
    run_id: int = 0
    seq: int = 0
    name: str = ""  # empty: none

    @property
    def id(self) -> str:
        """As `Job.id`: handlers deal in either."""
        return self.job_id


@dataclass(frozen=True, slots=True)
class Run:
    run_id: int
    pid: int
    started_at: float
    ended_at: float | None
    subtrees: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """Which records a page holds: see `JobStore.page`."""

    owner: str | None = None
    states: tuple[int, ...] = ()
    created_after: float | None = None
    newest_first: bool = False


_COLUMNS = (
    "job_id, owner, state, created_at, status, ended_at, output_bytes, output_end,"
    " output_removed, run_id, seq, name"
)


def _record(row: tuple) -> Record:
    return Record(
        job_id=row[0],
        owner=row[1],
        state=row[2],
        created_at=row[3],
        status=row[4],
        ended_at=row[5],
        output_bytes=row[6],
        output_end=row[7],
        output_removed=bool(row[8]),
        run_id=row[9],
        seq=row[10],
        name=row[11] or "",
    )


class JobStore:
    """Job records of one data directory. Use `open_store`; every method is async."""

    def __init__(self, db: sqlite3.Connection, path: str) -> None:
        self._db = db
        self.path = path
        self._limiter = trio.CapacityLimiter(1)

    # --- the worker thread -------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"job store {self.path}: {exc}") from exc

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def transaction(db: sqlite3.Connection) -> T:
            with db:  # commit, or roll back on any error
                return fn(db)

        return await self._call(transaction)

    async def aclose(self) -> None:
        await self._call(lambda db: db.close())

    # --- runs --------------------------------------------------------------------------------

    async def begin_run(self, pid: int, subtrees: Sequence[str]) -> int:
        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO runs (pid, started_at, subtrees) VALUES (?, ?, ?)",
                (pid, time.time(), json.dumps(list(subtrees))),
            )
            return int(cursor.lastrowid or 0)

        return await self._write(insert)

    async def end_run(self, run_id: int) -> None:
        await self._write(
            lambda db: db.execute(
                "UPDATE runs SET ended_at = ? WHERE run_id = ?", (time.time(), run_id)
            )
        )

    async def runs(self) -> dict[int, Run]:
        def read(db: sqlite3.Connection) -> dict[int, Run]:
            rows = db.execute("SELECT run_id, pid, started_at, ended_at, subtrees FROM runs")
            return {r[0]: Run(r[0], r[1], r[2], r[3], tuple(json.loads(r[4]))) for r in rows}

        return await self._call(read)

    async def end_runs(self, run_ids: Sequence[int]) -> None:
        """Mark runs over (a crashed one never said so), and drop those no record refers to."""

        def update(db: sqlite3.Connection) -> None:
            now = time.time()
            for run_id in run_ids:
                db.execute(
                    "UPDATE runs SET ended_at = ? WHERE run_id = ? AND ended_at IS NULL",
                    (now, run_id),
                )
                db.execute(
                    "DELETE FROM runs WHERE run_id = ? AND NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE jobs.run_id = runs.run_id)",
                    (run_id,),
                )

        await self._write(update)

    # --- jobs --------------------------------------------------------------------------------

    async def insert(self, record: Record) -> None:
        """A new record. NameInUse when its owner has a record of the same name: checked by
        the insert itself (the unique index), so of two racing inserts one gets it."""

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO jobs (job_id, owner, state, created_at, status, ended_at,"
                    " output_bytes, output_end, output_removed, run_id, name)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.job_id,
                        record.owner,
                        record.state,
                        record.created_at,
                        record.status,
                        record.ended_at,
                        record.output_bytes,
                        record.output_end,
                        int(record.output_removed),
                        record.run_id,
                        record.name or None,
                    ),
                )
            except sqlite3.IntegrityError:
                holder = _named(db, record.name, record.owner) if record.name else None
                if holder is None:
                    raise  # another constraint (a job id in use): StoreUnavailable
                raise NameInUse(holder) from None

        await self._write(insert)

    async def update(self, record: Record) -> None:
        """The job's new status (its state, end, output size); its identity never changes."""
        await self._write(
            lambda db: db.execute(
                "UPDATE jobs SET state = ?, status = ?, ended_at = ?, output_bytes = ?,"
                " output_end = ?, output_removed = ? WHERE job_id = ?",
                (
                    record.state,
                    record.status,
                    record.ended_at,
                    record.output_bytes,
                    record.output_end,
                    int(record.output_removed),
                    record.job_id,
                ),
            )
        )

    async def get(self, job_id: str) -> Record | None:
        def read(db: sqlite3.Connection) -> Record | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return _record(row) if row else None

        return await self._call(read)

    async def candidates(
        self, *, name: str | None, prefix: str | None, owner: str | None, me: str, limit: int
    ) -> tuple[list[Record], list[Record]]:
        """The records a job reference may mean (see references.py), at most `limit` of each
        kind, only `owner`'s (None: everyone's): those named `name` (everyone's: `me`'s alone
        if it has one, else by owner); those whose id starts with `prefix`, in id order. Each
        is one index lookup or range."""

        def read(db: sqlite3.Connection) -> tuple[list[Record], list[Record]]:
            named: list[Record] = []
            if name is not None:
                # Unique per owner: an owner's is one lookup, and `me`'s alone when it has one.
                found = _named(db, name, me if owner is None else owner)
                named = [found] if found is not None else []
                if owner is None and found is None:
                    rows = db.execute(
                        f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_name WHERE name = ?"
                        " ORDER BY owner LIMIT ?",
                        (name, limit),
                    )
                    named = [_record(r) for r in rows]
            prefixed: list[Record] = []
            if prefix is not None:
                # Ids are lower-case hex and dashes, all below "~": the range [prefix,
                # prefix + "~") is exactly the ids that start with it. Everyone's ids are
                # ranged over the job_id column's own (unique) index.
                if owner is None:
                    where, args = "WHERE", (prefix, prefix + "~", limit)
                else:
                    where, args = (
                        "INDEXED BY jobs_owner_id WHERE owner = ? AND",
                        (
                            owner,
                            prefix,
                            prefix + "~",
                            limit,
                        ),
                    )
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs {where} job_id >= ? AND job_id < ?"
                    " ORDER BY job_id LIMIT ?",
                    args,
                )
                prefixed = [_record(r) for r in rows]
            return named, prefixed

        return await self._call(read)

    async def page(
        self, query: Query, *, after_seq: int | None, limit: int
    ) -> tuple[list[Record], int | None]:
        """Up to `limit` records matching `query`, in creation order (or newest first), after
        the record `after_seq` (None: from the first); and the seq to continue after, or None
        when there is nothing more."""

        def read(db: sqlite3.Connection) -> tuple[list[Record], int | None]:
            where, args = [], []
            if query.owner is not None:
                where.append("owner = ?")
                args.append(query.owner)
            if query.states:
                where.append(f"state IN ({', '.join('?' * len(query.states))})")
                args.extend(query.states)
            if query.created_after is not None:
                where.append("created_at > ?")
                args.append(query.created_after)
            if after_seq is not None:
                where.append("seq < ?" if query.newest_first else "seq > ?")
                args.append(after_seq)
            sql = f"SELECT {_COLUMNS} FROM jobs"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += f" ORDER BY seq {'DESC' if query.newest_first else 'ASC'} LIMIT ?"
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
            records = [_record(r) for r in rows[:limit]]
            more = len(rows) > limit
            return records, (records[-1].seq if more and records else None)

        return await self._call(read)

    async def unfinished(self) -> list[Record]:
        """Records still running: at a server's start, the jobs a crashed run lost."""

        def read(db: sqlite3.Connection) -> list[Record]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE ended_at IS NULL ORDER BY seq")
            return [_record(r) for r in rows]

        return await self._call(read)

    async def delete(self, job_ids: Sequence[str]) -> None:
        await self._write(
            lambda db: db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])
        )

    async def expired(
        self, *, ended_before: float, keep: int | None, owner: str | None = None
    ) -> list[Record]:
        """Ended records (of `owner`, if given) that ended before `ended_before`, or that are
        beyond the newest `keep` ended ones (None: no count), oldest first: what retention and
        a prune remove."""

        def read(db: sqlite3.Connection) -> list[Record]:
            owned = "AND owner = ?" if owner is not None else ""
            args: tuple = (owner,) if owner is not None else ()
            ended = f"FROM jobs WHERE ended_at IS NOT NULL {owned}"
            # The newest `keep` ended jobs are those after the (keep+1)-th newest: found by
            # walking `keep` index entries, not by listing them all.
            cutoff = None
            if keep is not None:
                row = db.execute(
                    f"SELECT seq {ended} ORDER BY seq DESC LIMIT 1 OFFSET ?", (*args, keep)
                ).fetchone()
                cutoff = row[0] if row else None
            sql = f"SELECT {_COLUMNS} {ended} AND ended_at < ?"
            params: tuple = (*args, ended_before)
            if cutoff is not None:
                sql += f" UNION SELECT {_COLUMNS} {ended} AND seq <= ?"
                params += (*args, cutoff)
            rows = db.execute(sql + " ORDER BY seq", params)
            return [_record(r) for r in rows]

        return await self._call(read)

    async def oldest_output(self, limit: int) -> list[Record]:
        """Ended records whose output is still on disk, oldest first: what a budget drops."""

        def read(db: sqlite3.Connection) -> list[Record]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_output"
                " WHERE ended_at IS NOT NULL AND output_removed = 0 AND output_bytes > 0"
                " ORDER BY seq LIMIT ?",
                (limit,),
            )
            return [_record(r) for r in rows]

        return await self._call(read)

    async def ended_output_bytes(self) -> int:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute(
                # Named: without statistics the planner takes jobs_ended and reads every row;
                # this index alone answers (its entries carry output_bytes).
                "SELECT COALESCE(SUM(output_bytes), 0) FROM jobs INDEXED BY jobs_output"
                " WHERE ended_at IS NOT NULL AND output_removed = 0"
            ).fetchone()
            return int(row[0])

        return await self._call(read)

    async def count(self) -> int:
        return await self._call(
            lambda db: int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        )


def _named(db: sqlite3.Connection, name: str, owner: str) -> Record | None:
    row = db.execute(
        f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_name WHERE name = ? AND owner = ?",
        (name, owner),
    ).fetchone()
    return _record(row) if row else None


async def open_store(path: str | Path) -> JobStore:
    """The store at `path` (created, or migrated to this code's schema); ":memory:" for one
    that lives only as long as this process. StoreUnavailable if it cannot be used."""
    path = str(path)

    def connect() -> sqlite3.Connection:
        try:
            if path != ":memory:":
                # Records hold commands and their arguments: the owner's alone, whatever the
                # umask (SQLite gives its -wal and -shm files the database file's mode).
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # Reads autocommit; Python begins a transaction before a write, and `with db`
            # (JobStore._write) commits it or rolls it back.
            db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open job store {path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL loses no committed transaction to a crash of this process, only
            # (at worst, the last ones) to a crash of the machine: and costs no fsync per write.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            _migrate(db, path)
        except sqlite3.Error as exc:
            db.close()
            raise StoreUnavailable(f"cannot use job store {path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        return db

    db = await trio.to_thread.run_sync(connect)
    return JobStore(db, path)


def _migrate(db: sqlite3.Connection, path: str) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"job store {path} has schema version {version}, newer than this jobworker's "
            f"{SCHEMA_VERSION}: use the jobworker that wrote it, or a newer one"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        # One transaction per step, DDL included (SQLite's DDL is transactional): a crash
        # mid-migration leaves the file at the version before, never half-way.
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[target]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
