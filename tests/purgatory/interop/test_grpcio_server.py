"""purgatory's client against a real grpcio server (C-core, BoringSSL), mutual TLS 1.3 on loopback.

Our client runs natively in the test's Trio run; grpcio's handlers run in its thread pool and
report through a `ThreadSpy`, whose threading.Events a test waits on from a worker thread.
`trio.fail_after` only guards against hangs.
"""

from __future__ import annotations

import time
from types import ModuleType

import pytest
import trio

from jobworker.purgatory import Channel, GrpcError, Status, open_channel
from jobworker.purgatory.testing import CertSet

from .harness import (
    BIG_CHUNK_BYTES,
    BIG_CHUNKS,
    CONCURRENT_STREAMS,
    DEADLINE_S,
    GUARD_S,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MESSAGE,
    MISSING,
    SENT_METADATA,
    STREAM,
    UNARY,
    Served,
    StreamCheck,
    as_entries,
    echoed,
    expected_digest,
    in_thread,
    purgatory_client_tls,
    x_metadata,
)


async def test_unary_round_trip(pb: ModuleType, purgatory_client: Channel) -> None:
    request = pb.EchoRequest(text="héllo ☕", payload=bytes(range(256)) * 16)
    with trio.fail_after(GUARD_S):
        reply = await purgatory_client.unary(UNARY, request, pb.EchoReply)
    assert (reply.text, reply.payload) == (request.text, request.payload)


async def test_a_100_mib_stream_arrives_byte_exact(
    pb: ModuleType, purgatory_client: Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    request = pb.StreamRequest(chunks=BIG_CHUNKS, chunk_bytes=BIG_CHUNK_BYTES, seed=2)
    check = StreamCheck()
    with trio.fail_after(GUARD_S + 40):
        started = time.perf_counter()
        async with purgatory_client.server_stream(STREAM, request, pb.Chunk) as chunks:
            async for chunk in chunks:
                check.add(chunk)
        elapsed_s = time.perf_counter() - started
    assert check.count == BIG_CHUNKS
    assert check.digest() == expected_digest(2, BIG_CHUNKS, BIG_CHUNK_BYTES)
    with capsys.disabled():  # informational, never asserted
        print(
            f"\n[interop] purgatory client <- grpcio server: {check.bytes / 2**20:.0f} MiB in "
            f"{elapsed_s:.2f} s = {check.bytes / elapsed_s / 1e6:.0f} MB/s"
        )


async def test_100_concurrent_streams_on_one_channel(
    pb: ModuleType, purgatory_client: Channel, grpcio_server: Served
) -> None:
    requests = [
        pb.StreamRequest(chunks=8, chunk_bytes=8192, seed=1000 + i, rendezvous=True)
        for i in range(CONCURRENT_STREAMS)
    ]
    checks = [StreamCheck() for _ in requests]

    async def one(request, check: StreamCheck) -> None:
        async with purgatory_client.server_stream(STREAM, request, pb.Chunk) as chunks:
            async for chunk in chunks:
                check.add(chunk)

    # The grpcio handlers wait (threading.Barrier) until all 100 are in at once.
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            for request, check in zip(requests, checks, strict=True):
                nursery.start_soon(one, request, check)
    assert [check.digest() for check in checks] == [
        expected_digest(r.seed, r.chunks, r.chunk_bytes) for r in requests
    ]
    assert len(grpcio_server.spy.peers) == 1  # all on one connection


async def test_deadline_exceeded_cancels_the_handler(
    pb: ModuleType, purgatory_client: Channel, grpcio_server: Served
) -> None:
    with trio.fail_after(GUARD_S):
        with pytest.raises(GrpcError) as caught:
            await purgatory_client.unary(
                UNARY, pb.EchoRequest(hang=True), pb.EchoReply, timeout_s=DEADLINE_S
            )
        handler_ended = await in_thread(grpcio_server.spy.ended.wait, GUARD_S)
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert handler_ended and grpcio_server.spy.saw_inactive


async def test_cancelling_mid_stream_cancels_the_handler(
    pb: ModuleType, purgatory_client: Channel, grpcio_server: Served
) -> None:
    request = pb.StreamRequest(chunks=3, chunk_bytes=1024, seed=7, hang=True)
    with trio.fail_after(GUARD_S):
        async with purgatory_client.server_stream(STREAM, request, pb.Chunk) as chunks:
            indexes = [(await anext(chunks)).index for _ in range(3)]
        # Leaving the block early reset the stream (RST_STREAM CANCEL).
        handler_ended = await in_thread(grpcio_server.spy.ended.wait, GUARD_S)
        after = await purgatory_client.unary(UNARY, pb.EchoRequest(text="after"), pb.EchoReply)
    assert indexes == [0, 1, 2]
    assert handler_ended and grpcio_server.spy.saw_inactive
    assert after.text == "after"


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK], ids=lambda s: s.name)
async def test_every_status_code_and_message_arrive_intact(
    pb: ModuleType, purgatory_client: Channel, status: Status
) -> None:
    request = pb.EchoRequest(fail_code=status, fail_message=MESSAGE)
    with trio.fail_after(GUARD_S), pytest.raises(GrpcError) as caught:
        await purgatory_client.unary(UNARY, request, pb.EchoReply)
    assert (caught.value.status, caught.value.message) == (status, MESSAGE)
    assert x_metadata(caught.value.trailers) == (("x-code", str(int(status))),)


