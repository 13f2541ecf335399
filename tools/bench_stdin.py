#!/usr/bin/env python3
"""Benchmark ``jobctl run -i``: how fast jobctl's stdin reaches a job, side by side in one run
with a local pipe (the floor) and a minimal grpcio client doing the same work.

Absolute times on a shared 2-core machine drift; the peers run alternating, round by round in a
rotated order, and the report gives medians and ratios.

One ``jobworker serve`` of this checkout (cgroups and isolation as the server decides by
default: on as root, the way a job's stdin really travels, through the cage), with its own
certificates from ``jobworker certs init``, and a job default of all the host's CPUs so that
the job's ``wc`` is never what is throttled. An input file of --mib MiB of random bytes, and a
1-byte one. Each round runs, on both files:

- ``cat FILE | wc -c``: a local pipe, the floor (two processes started by this script; their
  CPU is cat's and wc's, the counting included);
- ``jobctl run -i wc -c < FILE``: what is under test, through a launcher made from
  ``[project.scripts]`` exactly as pip writes console scripts;
- the grpcio client (C-core and BoringSSL; a script of its own importing only grpc and the
  messages of this checkout): StartJob(open_stdin, wc -c), WriteJobInput in 64 KiB messages
  from the file while GetJobLogs(follow) reads the job's output: the same work as jobctl's.

Each run's printed count is checked against the file's size (and the grpcio client checks
``bytes_written``). MB/s = bytes / median wall, and net of start-up: (bytes - 1) / (median
wall on the big file - median wall on the 1-byte file). Client CPU (``getrusage`` of
children) and the server's CPU (its /proc stat), per GB, net likewise.

With ``--profile PATH`` jobctl also runs once more under cProfile on the big file, its stats
written to PATH (``python -m pstats PATH``).

Leaves nothing behind (checked at the end): the server is stopped (SIGTERM, then SIGKILL) on
every path, Ctrl-C and errors included, and the temporary directory removed.

    .venv/bin/python tools/bench_stdin.py [--mib 256] [--runs 5] [--warmup 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Run the checkout this file is in, whatever the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_jobctl import (  # tools/bench_jobctl.py: the same launchers, env, server output
    GRPCIO_PREAMBLE,
    LISTENING,
    PYTHON,
    ROOT,
    BenchError,
    Side,
    child_env,
    env_header,
    make_side,
    stop_server,
)
from benchlib import progress, rotated, run_and_report  # tools/benchlib.py

from jobworker.cli.jobctl import STDIN_CHUNK_BYTES

MB = 10**6
MIB = 2**20
STARTUP_TIMEOUT_S = 60.0
# Both clients send the same messages: jobctl's size, whatever it is now.
CHUNK_BYTES = STDIN_CHUNK_BYTES

# The peer client: what a user writing a gRPC client in Python would run to do `run -i wc -c`.
# The input goes in from grpcio's request-consumer thread while the main thread follows the
# output, as jobctl does both at once. Prints the job's stdout; exits non-zero when the server
# says it gave the job fewer bytes than the file holds.
GRPCIO_CLIENT = (
    GRPCIO_PREAMBLE
    + """\
path = sys.argv[1]
size = os.path.getsize(path)
service = "/jobworker.v1.JobService/"
with grpc.secure_channel(os.environ["JOBCTL_SERVER"], credentials) as channel:
    start = channel.unary_unary(
        service + "StartJob",
        request_serializer=pb.StartJobRequest.SerializeToString,
        response_deserializer=pb.StartJobResponse.FromString,
    )
    write = channel.stream_unary(
        service + "WriteJobInput",
        request_serializer=pb.WriteJobInputRequest.SerializeToString,
        response_deserializer=pb.WriteJobInputResponse.FromString,
    )
    logs = channel.unary_stream(
        service + "GetJobLogs",
        request_serializer=pb.GetJobLogsRequest.SerializeToString,
        response_deserializer=pb.GetJobLogsResponse.FromString,
    )
    request = pb.StartJobRequest(command="wc", args=["-c"], open_stdin=True)
    job_id = start(request, timeout=30).job_id

    def messages():
        yield pb.WriteJobInputRequest(job_id=job_id)
        with open(path, "rb", buffering=0) as f:
            while data := f.read({chunk}):
                yield pb.WriteJobInputRequest(data=data)

    written = write.future(messages())
    out = b"".join(
        chunk.data
        for chunk in logs(pb.GetJobLogsRequest(job_id=job_id, follow=True))
        if chunk.stream == pb.LOG_STREAM_STDOUT
    )
    given = written.result(timeout=30).bytes_written
