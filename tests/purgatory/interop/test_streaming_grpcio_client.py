"""Client-streaming and bidirectional calls from a real grpcio client to purgatory's server:
content byte-exact, large messages, answers before the half-close, cancellation, deadlines,
errors and the per-message limit. grpcio blocks, so it runs in worker threads (`in_thread`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest
import trio

from .harness import (
    BIG_CHUNK_BYTES,
    BIG_CHUNKS,
    CALL_TIMEOUT_S,
    DEADLINE_S,
    GUARD_S,
    MAX_REQUEST_BYTES,
    GrpcioClient,
    Served,
    chunk_data,
    expected_digest,
    in_thread,
)


def chunks(pb: ModuleType, seed: int, count: int, size: int) -> Iterator[Any]:
    for index in range(count):
        yield pb.Chunk(index=index, data=chunk_data(seed, index, size))


async def test_a_100_mib_client_stream_arrives_byte_exact(
    pb: ModuleType, grpcio_client: GrpcioClient, capsys: pytest.CaptureFixture[str]
) -> None:
    def upload() -> tuple[Any, float]:
        started = time.perf_counter()
        digest = grpcio_client.stub.Upload(
            chunks(pb, 3, BIG_CHUNKS, BIG_CHUNK_BYTES), timeout=CALL_TIMEOUT_S
        )
        return digest, time.perf_counter() - started

    with trio.fail_after(CALL_TIMEOUT_S + GUARD_S):
        digest, elapsed_s = await in_thread(upload)
    assert digest.count == BIG_CHUNKS
    assert digest.sha256 == expected_digest(3, BIG_CHUNKS, BIG_CHUNK_BYTES)
    with capsys.disabled():  # informational, never asserted
        mib = BIG_CHUNKS * BIG_CHUNK_BYTES / 2**20
        print(
            f"\n[interop] grpcio client -> purgatory server (client stream): {mib:.0f} MiB in "
            f"{elapsed_s:.2f} s = {mib * 2**20 / elapsed_s / 1e6:.0f} MB/s"
        )


async def test_bidi_ping_pong_with_messages_near_the_limit(
    pb: ModuleType, grpcio_client: GrpcioClient
) -> None:
    payload_bytes = MAX_REQUEST_BYTES - 64  # the request's other fields fit in the rest

    def ping_pong() -> list[tuple[str, int]]:
        # The next request is only produced after the previous reply arrived: the server must
        # answer each message while the client's side of the stream is still open.
        requests: queue.Queue[Any] = queue.Queue()

        def produce() -> Iterator[Any]:
            while (request := requests.get()) is not None:
                yield request

        call = grpcio_client.stub.Chat(produce(), timeout=CALL_TIMEOUT_S)
        seen = []
        for turn in range(8):
            requests.put(pb.EchoRequest(text=f"turn {turn}", payload=bytes([turn]) * payload_bytes))
            reply = next(call)
            assert reply.payload == bytes([turn]) * payload_bytes
            seen.append((reply.text, len(reply.payload)))
        requests.put(None)  # half-close
        seen += [(reply.text, len(reply.payload)) for reply in call]
        return seen

    with trio.fail_after(GUARD_S):
        seen = await in_thread(ping_pong)
    assert seen == [(f"turn {turn}", payload_bytes) for turn in range(8)] + [("end", 0)]


async def test_cancelling_a_bidi_call_cancels_the_handler(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    def first_reply_then_cancel() -> tuple[str, grpc.StatusCode]:
        call = grpcio_client.stub.Chat(
            iter([pb.EchoRequest(text="hi", hang=True)]), timeout=CALL_TIMEOUT_S
        )
        text = next(call).text
        call.cancel()
        try:
            next(call)
        except grpc.RpcError as exc:
            return text, exc.code()
        raise AssertionError("the call went on after cancel()")

    with trio.fail_after(GUARD_S):
        text, code = await in_thread(first_reply_then_cancel)
        await purgatory_server.spy.ended.wait()
    assert (text, code) == ("hi", grpc.StatusCode.CANCELLED)
    assert purgatory_server.spy.cancelled
    # The connection is unharmed.
    reply = await in_thread(grpcio_client.stub.Unary, pb.EchoRequest(text="after"))
    assert reply.text == "after"


async def test_cancelling_a_client_stream_mid_upload_cancels_the_handler(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    done = threading.Event()

    def three_then_wait() -> Iterator[Any]:
        yield from chunks(pb, 4, 3, 1024)
        done.wait(GUARD_S)  # the client has more to say, later

    future = grpcio_client.stub.Upload.future(three_then_wait(), timeout=CALL_TIMEOUT_S)
    try:
        with trio.fail_after(GUARD_S):
            await purgatory_server.spy.started.wait()  # the handler is reading
            future.cancel()
            await purgatory_server.spy.ended.wait()
    finally:
        done.set()
    assert purgatory_server.spy.cancelled
    assert future.cancelled()


async def test_the_deadline_cancels_a_bidi_handler(
    pb: ModuleType, grpcio_client: GrpcioClient, purgatory_server: Served
) -> None:
    def hang() -> grpc.StatusCode:
        call = grpcio_client.stub.Chat(iter([pb.EchoRequest(hang=True)]), timeout=DEADLINE_S)
        try:
            list(call)
        except grpc.RpcError as exc:
            return exc.code()
        raise AssertionError("the call ended without its deadline")

    with trio.fail_after(GUARD_S):
        code = await in_thread(hang)
        await purgatory_server.spy.ended.wait()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert purgatory_server.spy.cancelled


async def test_a_handler_error_mid_stream_reaches_the_client(
    pb: ModuleType, grpcio_client: GrpcioClient
) -> None:
    def chat() -> tuple[list[str], grpc.StatusCode, str]:
        requests = [
            pb.EchoRequest(text="one"),
            pb.EchoRequest(fail_code=9, fail_message="not now ☕"),
            pb.EchoRequest(text="never answered"),
        ]
        call = grpcio_client.stub.Chat(iter(requests), timeout=CALL_TIMEOUT_S)
        texts = []
        try:
            for reply in call:
                texts.append(reply.text)
        except grpc.RpcError as exc:
            return texts, exc.code(), exc.details()
        raise AssertionError("the call ended OK")

    with trio.fail_after(GUARD_S):
        texts, code, details = await in_thread(chat)
    assert (texts, code, details) == (["one"], grpc.StatusCode.FAILED_PRECONDITION, "not now ☕")


async def test_one_oversize_message_in_a_client_stream_is_resource_exhausted(
    pb: ModuleType, grpcio_client: GrpcioClient
) -> None:
    def upload() -> grpc.StatusCode:
        pieces = [
            *chunks(pb, 5, 3, MAX_REQUEST_BYTES // 2),  # each under the limit, not their sum
            pb.Chunk(index=3, data=b"x" * MAX_REQUEST_BYTES),
        ]
        try:
            grpcio_client.stub.Upload(iter(pieces), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code()
        raise AssertionError("the oversize message was taken")

    with trio.fail_after(GUARD_S):
        code = await in_thread(upload)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
