"""Client-streaming and bidirectional calls, server and client, over in-memory streams (plaintext
h2): half-close, answering early, cancellation both ways, deadlines, errors, per-message limits and
flow control end to end. Real grpcio peers are in interop/; a raw flooder in test_hardening.py."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from jobworker.purgatory import GrpcError, RpcMethod, Server, Status
from jobworker.purgatory.testing import memory_channel
from jobworker.purgatory.wire.core import (
    DEFAULT_CONNECTION_WINDOW_BYTES,
    DEFAULT_STREAM_WINDOW_BYTES,
)

CHUNK = 64 * 2**10
GUARD_S = 10  # a hang guard only, on the real clock


class Recorder:
    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.read = 0  # messages the handler has taken
        self.ended_input = trio.Event()
        self.release = trio.Event()  # lets a stalled handler read on


def make_server(recorder: Recorder, **options) -> Server:
    async def total(requests, call) -> Int64Value:
        count = 0
        async for request in requests:
            count += len(request.value)
            recorder.read += 1
        recorder.ended_input.set()
        return Int64Value(value=count)

    async def first(requests, call) -> StringValue:
        # Answers after one message, without waiting for the client to finish.
        async for request in requests:
            return request
        return StringValue(value="(none)")

    async def echo(requests, call) -> None:
        async for request in requests:
            recorder.read += 1
            await call.send(StringValue(value=request.value.upper()))
        recorder.ended_input.set()
        await call.send(StringValue(value="bye"))

    async def stall(requests, call) -> Int64Value:
        # Reads nothing until released: the client must be held by flow control.
        recorder.started.set()
        try:
            await recorder.release.wait()
            async for _ in requests:
                recorder.read += 1
        finally:
            recorder.cancelled.set()
        return Int64Value(value=recorder.read)

    async def hang(requests, call) -> None:
        recorder.started.set()
        try:
            await trio.sleep_forever()
        finally:
            recorder.cancelled.set()

    async def fail_after_one(requests, call) -> None:
        async for _ in requests:
            recorder.started.set()
            await recorder.release.wait()
            raise GrpcError(Status.FAILED_PRECONDITION, "one is enough ☕")

    async def ignore(requests, call) -> Int64Value:
        # Returns without reading, once the test says the messages have all arrived.
        await recorder.release.wait()
        return Int64Value(value=0)

    return Server(
        [
            RpcMethod("/t.S/Total", BytesValue, Int64Value, total, client_streaming=True),
            RpcMethod("/t.S/First", StringValue, StringValue, first, client_streaming=True),
            RpcMethod(
                "/t.S/Echo",
                StringValue,
                StringValue,
                echo,
                client_streaming=True,
                server_streaming=True,
            ),
            RpcMethod("/t.S/Stall", BytesValue, Int64Value, stall, client_streaming=True),
            RpcMethod(
                "/t.S/Hang",
                BytesValue,
                BytesValue,
                hang,
                client_streaming=True,
                server_streaming=True,
            ),
            RpcMethod(
                "/t.S/Fail",
                BytesValue,
                BytesValue,
                fail_after_one,
                client_streaming=True,
                server_streaming=True,
            ),
            RpcMethod("/t.S/Ignore", BytesValue, Int64Value, ignore, client_streaming=True),
        ],
        tls=None,
        **options,
    )


@pytest.fixture
async def setup():
    recorder = Recorder()
    async with memory_channel(make_server(recorder)) as channel:
        yield channel, recorder


async def test_client_streaming_sums_every_message_until_the_half_close(setup):
    channel, recorder = setup
    async with channel.client_stream("/t.S/Total", Int64Value) as call:
        for size in range(50):
            await call.send(BytesValue(value=b"x" * size))
        reply = await call.response()
    assert reply.value == sum(range(50))
    assert recorder.read == 50


async def test_an_empty_request_stream_ends_at_once(setup):
    channel, _ = setup
    async with channel.client_stream("/t.S/Total", Int64Value) as call:
        reply = await call.response()
    assert reply.value == 0


async def test_bidi_answers_each_message_before_the_client_half_closes(setup):
    channel, recorder = setup
    async with channel.bidi_stream("/t.S/Echo", StringValue) as call:
        for word in ("a", "b", "c"):
            await call.send(StringValue(value=word))
            # A ping-pong: the answer comes while our side of the stream is still open.
            assert (await call.receive()).value == word.upper()
        assert not recorder.ended_input.is_set()
        call.done_sending()
        assert [reply.value async for reply in call] == ["bye"]
    assert recorder.ended_input.is_set()


async def test_bidi_sending_and_receiving_from_two_tasks(setup):
    channel, _ = setup
    words = [str(i) for i in range(200)]
    received = []
    async with channel.bidi_stream("/t.S/Echo", StringValue) as call:
        async with trio.open_nursery() as nursery:

            async def send_all() -> None:
                for word in words:
                    await call.send(StringValue(value=word))
                call.done_sending()

            nursery.start_soon(send_all)
            async for reply in call:
                received.append(reply.value)
    assert received == [*words, "bye"]


async def test_a_server_may_answer_before_the_client_has_finished(setup):
    channel, _ = setup
    with trio.fail_after(GUARD_S):
        async with channel.client_stream("/t.S/First", StringValue) as call:
            await call.send(StringValue(value="one"))
            assert (await call.receive()).value == "one"
            assert await call.receive() is None  # ended OK
            # The server has answered and asked us to stop: what is sent now is dropped.
            await call.send(StringValue(value="two"))
    # The connection is unharmed.
    async with channel.client_stream("/t.S/First", StringValue) as call:
        await call.send(StringValue(value="again"))
        assert (await call.response()).value == "again"


async def test_a_handler_error_ends_the_call_and_wakes_a_blocked_sender(setup):
    channel, recorder = setup
    sent = 0
    errors: list[GrpcError] = []

    async def flood(call) -> None:
        nonlocal sent
        try:
            while True:
                await call.send(BytesValue(value=b"x" * CHUNK))
                sent += 1
        except GrpcError as exc:
            errors.append(exc)

    with trio.fail_after(GUARD_S):
        async with channel.bidi_stream("/t.S/Fail", BytesValue) as call:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, call)
                await recorder.started.wait()
                await trio.testing.wait_all_tasks_blocked()
                # The handler reads no more: the sender waits on flow control when the error
                # comes, and must wake up with it.
                assert sent < 100
                recorder.release.set()
    (error,) = errors
    assert (error.status, error.message) == (Status.FAILED_PRECONDITION, "one is enough ☕")


async def test_cancel_resets_only_its_stream_and_cancels_the_handler(setup):
    channel, recorder = setup
    with trio.fail_after(GUARD_S):
        async with channel.bidi_stream("/t.S/Hang", BytesValue) as call:
            await call.send(BytesValue(value=b"hi"))
            await recorder.started.wait()
            call.cancel()
            await recorder.cancelled.wait()  # the RST_STREAM reached the handler
            with pytest.raises(GrpcError) as caught:
                await call.receive()
            assert caught.value.status is Status.CANCELLED
        # Another call on the same connection still works.
        async with channel.client_stream("/t.S/Total", Int64Value) as call:
            await call.send(BytesValue(value=b"abc"))
            assert (await call.response()).value == 3


async def test_cancel_from_another_task_wakes_a_sender_blocked_on_flow_control(setup):
    channel, recorder = setup
    errors: list[GrpcError] = []

    async def flood(call) -> None:
        try:
            while True:
                await call.send(BytesValue(value=b"x" * CHUNK))
        except GrpcError as exc:
            errors.append(exc)

    with trio.fail_after(GUARD_S):
        async with channel.client_stream("/t.S/Stall", Int64Value) as call:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, call)
                await recorder.started.wait()
                await trio.testing.wait_all_tasks_blocked()  # the sender waits for a window
                call.cancel()
        await recorder.cancelled.wait()
    assert [error.status for error in errors] == [Status.CANCELLED]


async def test_leaving_the_block_early_cancels_the_handler(setup):
    channel, recorder = setup
    async with channel.bidi_stream("/t.S/Hang", BytesValue) as call:
        await call.send(BytesValue(value=b"hi"))
        await recorder.started.wait()
    with trio.fail_after(GUARD_S):
        await recorder.cancelled.wait()


async def test_the_deadline_applies_to_streaming_calls(setup, autojump_clock):
    channel, recorder = setup
    with pytest.raises(GrpcError) as caught:
        async with channel.bidi_stream("/t.S/Hang", BytesValue, timeout_s=5) as call:
            await call.send(BytesValue(value=b"hi"))
            await call.receive()
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    await recorder.cancelled.wait()  # the server's own deadline (grpc-timeout) cancelled it


async def test_the_size_limit_applies_to_each_message():
    recorder = Recorder()
    server = make_server(recorder, max_receive_message_bytes=1000)
    async with memory_channel(server) as channel:
        with pytest.raises(GrpcError) as caught:
            async with channel.client_stream("/t.S/Total", Int64Value) as call:
                for _ in range(5):
                    await call.send(BytesValue(value=b"x" * 900))  # each under the limit
                await call.send(BytesValue(value=b"x" * 5000))
                await call.response()
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert "5003" in caught.value.message  # the message's size, not the sum


async def test_a_handler_that_does_not_read_holds_its_client_to_one_window(setup):
    channel, recorder = setup
    sent = 0
    async with channel.client_stream("/t.S/Stall", Int64Value) as call:
        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                nonlocal sent
                for _ in range(100):  # 6.4 MiB: six windows' worth
                    await call.send(BytesValue(value=b"x" * CHUNK))
                    sent += 1
                call.done_sending()

            nursery.start_soon(flood)
            await recorder.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            # Held by the server's stream window: nothing the handler has not read is
            # acknowledged, so the client cannot run further ahead of it.
            window_messages = DEFAULT_STREAM_WINDOW_BYTES // (CHUNK + 7)
            assert sent <= window_messages + 1
            assert sent >= window_messages - 1  # and it did use the window
            recorder.release.set()
        reply = await call.response()
    assert reply.value == 100 and sent == 100


async def test_unread_messages_give_their_window_back_when_the_call_ends(setup):
    channel, recorder = setup
    # Each call sends most of a stream window and the handler reads none of it: unless the
    # window of unread messages goes back when the call ends, the connection's window (8 MiB)
    # is used up after a few calls and the next one hangs.
    calls = 2 * DEFAULT_CONNECTION_WINDOW_BYTES // DEFAULT_STREAM_WINDOW_BYTES
    with trio.fail_after(GUARD_S):
        for _ in range(calls):
            recorder.release = trio.Event()
            async with channel.client_stream("/t.S/Ignore", Int64Value) as call:
                for _ in range(DEFAULT_STREAM_WINDOW_BYTES // (CHUNK + 7)):
                    await call.send(BytesValue(value=b"x" * CHUNK))
                await trio.testing.wait_all_tasks_blocked()  # all of it is at the server
                recorder.release.set()
                assert (await call.response()).value == 0
        async with channel.client_stream("/t.S/Total", Int64Value) as call:
            await call.send(BytesValue(value=b"x" * 100))
            assert (await call.response()).value == 100


async def test_a_unary_method_still_takes_exactly_one_message():
    async def unary(request, call):
        return request

    server = Server([RpcMethod("/t.U/One", StringValue, StringValue, unary)], tls=None)
    async with memory_channel(server) as channel:
        # A client that streams to a unary method breaks its contract: INTERNAL, at the wire.
        with pytest.raises(GrpcError) as caught:
            async with channel.client_stream("/t.U/One", StringValue) as call:
                await call.send(StringValue(value="a"))
                await call.send(StringValue(value="b"))
                await call.response()
        assert caught.value.status is Status.INTERNAL


# --- a send blocked on flow control when the call ends ------------------------------------------


async def _send_blocked_then(end) -> GrpcError:
    """A client-streaming call whose handler does not read: the client's send of a message
    larger than the window, behind one unread, blocks on flow control; `end(call, release)`
    ends the call meanwhile. What the blocked send raised (it must not return as if the
    message went)."""
    release = trio.Event()

    async def refuse_later(requests, call) -> Int64Value:
        await release.wait()
        raise GrpcError(Status.PERMISSION_DENIED, "not yours")

    server = Server(
        [RpcMethod("/t.S/Refuse", BytesValue, Int64Value, refuse_later, client_streaming=True)],
        tls=None,
    )
    outcome: list[BaseException] = []
    async with memory_channel(server) as channel:
        async with channel.client_stream("/t.S/Refuse", Int64Value) as call:

            async def send_big() -> None:
                # An unread message first: the wire holds back the part of the big one behind
                # it (a lone partial message would be let through, see wire/core.py).
                await call.send(BytesValue(value=b"a"))
                try:
                    await call.send(BytesValue(value=b"x" * (2 * DEFAULT_STREAM_WINDOW_BYTES)))
                except GrpcError as exc:
                    outcome.append(exc)
                else:
                    outcome.append(AssertionError("send() returned: the message was dropped"))

            with trio.fail_after(GUARD_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_big)
                    await trio.testing.wait_all_tasks_blocked()
                    assert outcome == []  # blocked on the window
                    end(call, release)
    [result] = outcome
    if not isinstance(result, GrpcError):
        raise result
    return result


async def test_a_send_blocked_on_flow_control_raises_when_the_call_is_cancelled():
    error = await _send_blocked_then(lambda call, release: call.cancel())
    assert error.status is Status.CANCELLED


async def test_a_send_blocked_on_flow_control_raises_the_servers_error():
    error = await _send_blocked_then(lambda call, release: release.set())
    assert (error.status, error.message) == (Status.PERMISSION_DENIED, "not yours")
