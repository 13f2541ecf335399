"""Server and client over in-memory streams (plaintext h2): calls, deadlines, cancellation,
backpressure, shutdown. TLS and real peers are tested elsewhere; here the clock is virtual."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from jobworker.purgatory import GrpcError, RpcMethod, Server, Status
from jobworker.purgatory.testing import memory_channel
from jobworker.purgatory.wire.client_side import CLIENT_STREAM_WINDOW_BYTES


class Recorder:
    def __init__(self) -> None:
        self.cancelled = trio.Event()
        self.started = trio.Event()
        self.sent = 0


def make_server(recorder: Recorder, **options) -> Server:
    async def echo(request: StringValue, call) -> StringValue:
        user = dict(call.metadata).get("x-user", "")
        call.trailing_metadata = (("x-echo-bin", request.value.encode()),)
        return StringValue(value=f"{user}:{request.value}")

    async def fail(request: StringValue, call) -> StringValue:
        raise GrpcError(Status(int(request.value)), "nope: ☕ 100%")

    async def crash(request: StringValue, call) -> StringValue:
        raise RuntimeError("secret internals")

    async def hang(request: StringValue, call) -> StringValue:
        recorder.started.set()
        try:
            await trio.sleep_forever()
        finally:
            recorder.cancelled.set()

    async def count(request: StringValue, call) -> None:
        for i in range(int(request.value)):
            await call.send(BytesValue(value=b"%d" % i))
            recorder.sent = i + 1

    async def flood(request: StringValue, call) -> None:
        recorder.started.set()
        try:
            while True:
                await call.send(BytesValue(value=b"x" * 65536))
                recorder.sent += 1
        finally:
            recorder.cancelled.set()

    return Server(
        [
            RpcMethod("/t.T/Echo", StringValue, StringValue, echo),
            RpcMethod("/t.T/Fail", StringValue, StringValue, fail),
            RpcMethod("/t.T/Crash", StringValue, StringValue, crash),
            RpcMethod("/t.T/Hang", StringValue, StringValue, hang),
            RpcMethod("/t.T/Count", StringValue, BytesValue, count, server_streaming=True),
            RpcMethod("/t.T/Flood", StringValue, BytesValue, flood, server_streaming=True),
        ],
        tls=None,
        **options,
    )


@pytest.fixture
async def setup():
    recorder = Recorder()
    server = make_server(recorder)
    async with memory_channel(server) as channel:
        yield channel, recorder, server


async def test_unary_with_metadata(setup):
    channel, _, _ = setup
    reply = await channel.unary(
        "/t.T/Echo", StringValue(value="hi"), StringValue, metadata=(("x-user", "alice"),)
    )
    assert reply.value == "alice:hi"


async def test_many_concurrent_calls_on_one_connection(setup):
    channel, _, _ = setup
    replies = {}

    async def one(i):
        replies[i] = (
            await channel.unary("/t.T/Echo", StringValue(value=str(i)), StringValue)
        ).value

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert replies == {i: f":{i}" for i in range(100)}


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK])
async def test_every_status_with_a_non_ascii_message(setup, status):
    channel, _, _ = setup
    with pytest.raises(GrpcError) as caught:
        await channel.unary("/t.T/Fail", StringValue(value=str(int(status))), StringValue)
    assert (caught.value.status, caught.value.message) == (status, "nope: ☕ 100%")


async def test_a_handler_crash_is_internal_and_generic(setup, caplog):
    channel, _, _ = setup
    with caplog.at_level(logging.ERROR), pytest.raises(GrpcError) as caught:
        await channel.unary("/t.T/Crash", StringValue(value=""), StringValue)
    assert (caught.value.status, caught.value.message) == (Status.INTERNAL, "internal error")
    assert "secret internals" in caplog.text  # logged here, never sent


async def test_unknown_method(setup):
    channel, _, _ = setup
    with pytest.raises(GrpcError) as caught:
        await channel.unary("/t.T/Nope", StringValue(), StringValue)
    assert caught.value.status is Status.UNIMPLEMENTED and "/t.T/Nope" in caught.value.message


async def test_deadline_cancels_the_handler(setup, autojump_clock):
    channel, recorder, _ = setup
    with pytest.raises(GrpcError) as caught:
        await channel.unary("/t.T/Hang", StringValue(), StringValue, timeout_s=5)
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    await recorder.cancelled.wait()


async def test_client_cancellation_cancels_the_handler(setup):
    channel, recorder, _ = setup
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.unary, "/t.T/Hang", StringValue(), StringValue)
            await recorder.started.wait()
            scope.cancel()
    await recorder.cancelled.wait()  # the RST_STREAM reached the server's handler


async def test_server_stream_and_leaving_it_early(setup):
    channel, recorder, _ = setup
    async with channel.server_stream("/t.T/Count", StringValue(value="5"), BytesValue) as replies:
        assert [r.value async for r in replies] == [b"0", b"1", b"2", b"3", b"4"]
    async with channel.server_stream("/t.T/Flood", StringValue(), BytesValue) as replies:
        async for _ in replies:
            break
    await recorder.cancelled.wait()


async def test_a_client_that_stops_reading_holds_the_server_handler(setup):
    channel, recorder, _ = setup
    async with channel.server_stream("/t.T/Flood", StringValue(), BytesValue) as replies:
        await recorder.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        stalled_at = recorder.sent
        # Bounded by the windows (the client's stream window, 64 KiB messages), not by the
        # flood.
        assert stalled_at <= CLIENT_STREAM_WINDOW_BYTES // 65536 + 2
        await replies.__anext__()
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.sent <= stalled_at + CLIENT_STREAM_WINDOW_BYTES // 65536 + 2


async def test_oversize_request_is_resource_exhausted():
    server = make_server(Recorder(), max_receive_message_bytes=1000)
    async with memory_channel(server) as channel:
        with pytest.raises(GrpcError) as caught:
            await channel.unary("/t.T/Echo", StringValue(value="x" * 5000), StringValue)
    assert caught.value.status is Status.RESOURCE_EXHAUSTED


async def test_identity_is_built_once_per_connection_and_can_refuse():
    seen = []

    def identify(certificate):
        seen.append(certificate)
        raise GrpcError(Status.UNAUTHENTICATED, "no identity in the certificate")

    server = make_server(Recorder(), identify=identify)
    async with memory_channel(server) as channel:
        for _ in range(3):
            with pytest.raises(GrpcError) as caught:
                await channel.unary("/t.T/Echo", StringValue(), StringValue)
            assert caught.value.status is Status.UNAUTHENTICATED
    assert seen == [None]


async def test_calls_beyond_the_servers_stream_limit_wait_for_a_free_stream():
    recorder = Recorder()
    server = make_server(recorder, max_concurrent_streams=3)
    async with memory_channel(server) as channel:
        await channel.unary("/t.T/Echo", StringValue(), StringValue)  # SETTINGS are in
        replies = []

        async def one(i):
            reply = await channel.unary("/t.T/Echo", StringValue(value=str(i)), StringValue)
            replies.append(reply.value)

        async with trio.open_nursery() as calls:
            for i in range(20):
                calls.start_soon(one, i)
    assert sorted(replies) == sorted(f":{i}" for i in range(20))
