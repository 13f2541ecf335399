"""Bounded state: ended jobs go after their time or beyond their count, and the output of
every job together stays within its budget, the oldest first, always said."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobworker.purgatory import GrpcError, Status
from jobworker.service import Identity, Retention, open_job_service, open_store
from jobworker.supervisor import Supervisor
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import answered

pytestmark = pytest.mark.cgroups

KiB = 2**10


@dataclass
class Call:
    identity: Identity | None
    peer_certificate: None = None


ALICE = Call(Identity("alice"))


async def run_to_end(service, request: pb.StartJobRequest) -> str:
    """Start a job; return once it has ended and the store has recorded its end."""
    job_id = (await service.start_job(request, ALICE)).job_id
    await service.recorded(job_id)
    return job_id


async def listed(service) -> list[str]:
    reply = await service.list_jobs(pb.ListJobsRequest(page_size=1000), ALICE)
    return [job.job_id for job in reply.jobs]


async def test_beyond_their_count_the_oldest_ended_jobs_go_record_and_output(
    tmp_path: Path,
) -> None:
    retention = Retention(keep_jobs=3)
    async with (
        Supervisor(data_dir=tmp_path / "data") as supervisor,
        open_job_service(supervisor, retention=retention) as service,
    ):
        running = (
            await service.start_job(pb.StartJobRequest(command="sleep", args=["60"]), ALICE)
        ).job_id
        ended = [await run_to_end(service, pb.StartJobRequest(command="true")) for _ in range(5)]
        await service.tidy()
        assert await listed(service) == [running, *ended[2:]]  # running jobs never count
        for job_id in ended[:2]:
            assert not (supervisor.data_dir / "jobs" / job_id).exists()
            with pytest.raises(GrpcError) as caught:
                await answered(service.get_job_status(pb.GetJobStatusRequest(job_id=job_id), ALICE))
            assert caught.value.status is Status.NOT_FOUND


async def test_past_their_time_ended_jobs_go(tmp_path: Path) -> None:
    now = [1_000_000.0]  # the service's clock: when it saw jobs end, what retention compares
    retention = Retention(keep_s=3600)
    async with (
        Supervisor(data_dir=tmp_path / "data") as supervisor,
        open_job_service(supervisor, retention=retention, clock=lambda: now[0]) as service,
    ):
        old = await run_to_end(service, pb.StartJobRequest(command="true"))
        now[0] += 3000
        new = await run_to_end(service, pb.StartJobRequest(command="true"))
        await service.tidy()
        assert await listed(service) == [old, new]  # 3000 s: both within the hour
        now[0] += 1000
        await service.tidy()
        assert await listed(service) == [new]  # 4000 s for the old one: gone


async def test_over_the_output_budget_the_oldest_ended_output_goes_first_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.events")
    retention = Retention(output_budget_bytes=600 * KiB)
    write = pb.StartJobRequest(command="head", args=["-c", str(256 * KiB), "/dev/zero"])
    store = await open_store(tmp_path / "jobs.db")
    async with (
        Supervisor(data_dir=tmp_path / "data") as supervisor,
        open_job_service(supervisor, store=store, retention=retention) as service,
    ):
        jobs = [await run_to_end(service, write) for _ in range(3)]
        await service.tidy()
        request = pb.GetJobStatusRequest(job_id=jobs[0])
        oldest = (await service.get_job_status(request, ALICE)).status
        assert oldest.output_removed  # its record stays, and says so
        assert not (supervisor.data_dir / "jobs" / jobs[0]).exists()
        for job_id in jobs[1:]:  # 2 x 256 KiB fit in 600 KiB
            request = pb.GetJobStatusRequest(job_id=job_id)
            status = (await service.get_job_status(request, ALICE)).status
            assert not status.output_removed
        # A reader of the removed output is told how much is gone, never given silence.
        sink = _Sink()
        await answered(service.get_job_logs(pb.GetJobLogsRequest(job_id=jobs[0]), sink))
        assert sink.chunks == [pb.GetJobLogsResponse(offset=0, dropped=256 * KiB)]
    await store.aclose()
    assert any(
        r.getMessage().startswith("output removed ") and f"job={jobs[0]}" in r.getMessage()
        for r in caplog.records
    )


async def test_over_the_budget_with_nothing_ended_running_jobs_lose_their_oldest_output(
    tmp_path: Path,
) -> None:
    retention = Retention(output_budget_bytes=256 * KiB)
    async with (
        Supervisor(data_dir=tmp_path / "data", retention_bytes=4 * 2**20) as supervisor,
        open_job_service(supervisor, retention=retention) as service,
    ):
        # 1 MiB written, then it waits: its output is kept (retention 4 MiB) until the budget.
        script = f"head -c {2**20} /dev/zero; echo written >&2; sleep 60"
        job_id = (
            await service.start_job(pb.StartJobRequest(command="sh", args=["-c", script]), ALICE)
        ).job_id
        job = supervisor.get(job_id)
        async for chunk in job.output(follow=True):
            if chunk.data.endswith(b"written\n"):
                break
        await service.tidy()
        assert job.output_stored_bytes <= 512 * KiB  # whole segments dropped, the newest kept
        sink = _Sink()
        await answered(service.get_job_logs(pb.GetJobLogsRequest(job_id=job_id), sink))
        first, second = sink.chunks[:2]  # readers are told, as by retention, and go on
        assert (first.offset, first.data) == (0, b"") and first.dropped >= 512 * KiB
        assert second.offset == first.dropped
        await job.stop(0)


class _Sink:
    """A ServerCall that keeps the log chunks a handler sends."""

    identity = Identity("alice")
    peer_certificate = None

    def __init__(self) -> None:
        self.chunks: list[pb.GetJobLogsResponse] = []

    async def send_serialized(self, payload: bytes) -> None:
        self.chunks.append(pb.GetJobLogsResponse.FromString(payload))
