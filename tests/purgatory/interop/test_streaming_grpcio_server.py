"""purgatory's client-streaming and bidirectional calls against a real grpcio server: content
byte-exact, large messages, half-close, cancellation, deadlines, errors, the per-message limit."""

from __future__ import annotations

import time
from types import ModuleType

import pytest
import trio

from jobworker.purgatory import Channel, GrpcError, Status

from .harness import (
    BIG_CHUNK_BYTES,
    BIG_CHUNKS,
    DEADLINE_S,
    GUARD_S,
    MAX_REQUEST_BYTES,
    UNARY,
    Served,
    chunk_data,
    expected_digest,
    in_thread,
)

UPLOAD = "/purgatory.interop.Echo/Upload"
CHAT = "/purgatory.interop.Echo/Chat"


async def test_a_100_mib_client_stream_arrives_byte_exact(
    pb: ModuleType, purgatory_client: Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    with trio.fail_after(60):
        async with purgatory_client.client_stream(UPLOAD, pb.Digest) as call:
            for index in range(BIG_CHUNKS):
                data = chunk_data(6, index, BIG_CHUNK_BYTES)
                await call.send(pb.Chunk(index=index, data=data))
            digest = await call.response()
    elapsed_s = time.perf_counter() - started
    assert digest.count == BIG_CHUNKS
    assert digest.sha256 == expected_digest(6, BIG_CHUNKS, BIG_CHUNK_BYTES)
    with capsys.disabled():  # informational, never asserted
        mib = BIG_CHUNKS * BIG_CHUNK_BYTES / 2**20
        print(
            f"\n[interop] purgatory client -> grpcio server (client stream): {mib:.0f} MiB in "
            f"{elapsed_s:.2f} s = {mib * 2**20 / elapsed_s / 1e6:.0f} MB/s"
        )


async def test_bidi_ping_pong_with_messages_near_the_limit(
    pb: ModuleType, purgatory_client: Channel
) -> None:
    payload_bytes = MAX_REQUEST_BYTES - 64
    with trio.fail_after(GUARD_S):
        async with purgatory_client.bidi_stream(CHAT, pb.EchoReply) as call:
            for turn in range(8):
                payload = bytes([turn]) * payload_bytes
                await call.send(pb.EchoRequest(text=f"turn {turn}", payload=payload))
                reply = await call.receive()
                assert (reply.text, reply.payload == payload) == (f"turn {turn}", True)
            call.done_sending()
            assert [reply.text async for reply in call] == ["end"]


async def test_cancel_resets_the_stream_and_ends_the_handler(
    pb: ModuleType, purgatory_client: Channel, grpcio_server: Served
) -> None:
    with trio.fail_after(GUARD_S):
        async with purgatory_client.bidi_stream(CHAT, pb.EchoReply) as call:
            await call.send(pb.EchoRequest(text="hi", hang=True))
            assert (await call.receive()).text == "hi"
            call.cancel()
            with pytest.raises(GrpcError) as caught:
                await call.receive()
        handler_ended = await in_thread(grpcio_server.spy.ended.wait, GUARD_S)
        after = await purgatory_client.unary(UNARY, pb.EchoRequest(text="after"), pb.EchoReply)
    assert caught.value.status is Status.CANCELLED
    assert handler_ended and grpcio_server.spy.saw_inactive
    assert after.text == "after"


async def test_the_deadline_ends_a_bidi_call(
    pb: ModuleType, purgatory_client: Channel, grpcio_server: Served
) -> None:
    with trio.fail_after(GUARD_S):
        with pytest.raises(GrpcError) as caught:
            async with purgatory_client.bidi_stream(
                CHAT, pb.EchoReply, timeout_s=DEADLINE_S
            ) as call:
                await call.send(pb.EchoRequest(hang=True))
                async for _ in call:
                    pass
        handler_ended = await in_thread(grpcio_server.spy.ended.wait, GUARD_S)
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert handler_ended and grpcio_server.spy.saw_inactive


async def test_a_handler_error_mid_stream_stops_the_sender(
    pb: ModuleType, purgatory_client: Channel
) -> None:
    with trio.fail_after(GUARD_S):
        with pytest.raises(GrpcError) as caught:
            async with purgatory_client.bidi_stream(CHAT, pb.EchoReply) as call:
                await call.send(pb.EchoRequest(text="one"))
                assert (await call.receive()).text == "one"
                await call.send(pb.EchoRequest(fail_code=9, fail_message="not now ☕"))
                # Keep sending: the error must reach the sender (or the reader), not hang it.
                while True:
                    await call.send(pb.EchoRequest(payload=b"x" * 65536))
    assert (caught.value.status, caught.value.message) == (
        Status.FAILED_PRECONDITION,
        "not now ☕",
    )


async def test_one_oversize_message_in_a_client_stream_is_resource_exhausted(
    pb: ModuleType, purgatory_client: Channel
) -> None:
    with trio.fail_after(GUARD_S):
        with pytest.raises(GrpcError) as caught:
            async with purgatory_client.client_stream(UPLOAD, pb.Digest) as call:
                for index in range(3):
                    await call.send(pb.Chunk(index=index, data=b"x" * (MAX_REQUEST_BYTES // 2)))
                await call.send(pb.Chunk(index=3, data=b"x" * MAX_REQUEST_BYTES))
                await call.response()
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
