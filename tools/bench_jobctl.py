#!/usr/bin/env python3
"""Benchmark what a user waits for with jobctl, side by side in one run: its start-up against a
minimal grpcio client and ``python -c pass``, and ``jobctl logs`` against ``cat`` over a pipe,
the same grpcio client and raw TLS.

Absolute times on a shared 2-core machine drift; every figure runs its peers alternating, round
by round in a rotated order, and the report gives medians and ratios.

Each *side* is a checkout run from its own files: ``tree`` (this one, uncommitted changes
included) and, with ``--baseline REV``, that revision (``git archive`` into a temporary
directory). A side runs its own ``jobworker serve`` (cgroups and isolation off: the transport is
measured, not the cage) and its own ``jobctl``, both through a launcher made from that side's
``[project.scripts]`` exactly as pip writes console scripts. All share one set of certificates
from ``jobworker certs init``. Byte-compiled caches are written on the warm-up runs (children
run without PYTHONDONTWRITEBYTECODE), as an installed package has them.

1. Start-up, --runs rounds after --warmup: ``python -c pass``; the grpcio client (C-core and
   BoringSSL, ``grpc.secure_channel`` with the user's files, one GetJobStatus; a script of its own
   importing the messages from this checkout); then for each side ``jobctl --version``,
   ``jobctl status ID`` and ``jobctl list``. Wall (fork to exit) and the child's CPU (user + sys),
   medians; ratios to the grpcio client.
2. Logs of a --log-mb MB history (a finished job's ``head -c``), --log-runs rounds: ``jobctl logs
   ID > /dev/null`` for each side; the grpcio client writing every chunk to stdout (/dev/null);
   ``cat FILE | cat > /dev/null`` over the same number of bytes in a file; and the raw TLS limit
   of tools/bench_purgatory.py (a pyOpenSSL sender on a blocking socket, 64 KiB writes, to a
   Python ``ssl`` receiver in this process). Each program is also run on a 1-byte history, and
   MB/s = (bytes - 1) / (t(big) - t(1 byte)), medians: the start-up, connection and exit cancel
   out, what is left is the stream. Client and server CPU per GB likewise. Once per reader the
   bytes are counted through a pipe to check the stream is whole.

Leaves nothing behind (checked at the end): the servers are stopped (SIGTERM, then SIGKILL), the
temporary directory (certificates, data directories, the baseline tree) removed.

    .venv/bin/python tools/bench_jobctl.py [--runs 20] [--log-mb 200] [--log-runs 5]
                                           [--baseline REV]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Run the checkout this file is in, whatever the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import progress, rotated, run_and_report  # tools/benchlib.py

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
ROOT = Path(__file__).resolve().parents[1]

PYTHON = sys.executable
LISTENING = re.compile(rb"^jobworker: listening on (\S+):(\d+)$")
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 120.0
MB = 10**6

# What every minimal grpcio client script starts with: the user's files, as jobctl reads them.
GRPCIO_PREAMBLE = """\
import os, sys
sys.path.insert(0, {root!r})
import grpc
from jobworker.v1 import jobworker_pb2 as pb

def read(name):
    with open(os.environ[name], "rb") as f:
        return f.read()

credentials = grpc.ssl_channel_credentials(
    root_certificates=read("JOBCTL_CA"),
    private_key=read("JOBCTL_KEY"),
    certificate_chain=read("JOBCTL_CERT"),
)
"""

# The minimal grpcio client, a script of its own so that it imports nothing else: what a user
# writing a gRPC client in Python would run. `status ID` prints one line; `logs ID` writes each
# chunk's bytes to stdout.
GRPCIO_CLIENT = (
    GRPCIO_PREAMBLE
    + """\
service = "/jobworker.v1.JobService/"
with grpc.secure_channel(os.environ["JOBCTL_SERVER"], credentials) as channel:
    if sys.argv[1] == "status":
        call = channel.unary_unary(
            service + "GetJobStatus",
            request_serializer=pb.GetJobStatusRequest.SerializeToString,
            response_deserializer=pb.GetJobStatusResponse.FromString,
        )
        job = call(pb.GetJobStatusRequest(job_id=sys.argv[2]), timeout=15).status
        print(job.job_id, pb.JobState.Name(job.state))
    else:
        call = channel.unary_stream(
            service + "GetJobLogs",
            request_serializer=pb.GetJobLogsRequest.SerializeToString,
            response_deserializer=pb.GetJobLogsResponse.FromString,
        )
        write = sys.stdout.buffer.write
        for chunk in call(pb.GetJobLogsRequest(job_id=sys.argv[2])):
            write(chunk.data)
