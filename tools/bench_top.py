#!/usr/bin/env python3
"""What `jobctl top` and job references cost the server, measured on this machine.

1. ListJobs(states=[RUNNING]) with --jobs running jobs (real cgroups, isolated as the server runs
   them as root), the call `top` makes every 2 s: wall time and CPU time per call (p50, p99 over
   --calls calls), and the part of it spent reading each job's live usage from its cgroup (the
   snapshot `Job.status()` takes: CPU, memory now and at peak, IO).
2. Resolving a job reference with --records jobs in the store: a full id, a name, a unique id
   prefix, and an ambiguous one (each one index lookup; a scan would grow with the store).

The handlers are called directly, with the identity a connection would carry: the figures are
the server's own work, without TLS and HTTP/2 (a few tens of microseconds more per call).

    .venv/bin/python tools/bench_top.py [--jobs 50] [--calls 500] [--records 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio
from benchlib import loadavg, percentile, progress  # tools/benchlib.py

from jobworker.service import Identity, open_job_service, open_store
from jobworker.supervisor import Supervisor
from jobworker.v1 import jobworker_pb2 as pb


@dataclass
class Call:
    identity: Identity
    peer_certificate: None = None


ALICE = Call(Identity("alice"))


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


async def bench_top(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        store = await open_store(Path(tmp) / "jobworker.db")
        async with (
            Supervisor(data_dir=Path(tmp) / "data", grace_period_s=1) as sup,
            open_job_service(sup, store=store, max_running_jobs_per_user=None) as service,
        ):
            progress(f"top: starting {args.jobs} jobs")
            request = pb.StartJobRequest(command="sleep", args=["600"])
            for _ in range(args.jobs):
                await service.start_job(request, ALICE)
            listing = pb.ListJobsRequest(states=[pb.JOB_STATE_RUNNING], page_size=1000)
            reply = await service.list_jobs(listing, ALICE)
            assert len(reply.jobs) == args.jobs, len(reply.jobs)
            assert all(j.usage.HasField("memory_bytes") for j in reply.jobs)
            cgroups = sup.cgroups
            progress(f"top: {args.calls} ListJobs calls")
            wall, cpu, reads = [], [], []
            for _ in range(args.calls):
                w0, c0 = time.perf_counter(), time.process_time()
                await service.list_jobs(listing, ALICE)
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
                r0 = time.perf_counter()
                for job in sup.jobs():
                    job.status()
                reads.append(time.perf_counter() - r0)
            await service.stop_all_jobs(0)
        await store.aclose()
    every = 2.0
    return [
        f"## 1. ListJobs(states=[RUNNING]) with {args.jobs} running jobs (cgroups {cgroups})",
        "",
        "| per call | p50 ms | p99 ms |",
        "|---|---:|---:|",
        f"| wall | {ms(percentile(wall, 50))} | {ms(percentile(wall, 99))} |",
        f"| CPU (this process) | {ms(percentile(cpu, 50))} | {ms(percentile(cpu, 99))} |",
        f"| of which: live usage of every job | {ms(percentile(reads, 50))}"
        f" | {ms(percentile(reads, 99))} |",
        "",
        f"A `top` refreshing every {every:g} s costs the server"
        f" {percentile(cpu, 50) / every * 100:.2f}% of one core"
        f" ({us(percentile(reads, 50) / args.jobs)} µs of cgroup reads per job per refresh).",
    ]


async def bench_references(args: argparse.Namespace) -> list[str]:
    n = args.records
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        store = await open_store(Path(tmp) / "jobworker.db")
        run_id = await store.begin_run(os.getpid(), [])
        progress(f"references: writing {n} records")
        owners = ["alice", "bob", "carol", "dave"]
        ids = [str(uuid.uuid4()) for _ in range(n)]
        status = pb.JobStatus(command="true", state=pb.JOB_STATE_FINISHED).SerializeToString()
        rows = [
            (job_id, owners[i % 4], pb.JOB_STATE_FINISHED, float(i), status, float(i) + 1, run_id,
             f"job{i}")
            for i, job_id in enumerate(ids)
        ]  # fmt: skip

        def insert(db) -> None:
            with db:
                db.executemany(
                    "INSERT INTO jobs (job_id, owner, state, created_at, status, ended_at,"
                    " run_id, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

        await store._call(insert)
        async with (
            Supervisor(data_dir=Path(tmp) / "data", cgroups="off", isolation=False) as sup,
            open_job_service(sup, store=store) as service,
        ):
            alices = [job_id for i, job_id in enumerate(ids) if i % 4 == 0]
            target = alices[len(alices) // 2]
            unique = next(
                k for k in range(1, 37) if sum(1 for j in alices if j.startswith(target[:k])) == 1
            )
            cases = [
                ("full id", target, ALICE),
                ("name", f"job{ids.index(target)}", ALICE),
                (
                    f"unique prefix ({unique} chars, own jobs: {len(alices)})",
                    target[:unique],
                    ALICE,
                ),
                ("ambiguous prefix (1 char): INVALID_ARGUMENT", target[:1], ALICE),
            ]
            lines = [
                f"## 2. Resolving a reference among {n} kept jobs (alice owns {len(alices)})",
                "",
                "| reference | p50 µs | p99 µs |",
                "|---|---:|---:|",
            ]
            for label, ref, call in cases:
                times = []
                for _ in range(args.lookups):
                    t0 = time.perf_counter()
                    try:
                        await service.get_job_status(pb.GetJobStatusRequest(job_id=ref), call)
                    except Exception:  # the ambiguous one: INVALID_ARGUMENT, as intended
                        pass
                    times.append(time.perf_counter() - t0)
                lines.append(
                    f"| {label} | {us(percentile(times, 50))} | {us(percentile(times, 99))} |"
                )
        await store.aclose()
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=500)
    args = p.parse_args()
    sections = [trio.run(bench_top, args), trio.run(bench_references, args)]
    print(f"# jobworker: the cost of top and of job references (load {loadavg()})")
    for lines in sections:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
