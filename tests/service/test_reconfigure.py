"""JobService.reconfigure (what `jobworker serve` does on SIGHUP): new settings for every call
from then on, over connections already open; all or nothing."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from jobworker.purgatory import GrpcError, Status
from jobworker.service import AllowList, JobPolicy, Retention
from jobworker.supervisor import LimitPolicy
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import DEFAULT_LIMITS, MAX_LIMITS, Served

pytestmark = pytest.mark.cgroups

SLEEP = ("sleep", "60")
SMALLER = LimitPolicy(
    defaults=dataclasses.replace(DEFAULT_LIMITS, memory_bytes=64 * 2**20), maximums=MAX_LIMITS
)


def settings(served: Served, **changes):
    current = {
        "limits": served.supervisor.policy,
        "grace_period_s": served.supervisor.grace_period_s,
        "retention_bytes": served.supervisor.retention_bytes,
        "max_running_jobs": 3,
        "max_running_jobs_per_user": None,
        "max_log_streams": 1000,
        "max_log_streams_per_user": 500,
        "policy": JobPolicy(),
        "retention": Retention(),
        "allowed": None,
    }
    return {**current, **changes}


async def raises(status: Status, call) -> GrpcError:
    with pytest.raises(GrpcError) as caught:
        await call
    assert caught.value.status is status, caught.value
    return caught.value


async def test_a_newly_refused_identity_is_refused_on_its_open_connection(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = served.client("alice"), served.client("bob")
    running = await bob.start(*SLEEP)  # bob's connection is open, with a job running
    served.service.reconfigure(**settings(served, allowed=AllowList.parse(["alice"])))
    with caplog.at_level(logging.WARNING, "jobworker.events"):
        error = await raises(Status.PERMISSION_DENIED, bob.status(running))
    assert error.message == (
        "bob may not use this server: neither its certificate's CN nor any of its alternative"
        " names is on the server's allow-list"
    )
    [line] = [r.getMessage() for r in caplog.records if "access refused" in r.getMessage()]
    assert line.startswith("access refused identity=bob peer=127.0.0.1:")
    assert line.endswith(' subject="CN=bob" reason="not on the allow-list"')
    await alice.list()  # the same server, the same moment: alice is on the list
    # Refused is not stopped: bob's job runs on, and bob, once listed again, sees it.
    assert served.supervisor.get(running).status().state.value == "running"
    served.service.reconfigure(**settings(served, allowed=AllowList.parse(["alice", "bob"])))
    assert (await bob.status(running)).state == pb.JOB_STATE_RUNNING
    await bob.stop(running)


async def test_new_defaults_and_caps_apply_to_the_next_job_not_to_running_ones(
    served: Served,
) -> None:
    alice = served.client("alice")
    first = await alice.start(*SLEEP)
    served.service.reconfigure(**settings(served, limits=SMALLER, max_running_jobs=1))
    await raises(Status.RESOURCE_EXHAUSTED, alice.start(*SLEEP))  # one runs: the new cap
    assert (await alice.status(first)).limits.memory_bytes == 256 * 2**20  # kept its own
    await alice.stop(first)
    second = await alice.start("true")
    assert (await alice.status(second)).limits.memory_bytes == 64 * 2**20


@pytest.mark.parametrize(
    "changes",
    [
        {"max_running_jobs": 0},
        {"max_log_streams_per_user": True},
        {"retention_bytes": 0},
        {"grace_period_s": float("nan")},
    ],
)
async def test_a_refused_reconfiguration_changes_nothing(served: Served, changes: dict) -> None:
    before = (served.supervisor.policy, served.service._allowed, served.service._policy)
    new = settings(served, limits=SMALLER, allowed=AllowList.parse(["alice"]), **changes)
    with pytest.raises(ValueError):
        served.service.reconfigure(**new)
    assert (served.supervisor.policy, served.service._allowed, served.service._policy) == before
    await served.client("bob").list()  # no allow-list came into force


async def test_a_start_in_flight_keeps_the_settings_it_began_with(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that lands while a StartJob awaits its record: the job gets the settings of
    the moment its call began, all of them, never half of each."""
    alice = served.client("alice")
    store = served.service._store
    insert = store.insert

    async def insert_during_a_reload(record):
        served.service.reconfigure(
            **settings(served, limits=SMALLER, policy=JobPolicy(network="none"))
        )
        await insert(record)

    monkeypatch.setattr(store, "insert", insert_during_a_reload)
    job_id = await alice.start(*SLEEP)
    monkeypatch.setattr(store, "insert", insert)
    status = await alice.status(job_id)
    # the defaults and the network as they were when the call began
    assert (status.limits.memory_bytes, status.network) == (256 * 2**20, pb.NETWORK_HOST)
    await alice.stop(job_id)
    later = await alice.status(await alice.start(*SLEEP))  # the next start: the new settings
    assert (later.limits.memory_bytes, later.network) == (64 * 2**20, pb.NETWORK_NONE)
    await alice.stop(later.job_id)