async def test_metadata_round_trip_unary(pb: ModuleType, purgatory_client: Channel) -> None:
    # Our client has no access to a unary call's initial or trailing metadata: the stream
    # test below checks those; here the server reports what it received.
    request = pb.EchoRequest(echo_metadata=True)
    with trio.fail_after(GUARD_S):
        reply = await purgatory_client.unary(UNARY, request, pb.EchoReply, metadata=SENT_METADATA)
    assert [(e.key, e.value) for e in reply.metadata] == as_entries(SENT_METADATA)


async def test_metadata_round_trip_stream(pb: ModuleType, purgatory_client: Channel) -> None:
    request = pb.StreamRequest(chunks=2, chunk_bytes=16, echo_metadata=True)
    with trio.fail_after(GUARD_S):
        async with purgatory_client.server_stream(
            STREAM, request, pb.Chunk, metadata=SENT_METADATA
        ) as chunks:
            received = [chunk.index async for chunk in chunks]
            initial, trailing = chunks.initial_metadata, chunks.trailing_metadata
    assert received == [0, 1]
    assert x_metadata(initial) == echoed(SENT_METADATA, "initial")
    assert x_metadata(trailing) == echoed(SENT_METADATA, "trailing")


async def test_an_oversize_request_is_resource_exhausted(
    pb: ModuleType, purgatory_client: Channel
) -> None:
    with trio.fail_after(GUARD_S):
        with pytest.raises(GrpcError) as caught:
            request = pb.EchoRequest(payload=bytes(MAX_REQUEST_BYTES))  # + its framing
            await purgatory_client.unary(UNARY, request, pb.EchoReply)
        after = await purgatory_client.unary(UNARY, pb.EchoRequest(text="after"), pb.EchoReply)
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert after.text == "after"  # only that call failed, not the connection


async def test_an_oversize_response_is_resource_exhausted(
    pb: ModuleType, grpcio_server: Served, certs: CertSet
) -> None:
    with trio.fail_after(GUARD_S):
        async with open_channel(
            "127.0.0.1",
            grpcio_server.port,
            tls=purgatory_client_tls(certs),
            max_receive_message_bytes=MAX_RESPONSE_BYTES,
        ) as channel:
            with pytest.raises(GrpcError) as caught:
                request = pb.EchoRequest(reply_bytes=MAX_RESPONSE_BYTES)  # + its framing
                await channel.unary(UNARY, request, pb.EchoReply)
            after = await channel.unary(UNARY, pb.EchoRequest(text="after"), pb.EchoReply)
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert after.text == "after"


async def test_an_unknown_method_is_unimplemented(
    pb: ModuleType, purgatory_client: Channel
) -> None:
    with trio.fail_after(GUARD_S), pytest.raises(GrpcError) as caught:
        await purgatory_client.unary(MISSING, pb.EchoRequest(), pb.EchoReply)
    assert caught.value.status is Status.UNIMPLEMENTED


async def test_a_client_certificate_from_another_ca_is_refused(
    pb: ModuleType, grpcio_server: Served, certs: CertSet
) -> None:
    # What happens, exactly: in TLS 1.3 the client's handshake is over once it has sent its
    # certificate and Finished, so open_channel succeeds. grpcio's server then fails its side
    # and closes the TCP connection *without an alert* (seen on the wire), so our TLS layer reads
    # a plain EOF, and the first call fails UNAVAILABLE with no TLS reason to give.
    with trio.fail_after(GUARD_S):
        async with open_channel(
            "127.0.0.1", grpcio_server.port, tls=purgatory_client_tls(certs, certs.mallory)
        ) as channel:
            with pytest.raises(GrpcError) as caught:
                await channel.unary(UNARY, pb.EchoRequest(text="hi"), pb.EchoReply)
            # Whether the EOF was read before or after the call started is a race.
            assert caught.value.message in ("the connection is closed", "the connection was lost")
            with pytest.raises(GrpcError) as again:
                await channel.unary(UNARY, pb.EchoRequest(text="hi"), pb.EchoReply)
    assert caught.value.status is Status.UNAVAILABLE
    assert (again.value.status, again.value.message) == (
        Status.UNAVAILABLE,
        "the connection is closed",
    )
