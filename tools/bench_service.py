#!/usr/bin/env python3
"""Benchmark what the job store costs the service, side by side in one run.

Absolute times on a shared 2-core machine are noise: each figure compares peers run in the same
process, interleaved, and the report gives ratios and differences.

1. Start latency: the service's StartJob with its store (the record written before the job
   starts, in SQLite in the data directory) against the same StartJob with a store that keeps
   nothing, and the Supervisor's start alone; /bin/true, start → running p50 and p99 over
   --starts interleaved rounds. Goal: the store costs at most +1 ms at p50.
2. Memory per ended job: a fresh process runs --ended jobs (/bin/true) through StartJob and
   waits for each end to be recorded; its RSS before and after (the service keeps ended jobs
   in the store, not in memory).
3. Listing: a store of --records records (written directly, as a server that ran that many
   jobs would have them); ListJobs latency for the first page, a page deep inside (by token),
   a filtered page, and the whole list page by page; RSS before and after.

    .venv/bin/python tools/bench_service.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio
from benchlib import percentile, progress  # tools/benchlib.py

from jobworker.service import Identity, Retention, open_job_service, open_store
from jobworker.service.store import JobStore, Record
from jobworker.supervisor import Supervisor
from jobworker.v1 import jobworker_pb2 as pb

TRUE = pb.StartJobRequest(command="/bin/true")


@dataclass
class Call:
    identity: Identity
    peer_certificate: None = None


ALICE = Call(Identity("alice"))


def vmrss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# --- 1. start latency ---------------------------------------------------------------------


class NoStore(JobStore):
    """A store that keeps nothing and costs nothing: the service without persistence."""

    def __init__(self) -> None:
        pass

    async def insert(self, record: Record) -> None:
        pass

    async def update(self, record: Record) -> None:
        pass

    async def begin_run(self, pid: int, subtrees) -> int:
        return 1

    async def end_run(self, run_id: int) -> None:
        pass

    async def expired(self, **kwargs) -> list[Record]:
        return []

    async def oldest_output(self, limit: int) -> list[Record]:
        return []

    async def ended_output_bytes(self) -> int:
        return 0


async def bench_start(args: argparse.Namespace) -> list[str]:
    times: dict[str, list[float]] = {"store": [], "none": [], "supervisor": []}
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        store = await open_store(Path(tmp) / "jobworker.db")
        async with (
            Supervisor(data_dir=Path(tmp) / "a") as sup,
            Supervisor(data_dir=Path(tmp) / "b") as bare,
            open_job_service(sup, store=store) as service,
            open_job_service(bare, store=NoStore()) as unrecorded,
        ):

            async def via(svc) -> float:
                t0 = time.perf_counter()
                job_id = (await svc.start_job(TRUE, ALICE)).job_id
                took = time.perf_counter() - t0
                await svc.recorded(job_id)
                return took

            async def alone() -> float:
                t0 = time.perf_counter()
                job = await sup.start("/bin/true", owner="alice")
                took = time.perf_counter() - t0
                await job.wait()
                sup.forget(job.id)
                return took

            peers = {"store": lambda: via(service), "none": lambda: via(unrecorded),
                     "supervisor": alone}  # fmt: skip
            rng = random.Random(1)
            for rnd in range(args.warmup + args.starts):
                order = list(peers)
                rng.shuffle(order)
                for name in order:
                    took = await peers[name]()
                    if rnd >= args.warmup:
                        times[name].append(took)
                if (rnd + 1) % 100 == 0:
                    progress(f"start latency: round {rnd + 1}/{args.warmup + args.starts}")
        await store.aclose()
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: percentile(v, 99) for k, v in times.items()}
    rows = [
        ("StartJob, its record in the store (SQLite, WAL)", "store"),
        ("StartJob, a store that keeps nothing", "none"),
        ("Supervisor.start alone", "supervisor"),
    ]
    return [
        f"## 1. Start latency: /bin/true, {args.starts} interleaved rounds ({args.warmup} warm-up"
        " dropped), start → running",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *(f"| {label} | {ms(p50[k])} | {ms(p99[k])} |" for label, k in rows),
        f"| the store's cost (goal: at most +1 ms at p50) | {ms(p50['store'] - p50['none'])} |"
        f" {ms(p99['store'] - p99['none'])} |",
    ]


# Every ended job stays in the store (the default keeps 10,000): what is measured is what
# records cost while they are kept, not what retention removes.
KEEP_EVERYTHING = Retention(keep_jobs=2**62)


# --- 2. memory per ended job (in a child process) ------------------------------------------


async def child_ended(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        store = await open_store(Path(tmp) / "jobworker.db")
        async with (
            Supervisor(data_dir=Path(tmp) / "data", cgroups="off", isolation=False) as sup,
            open_job_service(
                sup, store=store, max_running_jobs=None, retention=KEEP_EVERYTHING
            ) as service,
        ):
            # Warm up (imports, the first pages of the store), then measure.
            for _ in range(200):
                await service.recorded((await service.start_job(TRUE, ALICE)).job_id)
            gc.collect()
            before = vmrss_bytes()
            t0 = time.perf_counter()
            done = 0

            async def worker(count: int) -> None:
                nonlocal done
                for _ in range(count):
                    await service.recorded((await service.start_job(TRUE, ALICE)).job_id)
                    done += 1
                    if done % 5000 == 0:
                        progress(f"ended jobs: {done}/{n}")

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(worker, n // 8 + (1 if i < n % 8 else 0))
            elapsed = time.perf_counter() - t0
            gc.collect()
            after = vmrss_bytes()
            in_memory = len(sup.jobs())
            kept = await store.count()
        await store.aclose()
    return {"before": before, "after": after, "seconds": elapsed, "in_memory": in_memory,
            "kept": kept}  # fmt: skip


def bench_ended(args: argparse.Namespace) -> list[str]:
    progress(f"memory: {args.ended} ended jobs in a fresh process")
    out = subprocess.run(
        [sys.executable, __file__, "--child-ended", str(args.ended)],
        capture_output=True, text=True, check=True, timeout=3600,
    ).stdout  # fmt: skip
    r = json.loads(out.splitlines()[-1])
    growth = (r["after"] - r["before"]) / args.ended
    return [
        f"## 2. Memory with {args.ended} ended jobs (after 200 warm-up jobs)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| RSS before, MiB | {r['before'] / 2**20:.1f} |",
        f"| RSS after {args.ended} ended jobs, MiB | {r['after'] / 2**20:.1f} |",
        f"| RSS growth per ended job, bytes | {growth:.0f} |",
        f"| jobs the Supervisor still holds in memory | {r['in_memory']} |",
        f"| records in the store | {r['kept']} |",
        f"| jobs per second (8 at a time) | {args.ended / r['seconds']:.0f} |",
    ]


# --- 3. listing ---------------------------------------------------------------------------


async def bench_list(args: argparse.Namespace) -> list[str]:
    n = args.records
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        path = Path(tmp) / "jobworker.db"
        store = await open_store(path)
        run_id = await store.begin_run(os.getpid(), [])
        progress(f"listing: writing {n} records")
        now = time.time()

        def record(i: int) -> Record:
            status = pb.JobStatus(
                job_id=str(uuid.UUID(int=i + 1, version=4)),
                owner="alice" if i % 10 else "bob",
                command="true",
                state=pb.JOB_STATE_FINISHED if i % 7 else pb.JOB_STATE_FAILED,
                exit_code=0 if i % 7 else 1,
            )
            status.created_at.FromSeconds(int(now) - n + i)
            return Record(
                job_id=status.job_id, owner=status.owner, state=status.state,
                created_at=now - n + i, status=status.SerializeToString(),
                ended_at=now - n + i + 1, run_id=run_id,
            )  # fmt: skip

        for start in range(0, n, 10_000):
            batch = [record(i) for i in range(start, min(n, start + 10_000))]

            def insert(db, batch=batch) -> None:
                with db:
                    db.executemany(
                        "INSERT INTO jobs (job_id, owner, state, created_at, status, ended_at,"
                        " run_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                r.job_id,
                                r.owner,
                                r.state,
                                r.created_at,
                                r.status,
                                r.ended_at,
                                r.run_id,
                            )
                            for r in batch
                        ],
                    )

            await store._call(insert)
        async with (
            Supervisor(data_dir=Path(tmp) / "data", cgroups="off", isolation=False) as sup,
            open_job_service(sup, store=store, retention=KEEP_EVERYTHING) as service,
        ):

            async def timed(request: pb.ListJobsRequest, call=ALICE) -> tuple[float, object]:
                t0 = time.perf_counter()
                reply = await service.list_jobs(request, call)
                return time.perf_counter() - t0, reply

            first_s, first = await timed(pb.ListJobsRequest(page_size=100))
            # A page deep inside: follow tokens to the middle, then time one more page.
            token, seen = first.next_page_token, 100
            while seen < n * 9 // 20:
                _, page = await timed(pb.ListJobsRequest(page_size=1000, page_token=token))
                token, seen = page.next_page_token, seen + len(page.jobs)
            deep_s, _ = await timed(pb.ListJobsRequest(page_size=100, page_token=token))
            failed_s, failed = await timed(
                pb.ListJobsRequest(page_size=100, states=[pb.JOB_STATE_FAILED])
            )
            newest_s, _ = await timed(pb.ListJobsRequest(page_size=100, order_by="created_at desc"))
            gc.collect()
            before = vmrss_bytes()
            t0 = time.perf_counter()
            token, total, peak = "", 0, before
            while True:
                _, page = await timed(pb.ListJobsRequest(page_size=1000, page_token=token))
                total += len(page.jobs)
                peak = max(peak, vmrss_bytes())
                token = page.next_page_token
                if not token:
                    break
            all_s = time.perf_counter() - t0
        await store.aclose()
    assert total == sum(1 for i in range(n) if i % 10), total  # alice's, every one
    return [
        f"## 3. Listing from a store of {n} records (alice owns 90%)",
        "",
        "| request | latency ms |",
        "|---|---:|",
        f"| first page of 100 | {ms(first_s)} |",
        f"| a page of 100 at the middle (by token) | {ms(deep_s)} |",
        f"| first 100 failed jobs (a filter) | {ms(failed_s)} ({len(failed.jobs)} returned) |",
        f"| newest 100 (created_at desc) | {ms(newest_s)} |",
        f"| every page of 1000, {total} jobs | {all_s * 1e3:.0f} |",
        "",
        f"RSS while paging through all of them: {before / 2**20:.1f} MiB before,"
        f" {peak / 2**20:.1f} MiB at most (+{(peak - before) / 2**20:.1f}).",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 starts, 2000 ended, 10000 records")
    p.add_argument("--starts", type=int, default=500)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--ended", type=int, default=25_000)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--child-ended", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_ended:
        print(json.dumps(trio.run(child_ended, args.child_ended)))
        return 0
    if args.quick:
        args.starts, args.ended, args.records = 100, 2000, 10_000
    sections = [trio.run(bench_start, args), bench_ended(args), trio.run(bench_list, args)]
    print("# jobworker service bench: the cost of the job store")
    for lines in sections:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