sys.stdout.buffer.write(out)
if given != size:
    sys.exit(f"the job was given {{given}} bytes of {{size}}")
"""
)

# jobctl's main under cProfile. Not the launcher: it leaves by os._exit once the app has
# returned (jobworker/cli/launch.py), so `python -m cProfile` on it would never write its stats.
# The main thread only: the thread reading stdin spends its time in os.read.
PROFILED_JOBCTL = """\
import cProfile, sys
sys.path.insert(0, {root!r})
from jobworker.cli.jobctl import main
profile = cProfile.Profile()
code = profile.runcall(main, sys.argv[2:])
profile.dump_stats(sys.argv[1])
sys.exit(code)
"""


# =============================================================================================
# The server


def start_server(side: Side, args: argparse.Namespace, certs: Path, tmp: Path) -> None:
    stderr = open(tmp / "server.log", "wb")  # the server's; closed below, once it has it
    try:
        side.server = subprocess.Popen(
            [
                side.jobworker,
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                str(certs / "server.crt"),
                "--key",
                str(certs / "server.key"),
                "--ca",
                str(certs / "ca.crt"),
                "--data-dir",
                str(tmp / "data"),
                "--cgroups",
                args.cgroups,
                "--isolation",
                args.isolation,
                "--cpu",
                str(args.cpu),
                "--memory",
                args.memory,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_env(None, certs),
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops its server
        )
    finally:
        stderr.close()
    assert side.server.stdout is not None
    line = side.server.stdout.readline().rstrip(b"\n")  # blocks until it listens (or dies)
    match = LISTENING.match(line)
    if match is None:
        log = (tmp / "server.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"the server did not start ({line!r}): " + " / ".join(log))
    side.address = f"{match.group(1).decode()}:{int(match.group(2))}"


def server_summary(tmp: Path) -> str:
    """What the server said it runs jobs with (cgroups, isolation), from its "serving" line."""
    with contextlib.suppress(OSError):
        for line in (tmp / "server.log").read_text(errors="replace").splitlines():
            match = re.search(r" serving on \S+: (.*?); job defaults", line)
            if match:
                return match.group(1)
    return ""


# =============================================================================================
# Timing one peer on one file


@dataclass(frozen=True)
class Peer:
    key: str
    label: str
    argv: list[str] | None  # None: the local pipe `cat FILE | wc -c`
    env: dict[str, str]
    stdin_from_file: bool = False  # `< FILE`


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # the children's user + sys
    server_cpu_s: float


def _pipeline(path: Path, timeout_s: float) -> tuple[int, bytes, bytes]:
    """`cat FILE | wc -c` without a shell: the two processes are the whole floor."""
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        with subprocess.Popen(
            ["wc", "-c"], stdin=cat.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as wc:
            cat.stdout.close()  # wc holds the only read end: cat gets EPIPE if wc dies
            try:
                out, err = wc.communicate(timeout=timeout_s)
            except BaseException:
                cat.kill()
                wc.kill()
                raise
        code = cat.wait()
    return (wc.returncode or code), out, err


def run_once(peer: Peer, path: Path, side: Side, timeout_s: float) -> tuple[Sample, bytes]:
    before_server = side.server_cpu_s()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    if peer.argv is None:
        code, out, err = _pipeline(path, timeout_s)
    else:
        with open(path, "rb") as f:
            done = subprocess.run(
                peer.argv,
                env=peer.env,
                stdin=f if peer.stdin_from_file else subprocess.DEVNULL,
                capture_output=True,  # a count's line; stderr should hold nothing
                timeout=timeout_s,
                check=False,
            )
        code, out, err = done.returncode, done.stdout, done.stderr
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = side.server_cpu_s() - before_server
    if code != 0:
        raise BenchError(f"{peer.label}: exit {code}: {err.decode(errors='replace').strip()}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Sample(wall, cpu, server), out


def check_count(peer: Peer, out: bytes, size: int) -> None:
    if out.split() != [str(size).encode()]:
        raise BenchError(f"{peer.label}: wc -c printed {out!r}, the input has {size} bytes")


# =============================================================================================


def make_input(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(os.urandom(min(left, MIB)))


def make_peers(side: Side, certs: Path, grpcio: Path) -> list[Peer]:
    env = child_env(side, certs)
    return [
        Peer("cat", "cat FILE, piped to wc -c (the floor)", None, env),
        Peer(
            "jobctl",
            "jobctl run -i wc -c < FILE",
            [side.jobctl, "run", "-i", "wc", "-c"],
            env,
            stdin_from_file=True,
        ),
        Peer(
            "grpcio",
            "grpcio client: StartJob + WriteJobInput + GetJobLogs",
            [PYTHON, str(grpcio)],
            env,
        ),
    ]


def file_arg(peer: Peer, path: Path) -> Peer:
    """The peer reading `path`: the grpcio client takes it as its argument."""
    if peer.key == "grpcio":
        assert peer.argv is not None
        return Peer(peer.key, peer.label, [*peer.argv, str(path)], peer.env)
    return peer


def bench(args, side: Side, peers: list[Peer], big: Path, tiny: Path, timeout_s: float):
    files = {"big": (big, big.stat().st_size), "tiny": (tiny, tiny.stat().st_size)}
    runs = [(peer, name) for peer in peers for name in files]
    samples: dict[tuple[str, str], list[Sample]] = {(p.key, n): [] for p, n in runs}
    total = args.warmup + args.runs
    for round_index in range(total):
        for peer, name in rotated(runs, round_index):
            path, size = files[name]
            sample, out = run_once(file_arg(peer, path), path, side, timeout_s)
            check_count(peer, out, size)  # every run: a short stream is a failure, not a figure
            if round_index >= args.warmup:
                samples[peer.key, name].append(sample)
        progress(
            f"round {round_index + 1}/{total}{' (warm-up)' if round_index < args.warmup else ''}"
        )
    return samples


def profile_jobctl(args, side: Side, peers: list[Peer], big: Path, tmp: Path, timeout_s: float):
    jobctl = next(p for p in peers if p.key == "jobctl")
    assert jobctl.argv is not None
    wrapper = tmp / "profiled_jobctl.py"
    wrapper.write_text(PROFILED_JOBCTL.format(root=str(ROOT)))
    argv = [PYTHON, str(wrapper), str(args.profile), *jobctl.argv[1:]]
    profiled = Peer(jobctl.key, "jobctl under cProfile", argv, jobctl.env, stdin_from_file=True)
    sample, out = run_once(profiled, big, side, timeout_s)
    check_count(profiled, out, big.stat().st_size)
    if not args.profile.exists():
        raise BenchError(f"jobctl under cProfile wrote no {args.profile}")
    return (
        f"Profile: jobctl under cProfile took {sample.wall_s:.2f} s wall, {sample.cpu_s:.2f} s"
        f" CPU on the big file; stats in {args.profile} (python -m pstats)."
    )


def report(args, peers: list[Peer], samples, size: int) -> list[str]:
    gb = (size - 1) / 1e9

    def med(key: str, name: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples[key, name])

    figures: dict[str, dict[str, float]] = {}
    for peer in peers:
        wall = med(peer.key, "big", "wall_s")
        net = wall - med(peer.key, "tiny", "wall_s")
        figures[peer.key] = {
            "wall": wall,
            "start": med(peer.key, "tiny", "wall_s"),
            "mbps": size / wall / MB,
            "net": (size - 1) / net / MB if net > 0 else float("inf"),
            "client": (med(peer.key, "big", "cpu_s") - med(peer.key, "tiny", "cpu_s")) / gb,
            "server": (med(peer.key, "big", "server_cpu_s") - med(peer.key, "tiny", "server_cpu_s"))
            / gb,
        }
    cat, grpcio, jobctl = figures["cat"], figures["grpcio"], figures["jobctl"]
    lines = [
        f"## stdin into `wc -c`, {args.mib} MiB of random bytes: medians of {args.runs}"
        " alternating runs",
        "",
        "| peer | wall s | 1-byte wall s | MB/s | MB/s net | client CPU-s/GB | server CPU-s/GB"
        " | x cat (net) | x grpcio (net) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for peer in peers:
        f = figures[peer.key]
        lines.append(
            f"| {peer.label} | {f['wall']:.3f} | {f['start']:.3f} | {f['mbps']:.0f} |"
            f" {f['net']:.0f} | {f['client']:.2f} | {f['server']:.2f} |"
            f" {f['net'] / cat['net']:.3f}x | {f['net'] / grpcio['net']:.2f}x |"
        )
    lines += [
        "",
        "Counts: every run's `wc -c` printed the input's size.",
        f"jobctl / grpcio client: {jobctl['net'] / grpcio['net']:.2f}x net"
        f" ({jobctl['mbps'] / grpcio['mbps']:.2f}x whole runs);"
        f" jobctl / local pipe: {jobctl['net'] / cat['net']:.3f}x net"
        f" ({jobctl['mbps'] / cat['mbps']:.3f}x whole runs).",
        "MB = 10^6 B. Net: (bytes - 1) / (wall on the big file - wall on the 1-byte file), i.e."
        " start-up, connection and exit taken out. Client CPU is the children's (cat's row: cat"
        " and wc, the counting included; the others': the client alone, wc runs in the job);"
        " server CPU is the server process's own (the job's wc not included).",
    ]
    return lines


def run_bench(args: argparse.Namespace, tmp: Path) -> list[str]:
    side = make_side("tree", ROOT, tmp)
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "jobworker")],
                   check=True, stdout=subprocess.DEVNULL, env=child_env(None, tmp))  # fmt: skip
    certs = tmp / "tls"
    subprocess.run(
        [side.jobworker, "certs", "init", str(certs), "--user", "alice"],
        check=True,
        capture_output=True,
        env=child_env(None, certs),
    )
    grpcio = tmp / "grpcio_client.py"
    grpcio.write_text(GRPCIO_CLIENT.format(root=str(ROOT), chunk=CHUNK_BYTES))
    size = args.mib * MIB
    big, tiny = tmp / "input.bin", tmp / "tiny.bin"
    progress(f"writing {args.mib} MiB of random bytes")
    make_input(big, size)
    tiny.write_bytes(b"\0")
    timeout_s = 60.0 + args.mib  # even at 1 MB/s a run this long has hung
    lines: list[str] = []
    try:
        start_server(side, args, certs, tmp)
        progress(f"server {side.address}")
        peers = make_peers(side, certs, grpcio)
        samples = bench(args, side, peers, big, tiny, timeout_s)
        lines += report(args, peers, samples, size)
        if args.profile:
            lines += ["", profile_jobctl(args, side, peers, big, tmp, timeout_s)]
    finally:
        stop_server(side)
    summary = server_summary(tmp)
    if summary:
        lines += ["", f"Server: {summary}"]
    return [*lines, ""]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jobctl run -i against a local pipe and a grpcio client.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mib", type=int, default=256, help="the input's size, in MiB")
    p.add_argument("--runs", type=int, default=5, help="rounds counted (median)")
    p.add_argument("--warmup", type=int, default=1, help="rounds not counted")
    p.add_argument("--quick", action="store_true", help="--mib 16 --runs 3 --warmup 0")
    p.add_argument(
        "--isolation",
        choices=("auto", "on", "off"),
        default="auto",
        help="the server's --isolation (auto: on as root)",
    )
    p.add_argument(
        "--cgroups",
        choices=("auto", "v2", "v1", "off"),
        default="auto",
        help="the server's --cgroups",
    )
    p.add_argument(
        "--cpu",
        default=str(os.cpu_count() or 1),
        help="the jobs' CPU limit (default: every CPU, so wc is never throttled)",
    )
    p.add_argument("--memory", default="1G", help="the jobs' memory limit")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="also run jobctl once under cProfile, its stats written here",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.runs, args.warmup = 16, 3, 0
    if min(args.runs, args.mib) < 1 or args.warmup < 0:
        p.error("--runs and --mib must be at least 1, --warmup at least 0")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def header() -> list[str]:
        return [
            "# jobctl run -i bench",
            env_header(),
            f"input {args.mib} MiB x {args.runs} rounds (+{args.warmup} warm-up); server isolation"
            f" {args.isolation}, cgroups {args.cgroups}, job limits cpu {args.cpu} memory"
            f" {args.memory}; uid {os.geteuid()}; loopback, mutual TLS 1.3; {platform.node()}",
        ]

    return run_and_report(
        "bench-stdin-",
        lambda tmp: run_bench(args, tmp),
        header,
        (BenchError, subprocess.CalledProcessError, subprocess.TimeoutExpired),
    )


if __name__ == "__main__":
    sys.exit(main())
