"""The audit log of a real server: one line per call — reads, refusals and unknown methods
included — naming the caller, the method, the job, the status code and the duration."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.purgatory import GrpcError, Status
from jobworker.service import audit_call
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Certs
from .observing import Observed, observed_server

pytestmark = pytest.mark.cgroups

LINE = re.compile(r"^call (?P<fields>.*)$")
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@pytest.fixture
async def audited(tmp_path: Path, certs: Certs, caplog) -> AsyncIterator[Observed]:
    caplog.set_level(logging.INFO, logger="jobworker.audit")
    async with observed_server(tmp_path, certs, observe=audit_call) as observed:
        yield observed


def audit_lines(caplog) -> list[dict[str, str]]:
    lines = []
    for record in caplog.records:
        if record.name != "jobworker.audit":
            continue
        match = LINE.match(record.getMessage())
        assert match, record.getMessage()
        pairs = FIELD.findall(match["fields"])
        # Values that are not plain words are JSON strings (events.fields).
        lines.append({k: json.loads(v) if v.startswith('"') else v for k, v in pairs})
    return lines


async def test_every_call_is_one_line_reads_and_refusals_included(audited, caplog):
    alice = audited.client("alice")
    job_id = await alice.start("true", name="tidy")
    await alice.status("tidy")
    with pytest.raises(GrpcError):
        await audited.client("bob").status(job_id)  # another user's job: hidden
    with pytest.raises(GrpcError):
        await alice.list(all=True)
    with pytest.raises(GrpcError):
        await audited.client("nameless").status(job_id)
    with pytest.raises(GrpcError):  # metadata over the limit: answered by the wire itself
        await alice.channel.unary(
            "/jobworker.v1.JobService/ListJobs",
            pb.ListJobsRequest(),
            pb.ListJobsResponse,
            metadata=(("x-padding", "x" * 20_000),),
        )

    start, status, hidden, denied, unauthenticated, oversized = audit_lines(caplog)
    assert start["identity"] == "alice" and start["roles"] == "user"
    assert start["method"] == "/jobworker.v1.JobService/StartJob"
    assert (start["job"], start["code"]) == (job_id, "OK")  # StartJob: the job it created
    assert float(start["duration_ms"]) >= 0 and start["peer"].startswith("127.0.0.1:")
    assert "message" not in start
    assert (status["method"], status["job"], status["code"]) == (
        "/jobworker.v1.JobService/GetJobStatus",
        "tidy",  # the reference as the caller wrote it
        "OK",
    )
    assert (hidden["identity"], hidden["job"], hidden["code"]) == ("bob", job_id, "NOT_FOUND")
    assert (denied["method"], denied["code"]) == (
        "/jobworker.v1.JobService/ListJobs",
        "PERMISSION_DENIED",
    )
    assert "every job" in denied["message"]
    # Refused before any handler: no identity, so the certificate's subject names the caller.
    assert "identity" not in unauthenticated
    assert unauthenticated["subject"] == "OU=admin"
    assert unauthenticated["code"] == "UNAUTHENTICATED"
    assert (oversized["identity"], oversized["method"], oversized["code"]) == (
        "alice",
        "/jobworker.v1.JobService/ListJobs",
        "RESOURCE_EXHAUSTED",
    )
    assert "exceeds the limit" in oversized["message"]


async def test_a_write_job_input_line_names_its_job(audited, caplog):
    alice = audited.client("alice")
    job_id = await alice.start("cat", open_stdin=True)
    async with alice.write_input() as call:
        await call.send(pb.WriteJobInputRequest(job_id=job_id))  # the first message names it
        await call.send(pb.WriteJobInputRequest(data=b"hello\n"))
        assert (await call.response()).bytes_written == 6
    _, write = audit_lines(caplog)
    assert write["method"] == "/jobworker.v1.JobService/WriteJobInput"
    assert (write["job"], write["code"]) == (job_id, "OK")


async def test_what_a_client_chose_cannot_break_or_forge_a_line(audited, caplog):
    alice = audited.client("alice")
    forged = "x\ncall identity=root method=/x code=OK"
    with pytest.raises(GrpcError) as caught:
        await alice.status(forged)
    assert caught.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GrpcError):
        await alice.channel.unary(
            '/jobworker.v1.JobService/Nope" code=OK', pb.ListJobsRequest(), pb.ListJobsResponse
        )
    records = [r.getMessage() for r in caplog.records if r.name == "jobworker.audit"]
    assert len(records) == 2 and all("\n" not in r for r in records)
    reference, unknown = audit_lines(caplog)
    assert (reference["identity"], reference["job"]) == ("alice", forged)
    assert unknown["code"] == "UNIMPLEMENTED"
    assert unknown["method"] == '/jobworker.v1.JobService/Nope" code=OK'
