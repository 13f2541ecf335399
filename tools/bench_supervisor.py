#!/usr/bin/env python3
"""Benchmark the supervisor against its peers, side by side in one run.

Absolute times on a shared 2-core machine are noise: every figure runs its peers interleaved
(round by round, in a shuffled order), and the table reports ratios.

1. Start latency of /bin/true, p50 and p99 over --starts rounds, in two phases: "running" (the
   call returned and the process runs in its groups) and "ended" (exited and reaped, and for
   jobworker and the by-hand peers: groups removed).
   - jobworker: `await sup.start()`, then `await job.wait()`, isolated (the cage: namespaces,
     a transient user, a private /tmp) and unisolated, two Supervisors side by side;
   - bare: `subprocess.Popen(...).wait()`, and trio's `open_process()` + `wait()` (the fair
     in-trio baseline: trio spawns from a worker thread);
   - by hand (cgroup v1 layouts): the job's groups made under this process's own groups, one per
     hierarchy jobworker uses (cpu, cpuacct, memory, blkio, pids and the unified leaf), with the
     same limit files written as jobworker writes (so both do the same kernel work), the child
     placed by a `preexec_fn` writing its pid with os.open/os.write, waited for, the groups
     removed: once with Popen, once with trio's open_process.
2. Output pass-through: a `python -c` producer os.write()s one fixed pseudo-random MiB
   --output-mib times to stdout. jobworker: 1 and --readers followers (follow=True from
   offset 0), each SHA-256-ing every byte. Peer: the same producer on a plain pipe (same pipe and
   read sizes as jobworker's pump) read by this process, feeding 1 and --readers hashers. Every
   digest is checked against one computed here from the block. MB/s (10^6 B/s) = bytes / (start
   → last reader done); also this process's CPU seconds per GB. The job's output goes pump →
   on-disk log (page cache) → readers (memory tail or pread); retention is raised to hold the
   whole output so no follower is dropped.
3. Memory: VmRSS growth of a fresh process that starts --rss-jobs `/bin/sleep` jobs, isolated
   and unisolated, vs. a bare trio program holding as many `open_process` children (each
   awaited by a task); for isolated jobs also the Rss and Pss of the processes the cage adds
   per job (its keeper and its init); then the time to stop them all (leaving the Supervisor;
   for the bare program SIGTERM + reap). Each measure runs in a child process of its own (this
   script, re-invoked).

Leaves nothing behind (checked at the end): no processes, no cgroups, no temporary files. Needs
root (or a delegated cgroup) for the cgroup peers.

    .venv/bin/python tools/bench_supervisor.py [--quick] [--only start,output,rss]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import os
import platform
import random
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# Run the checkout this file is in, whatever the environment has installed (an editable install
# made before jobworker/__init__.py existed resolves `jobworker` to an empty namespace package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio
import trio.testing
from benchlib import loadavg, own_children, percentile, progress  # tools/benchlib.py

import jobworker
from jobworker.supervisor.cgroups.discover import current_layout, disks_for
from jobworker.supervisor.supervisor import DEFAULT_RETENTION_BYTES

MiB = 2**20
GiB = 2**30
BLOCK_BYTES = MiB
# What jobworker's pump uses (spawn.PIPE_BYTES, job._READ_CHUNK_BYTES): the pipe peer gets the
# same, so the figure measures the log and the fan-out, not a pipe-size choice.
PIPE_BYTES = MiB
PUMP_READ_BYTES = 256 * 2**10
HAND_PREFIX = "jobworker-bench-"
V1_HIERARCHIES = ("cpu", "cpuacct", "memory", "blkio", "pids")

# Generous limits: the figures measure the supervisor, not a limit.
LIMITS = jobworker.Limits(
    cpu=float(os.cpu_count() or 2),
    memory_bytes=4 * GiB,
    io_read_bps=16 * GiB,
    io_write_bps=16 * GiB,
    pids=4096,
)

PRODUCER = r"""
import os, random, sys
blocks, seed = int(sys.argv[1]), int(sys.argv[2])
block = memoryview(random.Random(seed).randbytes(1 << 20))
for _ in range(blocks):
    view = block
    while view:
        view = view[os.write(1, view):]
