#!/usr/bin/env python3
"""What the output log's coalescing rule costs a reader: a real job's output, read whole under
each rule.

Records join one chunk only if read less than ``COALESCE_NS`` (1 ms) after the chunk's first
byte, so that a chunk's time stands for all of it (supervisor/output.py, "Readers"). The cost
is more chunks — more messages on the wire — where a job writes in small pieces. This runs each
--command as a real job through a Supervisor (cgroups and isolation off: the log is measured,
not the cage), then reads its log whole, --runs rounds, the rules alternating within a round:

    1ms           the rule (COALESCE_NS = 1 ms)
    every-change  never join records read at different times (COALESCE_NS = 1 ns)
    always        join whatever the times (what the log did before it kept times)

and prints, per rule, the reader's CPU time (process_time, median), its throughput, and the
chunks read. Usage (as root, from the repository):

    .venv/bin/python tools/bench_output_coalesce.py [--chunk-kib 256] [--runs 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobworker.supervisor import Supervisor, output

COMMANDS = {
    "head -c 200M /dev/zero": ("head", ["-c", str(200 * 2**20), "/dev/zero"]),
    "seq 1 26000000": ("seq", ["1", "26000000"]),  # 213 MiB of short lines
}
RULES = {"1ms": 1_000_000, "every-change": 1, "always": 2**62}


async def read_whole(log: output.OutputLog, chunk_bytes: int) -> tuple[float, int]:
    started = time.process_time()
    chunks = 0
    async for _ in log.reader(0, max_chunk_bytes=chunk_bytes):
        chunks += 1
    return time.process_time() - started, chunks


async def main(chunk_bytes: int, runs: int) -> None:
    print(f"chunks of at most {chunk_bytes // 1024} KiB; CPU medians of {runs} reads")
    for label, (command, args) in COMMANDS.items():
        async with Supervisor(cgroups="off", isolation=False) as supervisor:
            job = await supervisor.start(command, args)
            async for _ in job.output(follow=True):
                pass  # until it has ended and its log is complete
            log = job._log  # a tool: the log itself is what is measured
            results: dict[str, list[tuple[float, int]]] = {rule: [] for rule in RULES}
            try:
                for _ in range(runs):
                    for rule, window_ns in RULES.items():
                        output.COALESCE_NS = window_ns  # type: ignore[misc]
                        results[rule].append(await read_whole(log, chunk_bytes))
            finally:
                output.COALESCE_NS = RULES["1ms"]  # type: ignore[misc]
            size = log.end_offset
        for rule, measured in results.items():
            cpu_s = statistics.median(cpu for cpu, _ in measured)
            print(
                f"{label:24} {rule:12} {cpu_s * 1000:6.0f} ms CPU  {size / cpu_s / 1e9:5.2f} GB/s"
                f"  {measured[0][1]:6} chunks"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-kib", type=int, default=256, help="max bytes per chunk, KiB")
    parser.add_argument("--runs", type=int, default=9)
    options = parser.parse_args()
    trio.run(main, options.chunk_kib * 1024, options.runs)
