"""open_job_service as a resource: what leaving it does, and the running-jobs cap under
concurrent starts. The handlers are called directly here, with the identity a connection
would carry; everything below them (Supervisor, processes, cgroups) is real."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from jobworker.purgatory import GrpcError, Status
from jobworker.service import Identity, open_job_service, open_store
from jobworker.supervisor import Supervisor
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import answered

pytestmark = pytest.mark.cgroups

SLEEP = pb.StartJobRequest(command="sleep", args=["60"])


@dataclass
class Call:
    """What a handler reads of its ServerCall: the connection's identity."""

    identity: Identity | None
    peer_certificate: None = None


ALICE = Call(Identity("alice"))


async def test_leaving_stops_every_job_logs_each_end_and_refuses_new_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.events")
    store = await open_store(tmp_path / "jobs.db")
    async with Supervisor(data_dir=tmp_path, grace_period_s=5) as supervisor:
        async with open_job_service(supervisor, store=store) as service:
            job_id = (await service.start_job(SLEEP, ALICE)).job_id
            assert service.running_jobs == 1
        # Every end was recorded before the service was left.
        record = await store.get(job_id)
        status = pb.JobStatus.FromString(record.status)
        assert status.state == pb.JOB_STATE_STOPPED
        assert status.stop_requested_by == "server shutdown"
        assert service.running_jobs == 0
        assert not service.health.serving
        with pytest.raises(GrpcError) as caught:
            await answered(service.start_job(SLEEP, ALICE))
        assert caught.value.status is Status.UNAVAILABLE
    await store.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "jobworker.events"]
    assert any(
        line.startswith("stop requested ") and 'by="server shutdown"' in line for line in lines
    )
    assert any(
        line.startswith("job ended ") and f"job={job_id}" in line and "state=stopped" in line
        for line in lines
    )


async def test_concurrent_starts_count_each_other_against_the_cap(tmp_path: Path) -> None:
    outcomes: list[str] = []

    async def start(service) -> None:
        try:
            await answered(service.start_job(SLEEP, ALICE))
            outcomes.append("started")
        except GrpcError as exc:
            outcomes.append(exc.status.name)

    async with Supervisor(data_dir=tmp_path, grace_period_s=5) as supervisor:
        async with open_job_service(
            supervisor, max_running_jobs=2, max_running_jobs_per_user=None
        ) as service:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(start, service)
            assert sorted(outcomes) == ["RESOURCE_EXHAUSTED", "started", "started"]
            assert len(supervisor.jobs()) == 2


async def test_the_per_user_caps_default_to_half(tmp_path: Path) -> None:
    async with Supervisor(data_dir=tmp_path) as supervisor:
        async with open_job_service(supervisor, max_running_jobs=4) as service:
            for _ in range(2):
                await service.start_job(SLEEP, ALICE)
            with pytest.raises(GrpcError) as caught:
                await answered(service.start_job(SLEEP, ALICE))
            assert caught.value.status is Status.RESOURCE_EXHAUSTED
            assert "2 jobs running, the most per user" in caught.value.message
            await service.start_job(SLEEP, Call(Identity("bob")))


async def test_a_server_without_identify_still_identifies_each_call(tmp_path: Path) -> None:
    async with Supervisor(data_dir=tmp_path) as supervisor, open_job_service(supervisor) as service:
        with pytest.raises(GrpcError) as caught:
            await answered(service.list_jobs(pb.ListJobsRequest(), Call(identity=None)))
        assert caught.value.status is Status.UNAUTHENTICATED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_running_jobs": 0},
        {"max_running_jobs_per_user": 0},
        {"max_log_streams": 0},
        {"max_log_streams_per_user": -1},
        {"max_grace_period_s": -1.0},
        {"max_grace_period_s": 1e999},
    ],
)
async def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict) -> None:
    async with Supervisor(data_dir=tmp_path) as supervisor:
        with pytest.raises(ValueError):
            async with open_job_service(supervisor, **kwargs):
                pass  # pragma: no cover


async def test_stop_all_jobs_uses_the_given_grace_period_and_logs_each_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.events")
    stubborn = pb.StartJobRequest(command="sh", args=["-c", "trap '' TERM; echo ready; sleep 60"])
    async with (
        Supervisor(data_dir=tmp_path, grace_period_s=60) as supervisor,
        open_job_service(supervisor) as service,
    ):
        plain = (await service.start_job(SLEEP, ALICE)).job_id
        trapping = (await service.start_job(stubborn, ALICE)).job_id
        async for _ in supervisor.get(trapping).output(follow=True):
            break  # "ready": the trap is set
        await service.stop_all_jobs(0, requested_by="ops")  # 0: SIGKILL right after SIGTERM
        statuses = {
            job_id: (
                await service.get_job_status(pb.GetJobStatusRequest(job_id=job_id), ALICE)
            ).status
            for job_id in (plain, trapping)
        }
        assert {s.state for s in statuses.values()} == {pb.JOB_STATE_STOPPED}
        assert {s.stop_requested_by for s in statuses.values()} == {"ops"}
        assert (statuses[plain].signal, statuses[trapping].signal) == (15, 9)
        assert statuses[trapping].escalated
    requests = [
        r.getMessage()
        for r in caplog.records
        if r.name == "jobworker.events" and r.getMessage().startswith("stop requested ")
    ]
    assert sorted(requests) == sorted(
        f"stop requested job={job_id} owner=alice by=ops grace_s=0" for job_id in (plain, trapping)
    )