"""


class BenchError(Exception):
    """A peer misbehaved (wrong digest, a job that failed): the figures would be meaningless."""


def now() -> float:
    return time.perf_counter()


def vmrss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile(needed: int = 0) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if needed and soft != resource.RLIM_INFINITY and soft < needed:
        progress(f"warning: RLIMIT_NOFILE is {soft}, about {needed} fds are needed")
    return soft, hard


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


# Every Supervisor's private data directory, so the end can check each one is gone.
DATA_DIRS: list[str] = []


@contextlib.asynccontextmanager
async def open_supervisor(**options: object) -> AsyncIterator[jobworker.Supervisor]:
    async with jobworker.Supervisor(**options) as sup:  # type: ignore[arg-type]
        DATA_DIRS.append(str(sup.data_dir))
        yield sup


# --- 1. start latency ----------------------------------------------------------------------------


class HandCgroups:
    """The by-hand peer's groups: a `jobworker-bench-…` subtree under this process's own group
    in each hierarchy, a `jobworker-bench-job-N` group per job beneath it. `close()` removes
    every directory this object made, whatever happened."""

    def __init__(self, limits: jobworker.Limits, cwd: str) -> None:
        layout = current_layout()
        missing = [h for h in V1_HIERARCHIES if h not in layout.v1]
        if missing:
            raise BenchError(f"by-hand peer: v1 hierarchies {missing} are not mounted")
        bases = {h: layout.v1[h] for h in V1_HIERARCHIES}
        if layout.unified is not None:
            bases["unified"] = layout.unified
        tag = f"{HAND_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.subtrees = {key: base / tag for key, base in bases.items()}
        self._made: list[Path] = []  # every directory made and not yet removed, in order
        self.ebusy_retries = 0
        memsw = (bases["memory"] / "memory.memsw.limit_in_bytes").exists()
        # The same files and values jobworker's v1 backend writes (plan.v1_settings), spelled
        # out here so this peer stands on its own.
        self._settings = [
            ("cpu", "cpu.cfs_period_us", "100000"),
            ("cpu", "cpu.cfs_quota_us", str(round(limits.cpu * 100_000))),
            ("memory", "memory.limit_in_bytes", str(limits.memory_bytes)),
        ]
        if memsw:
            self._settings.append(
                ("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            )
        for disk in disks_for(cwd):
            self._settings.append(
                ("blkio", "blkio.throttle.read_bps_device", f"{disk} {limits.io_read_bps}")
            )
            self._settings.append(
                ("blkio", "blkio.throttle.write_bps_device", f"{disk} {limits.io_write_bps}")
            )
        self._settings.append(("pids", "pids.max", str(limits.pids)))
        try:
            for path in self.subtrees.values():
                self._mkdir(path)
        except BaseException:
            self.close()
            raise

    @property
    def hierarchies(self) -> list[str]:
        return list(self.subtrees)

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)
        self._made.append(path)

    def create(self, n: int) -> dict[str, Path]:
        dirs = {key: sub / f"{HAND_PREFIX}job-{n}" for key, sub in self.subtrees.items()}
        for path in dirs.values():
            self._mkdir(path)
        for key, name, value in self._settings:
            _write(dirs[key] / name, value)
        return dirs

    def remove(self, dirs: dict[str, Path]) -> None:
        for path in dirs.values():
            self._rmdir(path)
            self._made.remove(path)

    def _rmdir(self, path: Path, timeout_s: float = 5.0) -> None:
        deadline = now() + timeout_s
        while True:
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or now() > deadline:
                    raise
            self.ebusy_retries += 1
            time.sleep(0.001)

    def close(self) -> None:
        errors = []
        for path in reversed(list(self._made)):
            try:
                self._rmdir(path)
                self._made.remove(path)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror}")
        if errors:
            raise BenchError("by-hand cgroups left behind: " + "; ".join(errors))


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def enter_groups_fn(dirs: dict[str, Path]) -> Callable[[], None]:
    targets = tuple(os.fsencode(d / "cgroup.procs") for d in dirs.values())

    def enter() -> None:  # runs in the forked child: raw syscalls only
        pid = str(os.getpid()).encode()
        for target in targets:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return enter


@dataclass
class Phases:
    running: list[float] = field(default_factory=list)  # seconds
    ended: list[float] = field(default_factory=list)


START_PEERS = {
    "jobworker": "jobworker isolated: start() / wait()",
    "jobworker_plain": "jobworker unisolated: start() / wait()",
    "popen": "bare: Popen / wait()",
    "trio": "bare: trio open_process / wait()",
    "hand_popen": "by hand: groups + limits, Popen(preexec_fn), rmdir",
    "hand_trio": "by hand: same, trio open_process(preexec_fn)",
}


async def bench_start(args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    true = "/bin/true"
    results = {name: Phases() for name in START_PEERS}
    counter = 0

    async with (
        open_supervisor(limits=LIMITS, grace_period_s=5.0, isolation=True) as sup,
        open_supervisor(limits=LIMITS, grace_period_s=5.0, isolation=False) as plain,
    ):
        backend = sup.cgroups
        hand = HandCgroups(LIMITS, os.getcwd()) if backend == "v1" else None
        try:

            async def start_and_wait(supervisor: jobworker.Supervisor) -> tuple[float, float]:
                t0 = now()
                job = await supervisor.start(true, owner="bench")
                t1 = now()
                status = await job.wait()
                t2 = now()
                if status.state is not jobworker.JobState.FINISHED:
                    raise BenchError(f"jobworker: /bin/true ended {status}")
                return t1 - t0, t2 - t0

            async def jobworker_peer() -> tuple[float, float]:
                return await start_and_wait(sup)

            async def jobworker_plain_peer() -> tuple[float, float]:
                return await start_and_wait(plain)

            async def popen_peer() -> tuple[float, float]:
                t0 = now()
                # Blocking on purpose: this peer is what a plain synchronous program pays.
                proc = subprocess.Popen([true])  # noqa: ASYNC220
                t1 = now()
                proc.wait()
                return t1 - t0, now() - t0

            async def trio_peer() -> tuple[float, float]:
                t0 = now()
                proc = await trio.lowlevel.open_process([true])
                t1 = now()
                await proc.wait()
                return t1 - t0, now() - t0

            async def hand_popen_peer() -> tuple[float, float]:
                nonlocal counter
                assert hand is not None
                counter += 1
                t0 = now()
                dirs = hand.create(counter)
                proc = subprocess.Popen([true], preexec_fn=enter_groups_fn(dirs))  # noqa: ASYNC220
                t1 = now()
                proc.wait()
                hand.remove(dirs)
                return t1 - t0, now() - t0

            async def hand_trio_peer() -> tuple[float, float]:
                nonlocal counter
                assert hand is not None
                counter += 1
                t0 = now()
                dirs = hand.create(counter)
                proc = await trio.lowlevel.open_process([true], preexec_fn=enter_groups_fn(dirs))
                t1 = now()
                await proc.wait()
                hand.remove(dirs)
                return t1 - t0, now() - t0

            peers: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
                "jobworker": jobworker_peer,
                "jobworker_plain": jobworker_plain_peer,
                "popen": popen_peer,
                "trio": trio_peer,
            }
            if hand is not None:
                peers["hand_popen"] = hand_popen_peer
                peers["hand_trio"] = hand_trio_peer
            rss_at_start = vmrss_bytes()
            total_rounds = args.warmup + args.starts
            for rnd in range(total_rounds):
                order = list(peers)
                rng.shuffle(order)
                for name in order:
                    running, ended = await peers[name]()
                    if rnd >= args.warmup:
                        results[name].running.append(running)
                        results[name].ended.append(ended)
                if (rnd + 1) % 50 == 0:
                    progress(f"start latency: round {rnd + 1}/{total_rounds}")
        finally:
            if hand is not None:
                hand.close()
    return {
        "backend": backend,
        "results": {k: v for k, v in results.items() if v.running},
        "hand_hierarchies": hand.hierarchies if hand is not None else None,
        "ebusy_retries": hand.ebusy_retries if hand is not None else 0,
        "rss_mib": rss_at_start / MiB,
    }


# --- 2. output pass-through ----------------------------------------------------------------------


# The producer's interpreter, for both peers: an isolated job runs as a transient user, which
# cannot run one kept under root's home (pyenv's, a venv's); the system's it can.
PRODUCER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def producer_argv(blocks: int, seed: int) -> list[str]:
    return [PRODUCER_PYTHON, "-I", "-S", "-c", PRODUCER, str(blocks), str(seed)]


def expected_digest(blocks: int, seed: int) -> str:
    block = random.Random(seed).randbytes(BLOCK_BYTES)
    h = hashlib.sha256()
    for _ in range(blocks):
        h.update(block)
    return h.hexdigest()


@dataclass
class Throughput:
    seconds: float
    cpu_s: float
    digests: list[tuple[str, int]]  # (hex digest, bytes) per reader


async def run_jobworker_output(readers: int, blocks: int, seed: int, chunk: int) -> Throughput:
    total = blocks * BLOCK_BYTES
    retention = max(total, DEFAULT_RETENTION_BYTES)
    async with open_supervisor(limits=LIMITS, retention_bytes=retention) as sup:
        digests: list[tuple[str, int]] = []
        stderr = bytearray()
        argv = producer_argv(blocks, seed)
        c0, t0 = cpu_seconds(), now()
        job = await sup.start(argv[0], argv[1:], owner="bench")

        async def reader() -> None:
            h = hashlib.sha256()
            n = 0
            async for piece in job.output(0, follow=True, max_chunk_bytes=chunk):
                if piece.stream is jobworker.OutputStream.STDOUT:
                    h.update(piece.data)
                    n += len(piece.data)
                elif len(stderr) < 4096:
                    stderr.extend(piece.data)
            digests.append((h.hexdigest(), n))

        async with trio.open_nursery() as nursery:
            for _ in range(readers):
                nursery.start_soon(reader)
        t1, c1 = now(), cpu_seconds()
        status = await job.wait()
        if status.state is not jobworker.JobState.FINISHED:
            raise BenchError(
                f"producer job ended {status.state.value} ({status.error or ''}"
                f" exit {status.exit_code}): {bytes(stderr[:500])!r}"
            )
    return Throughput(t1 - t0, c1 - c0, digests)


async def run_pipe_output(hashers: int, blocks: int, seed: int) -> Throughput:
    hs = [hashlib.sha256() for _ in range(hashers)]
    n = 0
    c0, t0 = cpu_seconds(), now()
    proc = await trio.lowlevel.open_process(
        producer_argv(blocks, seed),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        stderr = bytearray()

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            while data := await proc.stderr.receive_some():
                stderr.extend(data[: 4096 - len(stderr)])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_stderr)
            while data := await proc.stdout.receive_some(PUMP_READ_BYTES):
                for h in hs:
                    h.update(data)
                n += len(data)
        await proc.wait()
        t1, c1 = now(), cpu_seconds()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await stream.aclose()
    if proc.returncode != 0:
        raise BenchError(f"pipe producer exited {proc.returncode}: {bytes(stderr[:500])!r}")
    return Throughput(t1 - t0, c1 - c0, [(h.hexdigest(), n) for h in hs])


OUTPUT_PEERS = ("pipe1", "jobworker1", "pipeN", "jobworkerN")


async def bench_output(args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    blocks = args.output_mib
    total = blocks * BLOCK_BYTES
    expected = expected_digest(blocks, args.seed)
    runs: dict[str, list[Throughput]] = {name: [] for name in OUTPUT_PEERS}
    peers = {
        "pipe1": lambda: run_pipe_output(1, blocks, args.seed),
        "jobworker1": lambda: run_jobworker_output(1, blocks, args.seed, args.chunk_kib * 1024),
        "pipeN": lambda: run_pipe_output(args.readers, blocks, args.seed),
        "jobworkerN": lambda: run_jobworker_output(
            args.readers, blocks, args.seed, args.chunk_kib * 1024
        ),
    }
    checked = 0
    for rnd in range(args.output_rounds):
        order = list(peers)
        rng.shuffle(order)
        for name in order:
            result = await peers[name]()
            want = 1 if name.endswith("1") else args.readers
            if len(result.digests) != want:
                raise BenchError(f"{name}: {len(result.digests)} readers finished, not {want}")
            for digest, n in result.digests:
                if n != total or digest != expected:
                    raise BenchError(
                        f"{name}: a reader got {n} bytes with sha256 {digest[:16]}…, expected"
                        f" {total} bytes with {expected[:16]}…"
                    )
                checked += 1
            runs[name].append(result)
            progress(
                f"output round {rnd + 1}/{args.output_rounds}: {name:<11}"
                f" {total / result.seconds / 1e6:8.0f} MB/s"
            )
    return {"runs": runs, "total": total, "expected": expected, "checked": checked}


# --- 3. memory per job (in child processes) -------------------------------------------------------


def cage_processes() -> list[int]:
    """This process's cage keepers and their inits: the processes isolation adds per job."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
            names[int(entry)] = name
    keepers = [p for p in children.get(os.getpid(), []) if names[p] == "jobworker-cage"]
    inits = [c for k in keepers for c in children.get(k, []) if names[c] == "jobworker-cage"]
    return keepers + inits