"""
)

# pip's console-script launcher, with the side's checkout first on the path.
LAUNCHER = """\
#!{python}
import sys
sys.path.insert(0, {root!r})
from {module} import {function}
if __name__ == "__main__":
    sys.exit({function}())
"""


class BenchError(Exception):
    """Something did not run as it must (a command failed, a stream came short)."""


# =============================================================================================
# Sides: a checkout, its launchers, its server


@dataclass
class Side:
    label: str
    root: Path
    bin_dir: Path
    server: subprocess.Popen | None = None
    address: str = ""
    jobs: dict[str, str] = field(default_factory=dict)  # "big"/"tiny"/"status" -> job id

    @property
    def jobctl(self) -> str:
        return str(self.bin_dir / "jobctl")

    @property
    def jobworker(self) -> str:
        return str(self.bin_dir / "jobworker")

    def server_cpu_s(self) -> float:
        assert self.server is not None
        with open(f"/proc/{self.server.pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_side(label: str, root: Path, tmp: Path) -> Side:
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    bin_dir = tmp / f"bin-{label}"
    bin_dir.mkdir()
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        path = bin_dir / name
        path.write_text(
            LAUNCHER.format(python=PYTHON, root=str(root), module=module, function=function)
        )
        path.chmod(0o755)
    return Side(label, root, bin_dir)


def extract_revision(rev: str, tmp: Path) -> Path:
    """The package as it was at `rev`, in a directory of its own."""
    label = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = tmp / f"tree-{label}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "jobworker", "pyproject.toml"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    cage = ROOT / "jobworker" / "supervisor" / "jobworker-cage"  # built, not in git
    if cage.exists():
        shutil.copy2(cage, tree / "jobworker" / "supervisor" / "jobworker-cage")
    return tree


def child_env(side: Side | None, certs: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its caches
    env.update(
        JOBCTL_CERT=str(certs / "alice" / "client.crt"),
        JOBCTL_KEY=str(certs / "alice" / "client.key"),
        JOBCTL_CA=str(certs / "alice" / "ca.crt"),
    )
    if side is not None:
        env["JOBCTL_SERVER"] = side.address
    return env


def start_server(side: Side, certs: Path, tmp: Path) -> None:
    data = tmp / f"data-{side.label}"
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
            str(data),
            "--cgroups",
            "off",
            "--isolation",
            "off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(None, certs),
        start_new_session=True,  # Ctrl-C reaches the bench only; it stops its servers
    )
    assert side.server.stdout is not None
    line = side.server.stdout.readline().rstrip(b"\n")  # blocks until it listens (or dies)
    match = LISTENING.match(line)
    if match is None:
        raise BenchError(f"{side.label}: the server did not start ({line!r})")
    side.address = f"{match.group(1).decode()}:{int(match.group(2))}"


def stop_server(side: Side) -> None:
    process = side.server
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def running(sides: Sequence[Side], certs: Path, tmp: Path) -> Iterator[None]:
    try:
        for side in sides:
            start_server(side, certs, tmp)
        yield
    finally:
        for side in sides:
            stop_server(side)


# =============================================================================================
# Jobs, through grpcio (any client would do; this one is not under test)


class Api:
    def __init__(self, side: Side, certs: Path) -> None:
        import grpc

        from jobworker.v1 import jobworker_pb2 as pb

        self.pb = pb
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs / "alice" / "ca.crt").read_bytes(),
            private_key=(certs / "alice" / "client.key").read_bytes(),
            certificate_chain=(certs / "alice" / "client.crt").read_bytes(),
        )
        self.channel = grpc.secure_channel(side.address, credentials)

    def _call(self, method: str, request, response_type):
        call = self.channel.unary_unary(
            "/jobworker.v1.JobService/" + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, timeout=30)

    def run_job(self, command: str, *args: str) -> str:
        """Start a job and return its id once it has ended with exit code 0."""
        pb = self.pb
        request = pb.StartJobRequest(command=command, args=list(args))
        job_id = self._call("StartJob", request, pb.StartJobResponse).job_id
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            # ListJobs, whose reply is the same on every tree: a --baseline tree from before the
            # v1 API was settled answers GetJobStatus with a bare JobStatus.
            request = pb.ListJobsRequest(page_size=1000)
            jobs = self._call("ListJobs", request, pb.ListJobsResponse).jobs
            job = next(job for job in jobs if job.job_id == job_id)
            if job.state != pb.JOB_STATE_RUNNING:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"job {command} {args} still running")
            time.sleep(0.05)  # polls: a --baseline tree before WaitJob has no call to wait on
        if job.state != pb.JOB_STATE_FINISHED or job.exit_code != 0:
            raise BenchError(f"job {command} {args} ended {pb.JobState.Name(job.state)}")
        return job_id

    def close(self) -> None:
        self.channel.close()


# =============================================================================================
# Timing one command


@dataclass(frozen=True)
class Command:
    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    side: Side | None = None  # whose server to charge CPU to
    shell: bool = False


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # the child's (and its children's) user + sys
    server_cpu_s: float


def run_once(command: Command) -> Sample:
    before_server = command.side.server_cpu_s() if command.side is not None else 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        command.argv,
        env=command.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        shell=command.shell,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = command.side.server_cpu_s() - before_server if command.side is not None else 0.0
    if done.returncode != 0:
        raise BenchError(
            f"{command.label}: exit {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Sample(wall, cpu, server)


def count_output(command: Command) -> int:
    """Bytes the command writes to a pipe (the check that a stream is whole)."""
    argv = command.argv if not command.shell else ["/bin/sh", "-c", command.argv[0]]
    with subprocess.Popen(argv, env=command.env, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        total = 0
        while chunk := process.stdout.read1(1 << 20):
            total += len(chunk)
    if process.returncode != 0:
        raise BenchError(f"{command.label}: exit {process.returncode}")
    return total


def alternate(
    commands: Sequence[Command], runs: int, warmup: int, note: Callable[[int], None]
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {c.key: [] for c in commands}
    for round_index in range(warmup + runs):
        for command in rotated(commands, round_index):
            sample = run_once(command)
            if round_index >= warmup:
                samples[command.key].append(sample)
        note(round_index)
    return samples


def median(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


# =============================================================================================
# The two figures


def bench_startup(args: argparse.Namespace, sides: list[Side], certs: Path, grpcio: Path):
    tree = sides[0]
    commands = [
        Command("pass", "python -c pass", [PYTHON, "-c", "pass"], child_env(None, certs)),
        Command(
            "grpcio",
            "grpcio client: GetJobStatus",
            [PYTHON, str(grpcio), "status", tree.jobs["status"]],
            child_env(tree, certs),
        ),
    ]
    for side in sides:
        env = child_env(side, certs)
        commands += [
            Command(f"version/{side.label}", "jobctl --version", [side.jobctl, "--version"], env),
            Command(
                f"status/{side.label}",
                "jobctl status ID",
                [side.jobctl, "status", side.jobs["status"]],
                env,
            ),
            Command(f"list/{side.label}", "jobctl list", [side.jobctl, "list"], env),
        ]

    def note(round_index: int) -> None:
        if round_index + 1 == args.warmup or (round_index + 1 - args.warmup) % 5 == 0:
            progress(f"start-up: round {round_index + 1}/{args.warmup + args.runs}")

    return commands, alternate(commands, args.runs, args.warmup, note)


def report_startup(commands: list[Command], samples: dict[str, list[Sample]], sides: list[Side]):
    grpcio = median(samples["grpcio"], "wall_s")
    rows = [("python -c pass", "pass"), ("grpcio client: GetJobStatus", "grpcio")]
    lines = [
        "## Start-up: median wall and CPU (ms) of alternating runs; ratio of wall to the grpcio"
        " client",
        "",
        "| command | " + " | ".join(f"{s.label} wall | cpu | x grpcio" for s in sides) + " |",
        "|---|" + "---:|---:|---:|" * len(sides),
    ]

    def cells(key: str) -> str:
        wall = median(samples[key], "wall_s")
        cpu = median(samples[key], "cpu_s")
        return f"{wall * 1e3:.0f} | {cpu * 1e3:.0f} | {wall / grpcio:.2f}x"

    for label, key in rows:
        lines.append(f"| {label} | {cells(key)} |" + " | | |" * (len(sides) - 1))
    for name, label in (
        ("version", "jobctl --version"),
        ("status", "jobctl status ID"),
        ("list", "jobctl list"),
    ):
        lines.append(f"| {label} | " + " | ".join(cells(f"{name}/{s.label}") for s in sides) + " |")
    tree = sides[0].label
    version = median(samples[f"version/{tree}"], "wall_s")
    status = median(samples[f"status/{tree}"], "wall_s")
    lines += [
        "",
        f"Goals ({tree}): jobctl --version ≤ 60 ms: {version * 1e3:.0f} ms"
        f" ({'met' if version <= 0.060 else 'NOT MET'}); jobctl status ≤ 1.0x the grpcio client:"
        f" {status / grpcio:.2f}x ({'met' if status <= grpcio else 'NOT MET'}).",
    ]
    return lines


@dataclass
class Reader:
    label: str
    big: Command
    tiny: Command
    side: Side | None


def bench_logs(args: argparse.Namespace, sides: list[Side], certs: Path, grpcio: Path, tmp: Path):
    big_bytes = args.log_mb * MB
    big_file, tiny_file = tmp / "big.bin", tmp / "tiny.bin"
    with open(big_file, "wb") as f:
        block = bytes(1 << 20)
        left = big_bytes
        while left:
            left -= f.write(block[: min(left, len(block))])
    tiny_file.write_bytes(b"\0")
    readers = [
        Reader(
            "cat FILE, piped to cat > /dev/null",
            Command("cat/big", "cat", [f"cat {big_file} | cat"], os.environ.copy(), shell=True),
            Command("cat/tiny", "cat", [f"cat {tiny_file} | cat"], os.environ.copy(), shell=True),
            None,
        )
    ]
    tree = sides[0]
    env = child_env(tree, certs)
    readers.append(
        Reader(
            "grpcio client > /dev/null",
            Command(
                "grpcio/big",
                "grpcio logs",
                [PYTHON, str(grpcio), "logs", tree.jobs["big"]],
                env,
                tree,
            ),
            Command(
                "grpcio/tiny",
                "grpcio logs",
                [PYTHON, str(grpcio), "logs", tree.jobs["tiny"]],
                env,
                tree,
            ),
            tree,
        )
    )
    for side in sides:
        env = child_env(side, certs)
        readers.append(
            Reader(
                f"jobctl logs > /dev/null ({side.label})",
                Command(
                    f"jobctl-{side.label}/big",
                    "jobctl logs",
                    [side.jobctl, "logs", side.jobs["big"]],
                    env,
                    side,
                ),
                Command(
                    f"jobctl-{side.label}/tiny",
                    "jobctl logs",
                    [side.jobctl, "logs", side.jobs["tiny"]],
                    env,
                    side,
                ),
                side,
            )
        )
    for reader in readers:
        got = count_output(reader.big)
        if got != big_bytes:
            raise BenchError(f"{reader.label}: {got} bytes of {big_bytes}")
    commands = [c for r in readers for c in (r.big, r.tiny)]

    raw_samples: list[dict] = []
    raw = None
    if not args.no_raw:
        from bench_purgatory import ServerProcess, make_certs, phase_raw_stream

        raw_certs_dir = tmp / "raw-certs"
        raw_certs_dir.mkdir()
        raw_certs = make_certs(raw_certs_dir)
        raw = ServerProcess("raw-tls", raw_certs_dir)

    def note(round_index: int) -> None:
        if raw is not None and round_index >= args.log_warmup:
            raw_samples.append(phase_raw_stream(raw_certs, raw, big_bytes))
        progress(f"logs: round {round_index + 1}/{args.log_warmup + args.log_runs}")

    try:
        samples = alternate(commands, args.log_runs, args.log_warmup, note)
    finally:
        if raw is not None:
            raw.stop()
    return readers, samples, raw_samples


def report_logs(args, readers: list[Reader], samples, raw_samples: list[dict]) -> list[str]:
    stream_bytes = args.log_mb * MB - 1
    gb = stream_bytes / 1e9
    figures: dict[str, dict[str, float]] = {}
    for reader in readers:
        big, tiny = samples[reader.big.key], samples[reader.tiny.key]
        net = median(big, "wall_s") - median(tiny, "wall_s")
        figures[reader.label] = {
            "wall": median(big, "wall_s"),
            "mbps": stream_bytes / net / MB if net > 0 else float("inf"),
            "client": (median(big, "cpu_s") - median(tiny, "cpu_s")) / gb,
            "server": (median(big, "server_cpu_s") - median(tiny, "server_cpu_s")) / gb,
        }
    cat = figures[readers[0].label]["mbps"]
    raw = statistics.median(r["mbps"] for r in raw_samples) if raw_samples else None
    if raw is not None:
        figures["raw TLS 1.3 (bench_purgatory sender → ssl receiver)"] = {
            "wall": float("nan"),
            "mbps": raw,
            "client": float("nan"),
            "server": statistics.median(r["server_cpu_s_per_gb"] for r in raw_samples),
        }
    lines = [
        f"## Logs of a {args.log_mb} MB history: medians of {args.log_runs} alternating runs;"
        " MB/s and CPU-s/GB net of start-up (each program minus its run on a 1-byte history)",
        "",
        "| reader | wall s | MB/s | client CPU-s/GB | server CPU-s/GB | x cat | x raw TLS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, f in figures.items():
        lines.append(
            f"| {label} | {f['wall']:.2f} | {f['mbps']:.0f} | {f['client']:.2f} |"
            f" {f['server']:.2f} | {f['mbps'] / cat:.2f}x |"
            + (f" {f['mbps'] / raw:.2f}x |" if raw else " - |")
        )
    tree = figures[readers[2].label]["mbps"]
    lines += [
        "",
        f"Goal ({readers[2].label}): ≥ 1000 MB/s: {tree:.0f} MB/s"
        f" ({'met' if tree >= 1000 else 'NOT MET'}).",
    ]
    return lines


# =============================================================================================


def env_header() -> str:
    import grpc
    import h2
    import OpenSSL
    import trio

    return (
        f"env: Linux {platform.release()} {platform.machine()} · Python {platform.python_version()}"
        f" · {os.cpu_count()} CPUs · trio {trio.__version__} · h2 {h2.__version__} · pyOpenSSL"
        f" {OpenSSL.__version__} · grpcio {grpc.__version__}"
    )


def run_bench(args: argparse.Namespace, tmp: Path) -> list[str]:
    sides = [make_side("tree", ROOT, tmp)]
    if args.baseline:
        tree = extract_revision(args.baseline, tmp)
        sides.append(make_side(tree.name.removeprefix("tree-"), tree, tmp))
    for side in sides:  # the caches an installed package has
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(side.root / "jobworker")],
                       check=True, stdout=subprocess.DEVNULL, env=child_env(None, tmp))  # fmt: skip
    certs = tmp / "tls"
    subprocess.run(
        [sides[0].jobworker, "certs", "init", str(certs), "--user", "alice"],
        check=True,
        capture_output=True,
        env=child_env(None, certs),
    )
    grpcio = tmp / "grpcio_client.py"
    grpcio.write_text(GRPCIO_CLIENT.format(root=str(ROOT)))
    lines: list[str] = []
    with running(sides, certs, tmp):
        for side in sides:
            api = Api(side, certs)
            try:
                side.jobs["status"] = api.run_job("true")
                side.jobs["tiny"] = api.run_job("printf", "x")
                if "logs" in args.only:
                    side.jobs["big"] = api.run_job("head", "-c", str(args.log_mb * MB), "/dev/zero")
            finally:
                api.close()
        progress(f"servers: {', '.join(f'{s.label} {s.address}' for s in sides)}")
        if "startup" in args.only:
            commands, samples = bench_startup(args, sides, certs, grpcio)
            lines += [*report_startup(commands, samples, sides), ""]
        if "logs" in args.only:
            readers, samples, raw = bench_logs(args, sides, certs, grpcio, tmp)
            lines += [*report_logs(args, readers, samples, raw), ""]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jobctl's start-up and log throughput against grpcio, cat, raw TLS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=20, help="start-up rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="start-up rounds not counted")
    p.add_argument("--log-mb", type=int, default=200, help="the history's size, in MB (10^6 B)")
    p.add_argument("--log-runs", type=int, default=5, help="logs rounds (median)")
    p.add_argument("--log-warmup", type=int, default=1, help="logs rounds not counted")
    p.add_argument("--baseline", metavar="REV", help="also run this revision, side by side")
    p.add_argument("--only", default="startup,logs", help="figures to run")
    p.add_argument("--no-raw", action="store_true", help="skip the raw TLS limit")
    args = p.parse_args(argv)
    args.only = [f for f in args.only.split(",") if f]
    unknown = set(args.only) - {"startup", "logs"}
    if unknown:
        p.error(f"unknown --only: {', '.join(sorted(unknown))}")
    if min(args.runs, args.log_runs, args.log_mb) < 1 or min(args.warmup, args.log_warmup) < 0:
        p.error("--runs, --log-runs and --log-mb must be at least 1, the warm-ups at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def header() -> list[str]:
        return [
            "# jobctl bench",
            env_header(),
            f"sides: tree{f' and {args.baseline}' if args.baseline else ''}; start-up {args.runs}"
            f" rounds (+{args.warmup} warm-up); logs {args.log_mb} MB x {args.log_runs} rounds"
            f" (+{args.log_warmup} warm-up); loopback, mutual TLS 1.3",
        ]

    return run_and_report(
        "bench-jobctl-",
        lambda tmp: run_bench(args, tmp),
        header,
        (BenchError, subprocess.CalledProcessError),
    )


if __name__ == "__main__":
    sys.exit(main())
