from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.supervisor import Supervisor

from .helpers import IN_V2_VM


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="real cgroups need root")
    for item in items:
        if "cgroups" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["isolated", "unisolated"])
async def sup(request: pytest.FixtureRequest, tmp_path: Path):
    """A Supervisor, once isolating its jobs (the default as root) and once not: the lifecycle
    (states, exit codes and signals, stop, output, cleanup) must not depend on it."""
    isolation = request.param == "isolated"
    async with Supervisor(
        data_dir=tmp_path / "data", grace_period_s=5, isolation=isolation
    ) as supervisor:
        yield supervisor


@pytest.fixture
def expected_backend() -> str:
    # In the v2 VM the automatic choice must be v2; on our hybrid machines it is v1. Elsewhere,
    # say what to expect: JOBWORKER_EXPECT_CGROUPS=v2.
    return os.environ.get("JOBWORKER_EXPECT_CGROUPS") or ("v2" if IN_V2_VM else "v1")