def rss_and_pss(pids: Sequence[int]) -> tuple[int, int]:
    """Summed Rss and Pss (shared pages split between their users), bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "Rss":
                rss += int(value.split()[0]) * 1024
            elif key == "Pss":
                pss += int(value.split()[0]) * 1024
    return rss, pss


async def child_rss_jobworker(
    n: int, sleep_arg: str, *, isolation: bool = True
) -> dict[str, object]:
    raise_nofile(n * 8 + 256)
    async with open_supervisor(grace_period_s=5.0, isolation=isolation) as sup:
        gc.collect()
        before, fds_before = vmrss_bytes(), len(os.listdir("/proc/self/fd"))
        t0 = now()
        jobs = [await sup.start("/bin/sleep", [sleep_arg], owner="bench") for _ in range(n)]
        started_s = now() - t0
        bad = [j.status() for j in jobs if j.status().state is not jobworker.JobState.RUNNING]
        if bad:
            raise BenchError(f"{len(bad)} sleep jobs are not running; first: {bad[0]}")
        await trio.testing.wait_all_tasks_blocked(0.2)
        gc.collect()
        after, fds_after = vmrss_bytes(), len(os.listdir("/proc/self/fd"))
        cages = cage_processes()
        cage_rss, cage_pss = rss_and_pss(cages)
        t_stop = now()
    stop_s = now() - t_stop
    states = {j.status().state.value for j in jobs}
    return {
        "before": before,
        "after": after,
        "fds": fds_after - fds_before,
        "start_s": started_s,
        "stop_s": stop_s,
        "states": sorted(states),
        "data_dir": str(sup.data_dir),
        "cage_processes": len(cages),
        "cage_rss": cage_rss,
        "cage_pss": cage_pss,
    }


async def child_rss_bare(n: int, sleep_arg: str) -> dict[str, object]:
    raise_nofile(n * 4 + 256)
    procs: list[trio.Process] = []
    try:
        async with trio.open_nursery() as nursery:
            gc.collect()
            before, fds_before = vmrss_bytes(), len(os.listdir("/proc/self/fd"))
            t0 = now()
            for _ in range(n):
                proc = await trio.lowlevel.open_process(
                    ["/bin/sleep", sleep_arg],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(proc)
                nursery.start_soon(proc.wait)
            started_s = now() - t0
            await trio.testing.wait_all_tasks_blocked(0.2)
            gc.collect()
            after, fds_after = vmrss_bytes(), len(os.listdir("/proc/self/fd"))
            t_stop = now()
            for proc in procs:
                proc.terminate()
        stop_s = now() - t_stop
    finally:
        # Whatever happened: no child outlives this program.
        with trio.CancelScope(shield=True):
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    return {
        "before": before,
        "after": after,
        "fds": fds_after - fds_before,
        "start_s": started_s,
        "stop_s": stop_s,
        "states": sorted({f"exit {p.returncode}" for p in procs}),
    }


def processes_with_argv(argv: Sequence[str]) -> list[int]:
    wanted = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == wanted:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def run_rss_child(kind: str, n: int, sleep_arg: str) -> dict[str, object]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--rss-jobs",
        str(n),
        "--sleep-arg",
        sleep_arg,
    ]
    # A session of its own: a terminal's Ctrl-C reaches only us, and we pass on exactly one
    # SIGINT (a second one while the child's Supervisor shuts down would interrupt that too).
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        try:
            out, err = child.communicate(timeout=900)
        except BaseException:
            # Ctrl-C or the timeout: SIGINT lets the child leave its Supervisor (which stops
            # every job and removes every group); SIGKILL only if it does not finish.
            child.send_signal(signal.SIGINT)
            try:
                child.communicate(timeout=60)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.communicate()
            raise
    finally:
        # A child that died hard could leave its sleeps to init: find them by their argv.
        strays = processes_with_argv(["/bin/sleep", sleep_arg])
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if strays:
            progress(f"ANOMALY: {len(strays)} '/bin/sleep {sleep_arg}' left by {kind}; killed")
    if child.returncode != 0:
        raise BenchError(f"{kind} child exited {child.returncode}:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["strays"] = len(strays)
    if "data_dir" in result:
        DATA_DIRS.append(result["data_dir"])
    return result


def bench_rss(args: argparse.Namespace) -> dict[str, list[dict[str, object]]]:
    # Unique, so this run's sleeps can be told from anybody else's.
    sleep_arg = f"3600.{os.getpid():07d}"
    runs: dict[str, list[dict[str, object]]] = {
        "rss-jobworker": [],
        "rss-jobworker-plain": [],
        "rss-bare": [],
    }
    for rnd in range(args.rss_rounds):
        order = ["rss-bare", "rss-jobworker-plain", "rss-jobworker"]
        if rnd % 2:
            order.reverse()
        for kind in order:
            progress(f"memory round {rnd + 1}/{args.rss_rounds}: {kind}, {args.rss_jobs} sleeps")
            runs[kind].append(run_rss_child(kind, args.rss_jobs, sleep_arg))
    return runs


# --- hygiene ----------------------------------------------------------------------------------


def jobworker_cgroups(root: str = "/sys/fs/cgroup") -> set[str]:
    """Every directory named *jobworker* under the cgroup mounts (not descending into them)."""
    found: set[str] = set()

    def walk(directory: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if "jobworker" in entry.name:
                    found.add(entry.path)
                else:
                    walk(entry.path)

    walk(root)
    return found


# --- report -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def env_header() -> str:
    async def probe() -> str:
        async with open_supervisor() as sup:
            return sup.cgroups

    try:
        backend = trio.run(probe)
    except jobworker.SupervisorError as exc:
        backend = f"unusable ({exc})"
    detail = ""
    if backend == "v1" and current_layout().unified is not None:
        detail = " (hybrid: v1 controllers + a unified leaf per job for cgroup.kill)"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"env: Linux {platform.release()} {platform.machine()} · Python {platform.python_version()}"
        f" · trio {trio.__version__} · jobworker {jobworker.__version__} · cgroups {backend}"
        f"{detail} · {os.cpu_count()} CPUs · RLIMIT_NOFILE {soft} · loadavg {loadavg()} at start"
    )


def report_start(data: dict[str, object], args: argparse.Namespace) -> list[str]:
    results: dict[str, Phases] = data["results"]  # type: ignore[assignment]
    lines = [
        f"## 1. Start latency: /bin/true, {args.starts} interleaved rounds"
        f" ({args.warmup} warm-up rounds dropped; bench process RSS {data['rss_mib']:.0f} MiB)",
        "",
        "| path | running p50 ms | p99 ms | ended p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    stats = {}
    for name, phases in results.items():
        s = (
            statistics.median(phases.running),
            percentile(phases.running, 99),
            statistics.median(phases.ended),
            percentile(phases.ended, 99),
        )
        stats[name] = s
        lines.append(f"| {START_PEERS[name]} | " + " | ".join(ms(v) for v in s) + " |")
    lines += ["", "| ratio (p50 / p99) | running | ended |", "|---|---:|---:|"]
    jw = stats["jobworker"]
    for name, label in (
        ("jobworker_plain", "isolated ÷ unisolated (goal: running p50 at most 1.5x)"),
        ("popen", "jobworker ÷ Popen"),
        ("trio", "jobworker ÷ trio open_process"),
        ("hand_popen", "jobworker ÷ by hand (Popen)"),
        ("hand_trio", "jobworker ÷ by hand (trio)"),
    ):
        if name in stats:
            b = stats[name]
            lines.append(
                f"| {label} | {ratio(jw[0], b[0])} / {ratio(jw[1], b[1])}"
                f" | {ratio(jw[2], b[2])} / {ratio(jw[3], b[3])} |"
            )
    if data["hand_hierarchies"]:
        lines.append("")
        lines.append(
            f"By-hand groups: {', '.join(data['hand_hierarchies'])};"
            f" rmdir EBUSY retries: {data['ebusy_retries']}."
        )
    return lines


def report_output(data: dict[str, object], args: argparse.Namespace) -> list[str]:
    runs: dict[str, list[Throughput]] = data["runs"]  # type: ignore[assignment]
    total: int = data["total"]  # type: ignore[assignment]
    k = args.readers
    labels = {
        "pipe1": ("plain pipe → 1 hasher", 1, None),
        "jobworker1": ("jobworker → 1 follower", 1, "pipe1"),
        "pipeN": (f"plain pipe → {k} hashers", k, None),
        "jobworkerN": (f"jobworker → {k} followers", k, "pipeN"),
    }
    mbps = {n: statistics.median(total / r.seconds / 1e6 for r in rs) for n, rs in runs.items()}
    cpu = {n: statistics.median(r.cpu_s / (total / 1e9) for r in rs) for n, rs in runs.items()}
    lines = [
        f"## 2. Output pass-through: {total // MiB} MiB to stdout, median of"
        f" {args.output_rounds} interleaved round(s); readers read {args.chunk_kib} KiB chunks",
        "",
        "| path | readers | MB/s (all readers done) | ÷ pipe | this process CPU s/GB | ÷ pipe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (label, readers, base) in labels.items():
        lines.append(
            f"| {label} | {readers} | {mbps[name]:.0f} | "
            f"{ratio(mbps[name], mbps[base]) if base else '1.00x'} | {cpu[name]:.2f} | "
            f"{ratio(cpu[name], cpu[base]) if base else '1.00x'} |"
        )
    lines.append("")
    lines.append(
        f"Digests: {data['checked']} readers, each {total} bytes, all equal to the expected"
        f" sha256 {data['expected'][:16]}…"
    )
    return lines


def report_rss(runs: dict[str, list[dict[str, object]]], args: argparse.Namespace) -> list[str]:
    n = args.rss_jobs

    def med(kind: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in runs[kind])  # type: ignore[arg-type]

    def growth(kind: str) -> float:
        return statistics.median(
            float(r["after"]) - float(r["before"])
            for r in runs[kind]  # type: ignore[arg-type]
        )

    jw, plain, bare = "rss-jobworker", "rss-jobworker-plain", "rss-bare"
    kinds = (jw, plain, bare)

    def per_job(kind: str, key: str) -> float:
        return med(kind, key) / n / 1024 if kind != bare else 0.0

    rows = [
        ("supervisor RSS before, MiB", [med(k, "before") / MiB for k in kinds], "{:.1f}"),
        (
            f"supervisor RSS with {n} sleeping, MiB",
            [med(k, "after") / MiB for k in kinds],
            "{:.1f}",
        ),
        ("supervisor RSS growth per job, KiB", [growth(k) / n / 1024 for k in kinds], "{:.1f}"),
        ("cage processes per job", [med(jw, "cage_processes") / n, 0.0, 0.0], "{:.2f}"),
        ("cage RSS per job, KiB", [per_job(jw, "cage_rss"), 0.0, 0.0], "{:.1f}"),
        (
            "cage PSS per job (shared pages split), KiB",
            [per_job(jw, "cage_pss"), 0.0, 0.0],
            "{:.1f}",
        ),
        ("fds per job", [med(k, "fds") / n for k in kinds], "{:.2f}"),
        (f"starting {n}, s", [med(k, "start_s") for k in kinds], "{:.2f}"),
        (f"stopping {n} (SIGTERM → all reaped), s", [med(k, "stop_s") for k in kinds], "{:.2f}"),
    ]
    lines = [
        f"## 3. Memory: {n} x /bin/sleep, each peer in a fresh process, median of"
        f" {args.rss_rounds} round(s)",
        "",
        "| figure | jobworker isolated | jobworker unisolated | bare trio |"
        " isolated ÷ unisolated |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, (a, b, c), fmt in rows:
        lines.append(
            f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {fmt.format(c)} | {ratio(a, b)} |"
        )
    # The cage's processes share their text pages (one static program): RSS counts them once
    # per process, PSS splits them, so PSS is what a thousand cages cost together.
    total_a = growth(jw) / n / 1024 + per_job(jw, "cage_pss")
    total_b = growth(plain) / n / 1024
    lines.append(
        f"| everything per job (supervisor growth + cage PSS), KiB | {total_a:.1f} |"
        f" {total_b:.1f} | - | {ratio(total_a, total_b)} |"
    )
    states = {k: sorted({s for r in runs[k] for s in r["states"]}) for k in kinds}  # type: ignore[attr-defined]
    lines += [
        "",
        "Final states: "
        + "; ".join(f"{k.removeprefix('rss-')} {', '.join(v)}" for k, v in states.items())
        + ".",
    ]
    return lines


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jobworker's Supervisor against bare and by-hand peers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run (30 starts, 64 MiB, 100 sleeps, one round each)",
    )
    p.add_argument(
        "--only",
        default="start,output,rss",
        help="comma-separated figures to run: start, output, rss",
    )
    p.add_argument("--starts", type=int, default=200, help="start-latency rounds (samples)")
    p.add_argument("--warmup", type=int, default=10, help="start-latency rounds dropped")
    p.add_argument("--output-mib", type=int, default=1024, help="MiB the producer writes")
    p.add_argument("--output-rounds", type=int, default=3, help="output rounds (median)")
    p.add_argument("--readers", type=int, default=16, help="concurrent followers / hashers")
    p.add_argument("--chunk-kib", type=int, default=64, help="followers' max_chunk_bytes, KiB")
    p.add_argument("--rss-jobs", type=int, default=1000, help="sleeping jobs / children")
    p.add_argument("--rss-rounds", type=int, default=2, help="memory rounds (median)")
    p.add_argument("--seed", type=int, default=20240601, help="shuffle and producer seed")
    p.add_argument(
        "--child",
        choices=("rss-jobworker", "rss-jobworker-plain", "rss-bare"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--sleep-arg", default="3600", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.starts, args.warmup = 30, 5
        args.output_mib, args.output_rounds = 64, 1
        args.rss_jobs, args.rss_rounds = 100, 1
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - {"start", "output", "rss"}
    if unknown:
        p.error(f"unknown figures in --only: {', '.join(sorted(unknown))}")
    return args


def child_main(args: argparse.Namespace) -> int:
    runs = {
        "rss-jobworker": child_rss_jobworker,
        "rss-jobworker-plain": partial(child_rss_jobworker, isolation=False),
        "rss-bare": child_rss_bare,
    }
    result = trio.run(runs[args.child], args.rss_jobs, args.sleep_arg)
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    raise_nofile(args.rss_jobs * 8 + 256)
    rng = random.Random(args.seed)
    cgroups_before = jobworker_cgroups()
    header = env_header()
    sections: list[list[str]] = []
    failed = False
    try:
        if "start" in args.only:
            progress("figure 1: start latency")
            data = trio.run(bench_start, args, rng)
            sections.append(report_start(data, args))
        if "output" in args.only:
            progress("figure 2: output pass-through")
            data = trio.run(bench_output, args, rng)
            sections.append(report_output(data, args))
        if "rss" in args.only:
            progress("figure 3: memory with many sleeping jobs")
            sections.append(report_rss(bench_rss(args), args))
    except BenchError as exc:
        failed = True
        print(f"BENCH FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted", file=sys.stderr)
    finally:
        # Hygiene, whatever happened above.
        leftovers = []
        for _ in range(20):  # another process's jobworker may be mid-cleanup: look again
            leftovers = sorted(jobworker_cgroups() - cgroups_before)
            if not leftovers:
                break
            time.sleep(0.25)
        temps = [d for d in DATA_DIRS if os.path.exists(d)]
        children = own_children()
    hygiene = [
        f"cgroups left: {len(leftovers)}" + (f" {leftovers[:5]}" if leftovers else ""),
        f"temp dirs left: {len(temps)}" + (f" {temps[:5]}" if temps else ""),
        f"child processes left: {len(children)}" + (f" {children[:10]}" if children else ""),
    ]
    print(f"# jobworker supervisor bench{' (--quick)' if args.quick else ''}")
    print(header)
    for lines in sections:
        print()
        print("\n".join(lines))
    print()
    print("Hygiene: " + "; ".join(hygiene) + f". Loadavg at end: {loadavg()}.")
    if leftovers or temps or children:
        print("(left-overs may also belong to another process using jobworker right now)")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
