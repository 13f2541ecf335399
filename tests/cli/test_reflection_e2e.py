"""Server reflection on `jobworker serve` as users run it: grpcio-reflection's client (in a
process of its own, see tests/purgatory/interop/reflection_client.py) learns JobService and
Health from the server alone, as grpcurl, Postman or Evans would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import Server

CLIENT = Path(__file__).parent.parent / "purgatory" / "interop" / "reflection_client.py"
JOBS = "jobworker.v1.JobService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


def test_grpcio_reflection_describes_the_real_server(server: Server, certs_dir: Path) -> None:
    user = certs_dir / "bob"
    done = subprocess.run(
        [
            sys.executable,
            str(CLIENT),
            server.address,
            str(user / "ca.crt"),
            str(user / "client.crt"),
            str(user / "client.key"),
            JOBS,
            HEALTH,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    learnt = json.loads(done.stdout)
    assert learnt["services"] == sorted([JOBS, HEALTH, *REFLECTION])
    jobs = learnt["described"][JOBS]
    assert jobs["file"] == "jobworker/v1/jobworker.proto"
    start = jobs["methods"]["StartJob"]
    assert start == ["jobworker.v1.StartJobRequest", "jobworker.v1.StartJobResponse", False, False]
    assert jobs["methods"]["GetJobLogs"][2:] == [False, True]  # server streaming
    fields = {name for name, _, _ in learnt["messages"]["jobworker.v1.StartJobRequest"]}
    assert {"command", "args"} <= fields
    # Types from the files JobService imports (the well-known ones) came with it.
    assert "google.protobuf.Timestamp" in learnt["messages"]
    health = learnt["described"][HEALTH]
    assert health["file"] == "grpc/health/v1/health.proto"
    assert health["methods"]["Watch"] == [
        "grpc.health.v1.HealthCheckRequest",
        "grpc.health.v1.HealthCheckResponse",
        False,
        True,
    ]
