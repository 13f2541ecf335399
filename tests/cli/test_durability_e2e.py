"""What a server showed survives its restarts and crashes: real `jobworker serve` processes
killed with SIGKILL or stopped with SIGTERM, restarted on the same data directory, and asked
again (with jobctl, and with grpcio for offsets).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Jobctl, Server, start_server
from .test_grpcio_e2e import SERVICE, channel_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real cgroups need root")

TICKS = "i=0; while :; do i=$((i+1)); echo tick $i; echo tock $i >&2; sleep 0.05; done"
# The same, outliving its output's reader: a job writing to a dead server's pipes would die of
# SIGPIPE on its next tick (50 ms), racing a test that wants it to be an orphan.
DEAF_TICKS = "trap '' PIPE; " + TICKS


# One chunk of a job's output: (stream, offset, data, bytes lost).
Chunk = tuple[int, int, bytes, int]


@contextlib.contextmanager
def stopped_on_failure(server: Server):
    """The part of a test before its planned crash or stop: a failure there must not leave the
    server (and its jobs) running."""
    try:
        yield server
    except BaseException:
        server.terminate()
        raise


def subtree_of_job(jobctl: Jobctl, job_id: str) -> str:
    """The server's cgroup subtree (jobworker-XXXX) the running job sits in."""
    [subtree] = subtrees_of(json.loads(jobctl.ok("status", job_id, "--json"))["pid"])
    return subtree


def dirs_named(name: str) -> list[str]:
    return [top for top, _, _ in os.walk("/sys/fs/cgroup") if os.path.basename(top) == name]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != b"Z"


