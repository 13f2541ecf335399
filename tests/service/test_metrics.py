"""Metrics of a real server (real jobs, cgroups, mutual TLS), scraped over real HTTP and parsed
with prometheus_client's own parser: each value follows from what the test did."""

from __future__ import annotations

import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from jobworker.purgatory import GrpcError, Status
from jobworker.service.metrics import MAX_REQUEST_HEAD_BYTES, MAX_WAITING_HEADS
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import PYTHON, Certs, fifo, release
from .observing import Observed, get, observed_server, per_job, rpcs, value

pytestmark = pytest.mark.cgroups
MiB = 2**20


@pytest.fixture
async def observed(tmp_path: Path, certs: Certs) -> AsyncIterator[Observed]:
    async with observed_server(tmp_path, certs) as observed:
        yield observed


async def test_a_running_job_is_counted_and_measured_until_it_ends(observed, shared_path):
    alice = observed.client("alice")
    go = fifo(shared_path)
    job_id = await alice.start("cat", str(go))
    before = await observed.scrape()
    assert value(before, "jobworker_jobs_started_total") == 1
    assert value(before, "jobworker_jobs_running") == 1
    assert per_job(before, "jobworker_job_cpu_seconds_total").keys() == {job_id}
    memory = per_job(before, "jobworker_job_memory_bytes")
    assert memory.keys() == {job_id} and memory[job_id] > 0
    owners = {dict(k[1])["owner"] for k in before if k[0] == "jobworker_job_memory_bytes"}
    assert owners == {"alice"}
    assert value(before, "jobworker_connections_open") == 3  # alice, bob, nameless
    assert value(before, "jobworker_jobs_ended_total", state="finished") == 0

    await release(go)
    assert (await alice.wait_ended(job_id)).state == pb.JOB_STATE_FINISHED
    after = await observed.scrape()
    assert value(after, "jobworker_jobs_running") == 0
    assert value(after, "jobworker_jobs_ended_total", state="finished") == 1
    # The job's own series end with it: the label set is what runs, not what ran.
    assert per_job(after, "jobworker_job_cpu_seconds_total") == {}
    assert per_job(after, "jobworker_job_memory_bytes") == {}


async def test_rpcs_are_counted_by_method_and_code_with_their_latency(observed):
    alice = observed.client("alice")
    missing = "00000000-0000-4000-8000-000000000000"
    for _ in range(2):
        with pytest.raises(GrpcError) as caught:
            await alice.status(missing)
        assert caught.value.status is Status.NOT_FOUND
    with pytest.raises(GrpcError) as denied:
        await alice.list(all=True)  # every user's jobs: not for a plain user
    assert denied.value.status is Status.PERMISSION_DENIED
    with pytest.raises(GrpcError) as unknown:
        await alice.channel.unary(
            "/jobworker.v1.JobService/Nope", pb.ListJobsRequest(), pb.ListJobsResponse
        )
    assert unknown.value.status is Status.UNIMPLEMENTED
    with pytest.raises(GrpcError) as unauthenticated:  # a certificate without a CN
        await observed.client("nameless").list()
    assert unauthenticated.value.status is Status.UNAUTHENTICATED
    with pytest.raises(GrpcError) as oversized:  # answered by the wire, before any handler
        await alice.channel.unary(
            "/jobworker.v1.JobService/ListJobs",
            pb.ListJobsRequest(),
            pb.ListJobsResponse,
            metadata=(("x-padding", "x" * 20_000),),
        )
    assert oversized.value.status is Status.RESOURCE_EXHAUSTED

    samples = await observed.scrape()
    assert rpcs(samples, "GetJobStatus", "NOT_FOUND") == 2
    assert rpcs(samples, "GetJobStatus", "OK") == 0
    assert rpcs(samples, "ListJobs", "PERMISSION_DENIED") == 1
    assert rpcs(samples, "ListJobs", "UNAUTHENTICATED") == 1
    assert rpcs(samples, "ListJobs", "RESOURCE_EXHAUSTED") == 1
    labels = dict(grpc_service="unknown", grpc_method="unknown", grpc_type="unknown")
    assert value(samples, "grpc_server_handled_total", grpc_code="UNIMPLEMENTED", **labels) == 1
    status_labels = dict(
        grpc_service="jobworker.v1.JobService", grpc_method="GetJobStatus", grpc_type="unary"
    )
    assert value(samples, "grpc_server_handling_seconds_count", **status_labels) == 2
    assert value(samples, "grpc_server_handling_seconds_bucket", le="+Inf", **status_labels) == 2


