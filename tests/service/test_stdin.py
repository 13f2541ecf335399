"""WriteJobInput: a client's stream into a job's stdin (`jobctl run -i`), with real jobs and a
real purgatory channel. Byte-exact, EOF when the stream ends however it ends, one writer once,
the owner's (or an admin's) right, and a clear answer when the job stops reading."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from jobworker.purgatory import GrpcError, Status
from jobworker.service import handlers
from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Served

pytestmark = pytest.mark.cgroups

CHUNK = 64 * 2**10


async def feed(client, job_id: str, data: bytes) -> pb.WriteJobInputResponse:
    async with client.write_input() as call:
        await call.send(pb.WriteJobInputRequest(job_id=job_id))
        for start in range(0, len(data), CHUNK):
            await call.send(pb.WriteJobInputRequest(data=data[start : start + CHUNK]))
        return await call.response()


async def output(client, job_id: str) -> bytes:
    return b"".join(chunk.data for chunk in await client.logs(job_id, follow=True))


async def test_binary_stdin_reaches_the_job_byte_exact_and_ends_with_eof(served: Served) -> None:
    alice = served.client("alice")
    data = os.urandom(3 * 2**20 + 17)  # every byte value, and a last message not a full chunk
    job_id = await alice.start("sha256sum", open_stdin=True)
    reply = await feed(alice, job_id, data)
    assert reply.bytes_written == len(data)
    # sha256sum prints only once it has read EOF: the end of the stream closed the job's stdin
    assert await output(alice, job_id) == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()
    assert (await alice.status(job_id)).state == pb.JOB_STATE_FINISHED


async def test_a_cancelled_stream_closes_the_jobs_stdin_too(served: Served) -> None:
    """The client went away mid-input: the job must not wait forever for the rest."""
    alice = served.client("alice")
    job_id = await alice.start("cat", open_stdin=True)
    async with alice.write_input() as call:
        await call.send(pb.WriteJobInputRequest(job_id=job_id, data=b"partial"))
        async with alice.logs_stream(job_id, follow=True) as logs:
            first = await anext(aiter(logs))  # cat echoed it: the server has written it
            assert first.data == b"partial"
            call.cancel()
            rest = [chunk.data async for chunk in logs]  # ends: cat read EOF and exited
    assert rest == []
    status = await alice.status(job_id)
    assert (status.state, status.exit_code) == (pb.JOB_STATE_FINISHED, 0)


async def test_a_job_that_stops_reading_fails_the_write_saying_how_much_it_took(
    served: Served,
) -> None:
    alice = served.client("alice")
    job_id = await alice.start("head", "-c", "10", open_stdin=True)
    with pytest.raises(GrpcError) as caught:
        await feed(alice, job_id, b"x" * (16 * 2**20))  # far more than any pipe holds
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert f"job {job_id}" in caught.value.message and "bytes" in caught.value.message
    assert await output(alice, job_id) == b"x" * 10


async def test_stdin_is_written_once_and_only_when_opened(served: Served) -> None:
    alice = served.client("alice")
    # runs on after its EOF, so that its stdin is refused for being closed, not for its end
    closed = await alice.start("sh", "-c", "cat; exec sleep 600", open_stdin=True)
    assert (await feed(alice, closed, b"once\n")).bytes_written == 5
    not_opened = await alice.start("sleep", "600")
    for job_id, words in ((closed, "written already"), (not_opened, "not started with")):
        with pytest.raises(GrpcError) as caught:
            await feed(alice, job_id, b"more")
        assert caught.value.status is Status.FAILED_PRECONDITION
        assert words in caught.value.message
    for job_id in (closed, not_opened):
        await alice.stop(job_id)
    assert await output(alice, closed) == b"once\n"


async def test_only_the_owner_or_an_admin_writes(served: Served) -> None:
    alice, bob, vera, adam = (served.client(n) for n in ("alice", "bob", "vera", "adam"))
    job_id = await alice.start("cat", open_stdin=True)
    for intruder, status in ((bob, Status.NOT_FOUND), (vera, Status.PERMISSION_DENIED)):
        with pytest.raises(GrpcError) as caught:
            await feed(intruder, job_id, b"not yours")
        assert caught.value.status is status
    # the refusals did not take the one writer's turn, nor close the job's stdin
    assert (await feed(adam, job_id, b"from an admin\n")).bytes_written == 14
    assert await output(alice, job_id) == b"from an admin\n"


async def test_a_stream_that_names_no_job_is_invalid(served: Served) -> None:
    alice = served.client("alice")
    async with alice.write_input() as call:
        with pytest.raises(GrpcError) as caught:
            await call.response()  # half-closes with no message at all
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "first message must name the job" in caught.value.message
    job_id = await alice.start("cat", open_stdin=True)
    with trio.fail_after(30):
        async with alice.write_input() as call:
            await call.send(pb.WriteJobInputRequest(job_id=job_id, data=b"a"))
            await call.send(pb.WriteJobInputRequest(job_id=job_id, data=b"b"))
            with pytest.raises(GrpcError) as caught:
                await call.response()
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert await output(alice, job_id) == b"a"  # EOF after what was written before the error


async def test_a_stdin_nobody_comes_to_write_is_closed(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client died between StartJob and WriteJobInput: the job must not wait forever."""
    monkeypatch.setattr(handlers, "STDIN_CLAIM_TIMEOUT_S", 0.5)
    alice = served.client("alice")
    job_id = await alice.start("sh", "-c", "cat; echo eof", open_stdin=True)
    assert await output(alice, job_id) == b"eof\n"  # cat read EOF, without anyone writing
    with pytest.raises(GrpcError) as caught:
        await feed(alice, job_id, b"too late")
    assert caught.value.status is Status.FAILED_PRECONDITION