def crash(server: Server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server.terminate()  # closes its pipes (nothing to kill any more)


def logs_with_offsets(
    certs: Path, server: Server, job_id: str
) -> list[tuple[int, int, bytes, int]]:
    """(stream, offset, data, lost) of every chunk of a job's output, from offset 0."""
    with channel_as("alice", certs, server) as channel:
        logs = channel.unary_stream(
            SERVICE + "GetJobLogs",
            request_serializer=pb.GetJobLogsRequest.SerializeToString,
            response_deserializer=pb.GetJobLogsResponse.FromString,
        )
        chunks = logs(pb.GetJobLogsRequest(job_id=job_id), timeout=20)
        return [(c.stream, c.offset, c.data, c.lost) for c in chunks]


def per_offset(chunks: list[Chunk]) -> list[tuple[int, int, int | None]]:
    """One entry per offset, so that chunk boundaries do not matter."""
    out: list[tuple[int, int, int | None]] = []
    for stream, offset, data, lost in chunks:
        assert offset == (out[-1][1] + 1 if out else 0)  # contiguous
        out += [(stream, offset + i, None) for i in range(lost)]
        out += [(stream, offset + i, b) for i, b in enumerate(data)]
    return out


def test_after_a_crash_jobs_are_lost_not_forgotten_and_nothing_is_left(
    certs_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(certs_dir, "--data-dir", str(data))
    with stopped_on_failure(server):
        jobctl = Jobctl(certs_dir, server.address)
        ended = jobctl.start("echo", "done before the crash")
        jobctl.wait_ended(ended)
        running = [jobctl.start("sh", "-c", TICKS) for _ in range(5)]
        for job_id in running:
            jobctl.first_line(job_id)
        subtree = subtree_of_job(jobctl, running[0])
        pids = [json.loads(jobctl.ok("status", j, "--json"))["pid"] for j in running]
    crash(server)

    server = start_server(certs_dir, "--data-dir", str(data))
    try:
        jobctl = Jobctl(certs_dir, server.address)
        assert "recovered after a crash: 5 job(s) lost" in server.wait_for_log("recovered")
        listed = {j["job_id"]: j for j in json.loads(jobctl.ok("list", "--json"))["jobs"]}
        assert set(listed) == {ended, *running}
        assert listed[ended]["state"] == "JOB_STATE_FINISHED"  # as it was
        for job_id in running:
            job = listed[job_id]
            assert (job["state"], job["error"]) == (
                "JOB_STATE_FAILED",
                "lost: the server stopped while it ran",
            )
            assert "exit_code" not in job  # unknown, so not made up
            done = jobctl("logs", job_id)
            assert done.returncode == 0
            assert done.stdout.startswith(b"tick 1\n")  # its output up to the crash
            assert done.stderr.startswith(b"tock 1\n")
        status = jobctl.ok("status", running[0])
        assert "Reason:      lost: the server stopped while it ran" in status
        assert not [p for p in pids if alive(p)]
        assert dirs_named(subtree) == []  # every group it had, gone
    finally:
        assert server.terminate() == 0, server.stderr()


def test_unisolated_orphans_of_a_crash_are_killed_at_restart(
    certs_dir: Path, tmp_path: Path
) -> None:
    # Without isolation, jobs outlive a killed server (nothing ties them to it): the next
    # server finds them through its records, kills them and removes their groups.
    data = tmp_path / "data"
    server = start_server(certs_dir, "--data-dir", str(data), "--isolation", "off")
    with stopped_on_failure(server):
        jobctl = Jobctl(certs_dir, server.address)
        job_id = jobctl.start("sh", "-c", DEAF_TICKS)
        jobctl.first_line(job_id)
        pid = json.loads(jobctl.ok("status", job_id, "--json"))["pid"]
        subtree = subtree_of_job(jobctl, job_id)
    crash(server)
    assert alive(pid)  # an orphan now

    server = start_server(certs_dir, "--data-dir", str(data), "--isolation", "off")
    try:
        server.wait_for_log("recovered after a crash: 1 job(s) lost")
        assert not alive(pid)
        assert dirs_named(subtree) == []
    finally:
        assert server.terminate() == 0, server.stderr()


def test_a_clean_restart_keeps_every_ended_job_byte_exact(certs_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(certs_dir, "--data-dir", str(data))
    with stopped_on_failure(server):
        jobctl = Jobctl(certs_dir, server.address)
        script = "head -c 300000 /dev/urandom; head -c 70000 /dev/urandom >&2; echo end; exit 7"
        jobs = [jobctl.start("sh", "-c", script) for _ in range(3)]
        for job_id in jobs:
            jobctl.wait_ended(job_id)
        before = {job_id: logs_with_offsets(certs_dir, server, job_id) for job_id in jobs}
        statuses = {job_id: json.loads(jobctl.ok("status", job_id, "--json")) for job_id in jobs}
    assert server.terminate() == 0  # SIGTERM: a clean stop

    server = start_server(certs_dir, "--data-dir", str(data))
    try:
        jobctl = Jobctl(certs_dir, server.address)
        for job_id in jobs:
            after = logs_with_offsets(certs_dir, server, job_id)
            assert per_offset(after) == per_offset(before[job_id])
            assert sum(len(d) for s, _, d, _ in after if s == pb.LOG_STREAM_STDERR) == 70000
            assert json.loads(jobctl.ok("status", job_id, "--json")) == statuses[job_id]
    finally:
        assert server.terminate() == 0, server.stderr()


def test_crashes_at_random_moments_leave_a_consistent_store(
    certs_dir: Path, tmp_path: Path
) -> None:
    # A bounded loop: a server, a few starts, a stop and output, SIGKILL at a random moment
    # (calls still in flight), a restart. Each time the store opens, every record is in a
    # valid state, every recorded output is readable, and nothing of the earlier runs is left.
    rng = random.Random(20261205)
    data = tmp_path / "data"
    subtrees: set[str] = set()
    pids: set[int] = set()
    answered = 0
    iterations = 30
    for _ in range(iterations):
        server = start_server(certs_dir, "--data-dir", str(data), "--grace-period", "1s")
        with stopped_on_failure(server), channel_as("alice", certs_dir, server) as channel:
            api = Api(channel)
            check_consistent(api)
            for _ in range(rng.randrange(1, 4)):
                job_id = api.start(pb.StartJobRequest(command="sh", args=["-c", TICKS]))
                answered += 1
                status = api.status(job_id)
                pids.add(status.pid)
                subtrees.update(subtrees_of(status.pid))
            if rng.random() < 0.5:
                api.stop_in_flight(job_id)
            # The crash, at a moment nobody chose: mid-stop, mid-output, mid-write.
            try:
                server.process.wait(rng.uniform(0, 0.3))
            except subprocess.TimeoutExpired:
                pass
            crash(server)
    server = start_server(certs_dir, "--data-dir", str(data))
    try:
        with channel_as("alice", certs_dir, server) as channel:
            jobs = check_consistent(Api(channel))
        assert len(jobs) == answered  # every start the server answered is recorded
        assert all(j.state != pb.JOB_STATE_RUNNING for j in jobs)
    finally:
        assert server.terminate() == 0, server.stderr()
    assert not [p for p in pids if alive(p)]
    assert not [s for s in subtrees if dirs_named(s)]


class Api:
    """The calls the crash loop makes, over one grpcio channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        def unary(name: str, request_type, response_type):
            return channel.unary_unary(
                SERVICE + name,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )

        self._start = unary("StartJob", pb.StartJobRequest, pb.StartJobResponse)
        self._status = unary("GetJobStatus", pb.GetJobStatusRequest, pb.GetJobStatusResponse)
        self._stop = unary("StopJob", pb.StopJobRequest, pb.StopJobResponse)
        self._list = unary("ListJobs", pb.ListJobsRequest, pb.ListJobsResponse)
        self._logs = channel.unary_stream(
            SERVICE + "GetJobLogs",
            request_serializer=pb.GetJobLogsRequest.SerializeToString,
            response_deserializer=pb.GetJobLogsResponse.FromString,
        )

    def start(self, request: pb.StartJobRequest) -> str:
        return self._start(request, timeout=20).job_id

    def status(self, job_id: str) -> pb.JobStatus:
        return self._status(pb.GetJobStatusRequest(job_id=job_id), timeout=20).status

    def stop_in_flight(self, job_id: str) -> None:
        self._stop.future(pb.StopJobRequest(job_id=job_id), timeout=20)  # not waited for

    def jobs(self) -> list[pb.JobStatus]:
        jobs, token = [], ""
        while True:
            page = self._list(pb.ListJobsRequest(page_token=token, page_size=50), timeout=20)
            jobs += page.jobs
            if not page.next_page_token:
                return jobs
            token = page.next_page_token

    def logs(self, job_id: str) -> list[Chunk]:
        chunks = self._logs(pb.GetJobLogsRequest(job_id=job_id), timeout=20)
        return [(c.stream, c.offset, c.data, c.lost) for c in chunks]


def check_consistent(api: Api) -> list[pb.JobStatus]:
    jobs = api.jobs()
    for job in jobs:
        assert job.state in (
            pb.JOB_STATE_FINISHED, pb.JOB_STATE_FAILED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_ERROR
        )  # fmt: skip
        if job.state == pb.JOB_STATE_FAILED and job.error.startswith("lost"):
            assert not job.HasField("exit_code")
        per_offset(api.logs(job.job_id))  # readable, and contiguous from 0
    return jobs


def subtrees_of(pid: int) -> set[str]:
    names = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        for part in line.split(":", 2)[2].split("/"):
            if part.startswith("jobworker-") and part != "jobworker-supervisor":
                names.add(part)
    return names


def test_the_data_directory_serves_one_server_at_a_time(certs_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(certs_dir, "--data-dir", str(data))
    try:
        from .conftest import JOBWORKER, run, tls_flags

        done = run([*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs_dir),
                    "--data-dir", str(data)])  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.decode() == (
            f"jobworker: the data directory {data} is in use by another jobworker serve "
            f"(pid {server.process.pid})\n"
        )
    finally:
        assert server.terminate() == 0


def test_grpcio_sees_paging_rm_and_prune(certs_dir: Path, tmp_path: Path) -> None:
    server = start_server(certs_dir, "--data-dir", str(tmp_path / "data"))
    try:
        jobctl = Jobctl(certs_dir, server.address)
        jobs = [jobctl.start("true") for _ in range(7)]
        for job_id in jobs:
            jobctl.wait_ended(job_id)
        running = jobctl.start("sleep", "600")
        # jobctl pages through transparently; -n, -q, --state.
        assert jobctl.ok("list", "-q").split() == [*jobs, running]
        assert jobctl.ok("ls", "-q", "-n", "3").split() == [jobs[-2], jobs[-1], running]
        assert jobctl.ok("ps", "-q", "--state", "running").split() == [running]
        with channel_as("alice", certs_dir, server) as channel:
            page = channel.unary_unary(
                SERVICE + "ListJobs",
                request_serializer=pb.ListJobsRequest.SerializeToString,
                response_deserializer=pb.ListJobsResponse.FromString,
            )
            first = page(pb.ListJobsRequest(page_size=3), timeout=20)
            assert [j.job_id for j in first.jobs] == jobs[:3] and first.next_page_token
            second = page(pb.ListJobsRequest(page_size=3, page_token=first.next_page_token))
            assert [j.job_id for j in second.jobs] == jobs[3:6]
            with pytest.raises(grpc.RpcError) as err:  # a token made for another query
                page(pb.ListJobsRequest(page_size=3, page_token=first.next_page_token,
                                        states=[pb.JOB_STATE_RUNNING]))  # fmt: skip
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # rm: ended jobs go (record and output); a running one is refused unless forced.
        assert jobctl.ok("rm", jobs[0], jobs[1]).split() == [jobs[0], jobs[1]]
        assert jobctl("status", jobs[0]).returncode == 1
        assert not (tmp_path / "data" / "jobs" / jobs[0]).exists()
        refused = jobctl("rm", running)
        assert refused.returncode == 1
        assert b"is still running: stop it first" in refused.stderr
        assert jobctl("rm", jobs[2], user="bob").returncode == 1  # not bob's: not found
        assert jobctl.ok("rm", "--force", running).split() == [running]
        # prune: the rest of alice's ended jobs.
        assert sorted(jobctl.ok("prune").split()) == sorted(jobs[2:])
        assert jobctl.ok("list", "-q") == ""
    finally:
        assert server.terminate() == 0, server.stderr()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A filesystem of 8 MiB, for a data directory that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_never_silent(certs_dir: Path, small_disk: Path) -> None:
    data = small_disk / "data"
    # Room the "operator" frees at the end. Without it, freeing the filler below returns only
    # the slack the writer happened to leave, sometimes too little for the next job's record.
    reserve = small_disk / "reserve"
    reserve.write_bytes(bytes(2**20))
    server = start_server(certs_dir, "--data-dir", str(data))
    try:
        jobctl = Jobctl(certs_dir, server.address)
        # 20 MiB into an 8 MiB disk: the job runs on and ends; its output has a gap, said.
        writer = jobctl.start("sh", "-c", "head -c 20971520 /dev/zero; echo; echo end")
        jobctl.wait_ended(writer)
        status = json.loads(jobctl.ok("status", writer, "--json"))
        assert status["state"] == "JOB_STATE_FINISHED"  # the job itself never noticed
        assert int(status["output_lost_bytes"]) > 10 * 2**20
        assert "output incomplete: disk full" in jobctl.ok("status", writer)
        done = jobctl("logs", writer)
        assert done.returncode == 0
        assert b"bytes of the job's stdout lost here (the server's disk was full)" in done.stderr
        assert len(done.stdout) + int(status["output_lost_bytes"]) == 20 * 2**20 + 5
        losses = [line for line in server.stderr().splitlines() if "output incomplete" in line]
        assert len(losses) == 1 and writer in losses[0]  # once per job, not per chunk

        # Completely full: a job the server cannot record or prepare is refused, not started.
        filler = small_disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        refused = jobctl("run", "--", "echo", "x")
        assert refused.returncode == 2 and refused.stdout == b""
        assert b"so it does not start it; try again later" in refused.stderr
        filler.unlink()
        reserve.unlink()
        assert jobctl("run", "--", "echo", "x").stdout == b"x\n"  # room again: it works
    finally:
        assert server.terminate() == 0, server.stderr()