async def test_output_written_and_streamed_are_counted_in_bytes(observed):
    alice = observed.client("alice")
    job_id = await alice.start(PYTHON, "-c", "import sys; sys.stdout.write('x' * 1000)")
    await alice.wait_ended(job_id)
    samples = await observed.scrape()
    assert value(samples, "jobworker_output_bytes_total") == 1000
    assert value(samples, "jobworker_output_streamed_bytes_total") == 0
    chunks = await alice.logs(job_id)
    assert sum(len(c.data) for c in chunks) == 1000
    await alice.logs(job_id, offset=900)
    samples = await observed.scrape()
    assert value(samples, "jobworker_output_streamed_bytes_total") == 1100
    assert rpcs(samples, "GetJobLogs", "OK") == 3  # wait_ended follows the job too


async def test_oom_kills_and_pids_limit_hits_are_counted(observed):
    alice = observed.client("alice")
    hog = await alice.start(
        PYTHON,
        "-c",
        "chunks = [b'\\x01' * (8 << 20) for _ in range(64)]",
        limits=pb.Limits(memory_bytes=64 * MiB),
    )
    forker = await alice.start(
        PYTHON,
        "-c",
        textwrap.dedent("""
            import os, signal
            try:
                for _ in range(100):
                    if os.fork() == 0:
                        signal.pause()
            except BlockingIOError:
                pass
        """),
        limits=pb.Limits(pids=16),
    )
    assert (await alice.wait_ended(hog)).oom_killed
    assert (await alice.wait_ended(forker)).pids_limit_hit
    samples = await observed.scrape()
    assert value(samples, "jobworker_jobs_oom_killed_total") == 1
    assert value(samples, "jobworker_jobs_pids_limit_hit_total") == 1
    assert value(samples, "jobworker_jobs_ended_total", state="failed") == 1  # the OOM kill
    assert value(samples, "jobworker_jobs_ended_total", state="finished") == 1
    assert value(samples, "jobworker_jobs_started_total") == 2


async def test_two_servers_in_one_process_keep_their_own_figures(observed, tmp_path, certs):
    async with observed_server(tmp_path / "second", certs) as second:
        await observed.client("alice").list()
        first_samples, second_samples = await observed.scrape(), await second.scrape()
    assert rpcs(first_samples, "ListJobs", "OK") == 1
    assert rpcs(second_samples, "ListJobs", "OK") == 0


async def test_the_responder_answers_only_get_metrics(observed):
    base = observed.url.removesuffix("/metrics")
    for method, path, code in [("GET", "/", 404), ("POST", "/metrics", 405)]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            body = b"" if method == "POST" else None
            await trio.to_thread.run_sync(get, base + path, method, body)
        assert caught.value.code == code
    # A request head beyond the budget is answered 431 and closed, not buffered on. (Only a
    # little beyond: the server reads all of it, so its close is no reset that could take the
    # answer with it.)
    host, port = base.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_HEAD_BYTES)
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some():
                answer += data
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_clients_that_never_finish_their_request_cannot_shut_the_scraper_out(observed):
    """A slowloris: more connections than the responder lets wait, each sending half a request
    head and then nothing. Every one of them is dropped in turn, and a scrape still answers."""
    host, port = observed.url.removeprefix("http://").removesuffix("/metrics").split(":")
    idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(MAX_WAITING_HEADS + 8)]
    try:
        for stream in idle:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and no blank line, ever
        samples = await trio.to_thread.run_sync(get, observed.url)
        assert "jobworker_jobs_running" in samples
        # the oldest were dropped to make room: they read EOF (or a reset), not an answer
        with trio.fail_after(10):
            for stream in idle[:8]:
                try:
                    assert await stream.receive_some() == b""
                except trio.BrokenResourceError:
                    pass
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)
