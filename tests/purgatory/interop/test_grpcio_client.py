"""A real grpcio client (C-core, BoringSSL) against purgatory's server, mutual TLS 1.3 on loopback.

grpcio's calls block, so they run in worker threads (`in_thread`), each with its own deadline as
a backstop; the server runs in the test's Trio run. `trio.fail_after` only guards against hangs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import grpc
import pytest
import trio

from jobworker.purgatory.testing import CertSet

from .harness import (
    BIG_CHUNK_BYTES,
    BIG_CHUNKS,
    CALL_TIMEOUT_S,
    CONCURRENT_STREAMS,
    DEADLINE_S,
    GRPC_CODES,
    GUARD_S,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MESSAGE,
    MISSING,
    SENT_METADATA,
    GrpcioClient,
    Served,
    StreamCheck,
    as_entries,
    echoed,
    expected_digest,
    in_thread,
    x_metadata,
)


async def test_unary_round_trip(pb: ModuleType, grpcio_client: GrpcioClient) -> None:
    request = pb.EchoRequest(text="héllo ☕", payload=bytes(range(256)) * 16)
    with trio.fail_after(GUARD_S):
        reply = await in_thread(grpcio_client.stub.Unary, request, timeout=CALL_TIMEOUT_S)
    assert (reply.text, reply.payload) == (request.text, request.payload)


async def test_a_100_mib_stream_arrives_byte_exact(
    pb: ModuleType, grpcio_client: GrpcioClient, capsys: pytest.CaptureFixture[str]
) -> None:
    request = pb.StreamRequest(chunks=BIG_CHUNKS, chunk_bytes=BIG_CHUNK_BYTES, seed=1)

    def receive() -> tuple[StreamCheck, float]:
        check = StreamCheck()
        started = time.perf_counter()
        for chunk in grpcio_client.stub.Stream(request, timeout=CALL_TIMEOUT_S):
            check.add(chunk)
        return check, time.perf_counter() - started

    with trio.fail_after(CALL_TIMEOUT_S + GUARD_S):
        check, elapsed_s = await in_thread(receive)
    assert check.count == BIG_CHUNKS
    assert check.digest() == expected_digest(1, BIG_CHUNKS, BIG_CHUNK_BYTES)
    with capsys.disabled():  # informational, never asserted
        print(
            f"\n[interop] grpcio client <- purgatory server: {check.bytes / 2**20:.0f} MiB in "
            f"{elapsed_s:.2f} s = {check.bytes / elapsed_s / 1e6:.0f} MB/s"
        )


async def test_100_concurrent_streams_on_one_channel(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    requests = [
        pb.StreamRequest(chunks=8, chunk_bytes=8192, seed=1000 + i, rendezvous=True)
        for i in range(CONCURRENT_STREAMS)
    ]

    def run() -> list[StreamCheck]:
        # Every call starts before any is read; the handlers wait until all are in at once.
        calls = [grpcio_client.stub.Stream(r, timeout=CALL_TIMEOUT_S) for r in requests]
        checks = []
        for call in calls:
            check = StreamCheck()
            for chunk in call:
                check.add(chunk)
            checks.append(check)
        return checks

    with trio.fail_after(GUARD_S):
        checks = await in_thread(run)
    assert [check.digest() for check in checks] == [
        expected_digest(r.seed, r.chunks, r.chunk_bytes) for r in requests
    ]
    assert len(purgatory_server.spy.peers) == 1  # all on one connection


async def test_deadline_exceeded_cancels_the_handler(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    stub = grpcio_client.stub
    with trio.fail_after(GUARD_S):
        await in_thread(stub.Unary, pb.EchoRequest(), timeout=CALL_TIMEOUT_S)  # connected
        with pytest.raises(grpc.RpcError) as caught:
            await in_thread(stub.Unary, pb.EchoRequest(hang=True), timeout=DEADLINE_S)
        await purgatory_server.spy.ended.wait()
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert purgatory_server.spy.cancelled


async def test_cancelling_mid_stream_cancels_the_handler(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    request = pb.StreamRequest(chunks=3, chunk_bytes=1024, seed=7, hang=True)

    def read_three_then_cancel() -> tuple[list[int], grpc.StatusCode]:
        call = grpcio_client.stub.Stream(request, timeout=CALL_TIMEOUT_S)
        indexes = [next(call).index for _ in range(3)]
        call.cancel()
        try:
            next(call)
        except grpc.RpcError as exc:
            return indexes, exc.code()
        raise AssertionError("the stream went on after cancel()")

    with trio.fail_after(GUARD_S):
        indexes, code = await in_thread(read_three_then_cancel)
        await purgatory_server.spy.ended.wait()
    assert (indexes, code) == ([0, 1, 2], grpc.StatusCode.CANCELLED)
    assert purgatory_server.spy.cancelled


@pytest.mark.parametrize("code", range(1, 17), ids=lambda code: GRPC_CODES[code].name)
async def test_every_status_code_and_message_arrive_intact(
    pb: ModuleType, grpcio_client: GrpcioClient, code: int
) -> None:
    request = pb.EchoRequest(fail_code=code, fail_message=MESSAGE)
    with trio.fail_after(GUARD_S), pytest.raises(grpc.RpcError) as caught:
        await in_thread(grpcio_client.stub.Unary, request, timeout=CALL_TIMEOUT_S)
    error = caught.value
    assert (error.code(), error.details()) == (GRPC_CODES[code], MESSAGE)
    assert x_metadata(error.trailing_metadata()) == (("x-code", str(code)),)


async def test_metadata_round_trip_unary(pb: ModuleType, grpcio_client: GrpcioClient) -> None:
    request = pb.EchoRequest(echo_metadata=True)
    with trio.fail_after(GUARD_S):
        reply, call = await in_thread(
            grpcio_client.stub.Unary.with_call,
            request,
            metadata=SENT_METADATA,
            timeout=CALL_TIMEOUT_S,
        )
    assert [(e.key, e.value) for e in reply.metadata] == as_entries(SENT_METADATA)
    assert x_metadata(call.initial_metadata()) == echoed(SENT_METADATA, "initial")
    assert x_metadata(call.trailing_metadata()) == echoed(SENT_METADATA, "trailing")


async def test_metadata_round_trip_stream(pb: ModuleType, grpcio_client: GrpcioClient) -> None:
    request = pb.StreamRequest(chunks=2, chunk_bytes=16, echo_metadata=True)

    def run() -> tuple[int, tuple, tuple]:
        call = grpcio_client.stub.Stream(request, metadata=SENT_METADATA, timeout=CALL_TIMEOUT_S)
        received = sum(1 for _ in call)
        return received, call.initial_metadata(), call.trailing_metadata()

    with trio.fail_after(GUARD_S):
        received, initial, trailing = await in_thread(run)
    assert received == 2
    assert x_metadata(initial) == echoed(SENT_METADATA, "initial")
    assert x_metadata(trailing) == echoed(SENT_METADATA, "trailing")


async def test_an_oversize_request_is_resource_exhausted(
    pb: ModuleType, grpcio_client: GrpcioClient
) -> None:
    stub = grpcio_client.stub
    with trio.fail_after(GUARD_S):
        with pytest.raises(grpc.RpcError) as caught:
            request = pb.EchoRequest(payload=bytes(MAX_REQUEST_BYTES))  # + its framing
            await in_thread(stub.Unary, request, timeout=CALL_TIMEOUT_S)
        after = await in_thread(stub.Unary, pb.EchoRequest(text="after"), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after.text == "after"  # only that call failed, not the connection


async def test_an_oversize_response_is_resource_exhausted(
    pb: ModuleType, grpcio_connect: Callable[..., GrpcioClient]
) -> None:
    stub = grpcio_connect(options=(("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),)).stub
    with trio.fail_after(GUARD_S):
        with pytest.raises(grpc.RpcError) as caught:
            request = pb.EchoRequest(reply_bytes=MAX_RESPONSE_BYTES)  # + its framing
            await in_thread(stub.Unary, request, timeout=CALL_TIMEOUT_S)
        after = await in_thread(stub.Unary, pb.EchoRequest(text="after"), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after.text == "after"


async def test_an_unknown_method_is_unimplemented(grpcio_client: GrpcioClient) -> None:
    nope = grpcio_client.channel.unary_unary(MISSING)  # raw bytes in and out
    with trio.fail_after(GUARD_S), pytest.raises(grpc.RpcError) as caught:
        await in_thread(nope, b"", timeout=CALL_TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert MISSING in caught.value.details()


async def test_a_client_certificate_from_another_ca_is_refused(
    pb: ModuleType, grpcio_connect: Callable[..., GrpcioClient], certs: CertSet
) -> None:
    mallory = grpcio_connect(leaf=certs.mallory).stub
    alice = grpcio_connect().stub
    with trio.fail_after(GUARD_S):
        with pytest.raises(grpc.RpcError) as caught:
            await in_thread(mallory.Unary, pb.EchoRequest(text="hi"), timeout=CALL_TIMEOUT_S)
        reply = await in_thread(alice.Unary, pb.EchoRequest(text="hi"), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert reply.text == "hi"  # the server is unharmed
