"""Inbound flow control leaks nothing: once every call has ended, each side has given back every
flow-controlled byte it received (`unacknowledged_bytes` is 0), however the call ended — a
handler that answered without reading, a unary request that timed out, a client that reset or
left mid-message, a caller that left a server stream with a message half received. A leak
shrinks the connection's window for good, until every call on it hangs: the reviewer's
scenario runs here too. In memory, our client against our server, on virtual time.
"""

from __future__ import annotations

import h2.events
import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from jobworker.purgatory import GrpcError, RpcMethod, Server, Status
from jobworker.purgatory.testing import RawPeer, memory_channel, memory_stream, request_headers
from jobworker.purgatory.wire import encode_message
from jobworker.purgatory.wire.client_side import CLIENT_STREAM_WINDOW_BYTES
from jobworker.purgatory.wire.core import (
    DEFAULT_CONNECTION_WINDOW_BYTES,
    DEFAULT_STREAM_WINDOW_BYTES,
)

# Larger than a stream's window: it can only ever arrive in part while a message before it is
# still unread (the part is held back, see wire/core.py).
BIG = b"x" * (2 * DEFAULT_STREAM_WINDOW_BYTES)
# The same for our client, whose windows are larger (wire/client_side.py).
CLIENT_BIG = b"x" * (CLIENT_STREAM_WINDOW_BYTES + 2**20)
# Enough calls that each leaking one stream window would exhaust the connection's window.
CALLS_TO_EXHAUST = 2 * DEFAULT_CONNECTION_WINDOW_BYTES // DEFAULT_STREAM_WINDOW_BYTES


class App:
    def __init__(self) -> None:
        self.release = trio.Event()

    async def ignore(self, requests, call) -> Int64Value:
        await self.release.wait()
        return Int64Value(value=0)

    async def total(self, requests, call) -> Int64Value:
        n = 0
        async for request in requests:
            n += len(request.value)
        return Int64Value(value=n)

    async def echo(self, request: BytesValue, call) -> BytesValue:
        return BytesValue(value=request.value[:10])

    async def two(self, request: BytesValue, call) -> None:
        await call.send(BytesValue(value=b"first"))
        await call.send(BytesValue(value=CLIENT_BIG))


def make_server(app: App, **knobs) -> Server:
    return Server(
        [
            RpcMethod("/t.S/Ignore", BytesValue, Int64Value, app.ignore, client_streaming=True),
            RpcMethod("/t.S/Total", BytesValue, Int64Value, app.total, client_streaming=True),
            RpcMethod("/t.S/Echo", BytesValue, BytesValue, app.echo),
            RpcMethod("/t.S/Two", BytesValue, BytesValue, app.two, server_streaming=True),
        ],
        tls=None,
        **knobs,
    )


def server_wire(server: Server):
    (connection,) = server._connections
    return connection._driver.connection


async def _whole_then_partial(call) -> None:
    """One whole message, then one the window lets through only in part."""
    await call.send(BytesValue(value=b"a"))
    await call.send(BytesValue(value=BIG))


async def test_an_answer_before_reading_gives_back_the_partial_message(autojump_clock):
    app = App()
    server = make_server(app)
    async with memory_channel(server) as channel:
        for _ in range(CALLS_TO_EXHAUST):
            app.release = trio.Event()
            async with channel.client_stream("/t.S/Ignore", Int64Value) as call:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_whole_then_partial, call)
                    await trio.testing.wait_all_tasks_blocked()
                    assert server_wire(server).unacknowledged_bytes > 0  # held while unread
                    app.release.set()
                    assert (await call.response()).value == 0
            await trio.testing.wait_all_tasks_blocked()
            assert server_wire(server).unacknowledged_bytes == 0
        # The reviewer's hang: with the window leaked, this call could never send.
        with trio.fail_after(5):
            async with channel.client_stream("/t.S/Total", Int64Value) as call:
                await call.send(BytesValue(value=b"x" * 100))
                assert (await call.response()).value == 100
        assert channel._driver.connection.unacknowledged_bytes == 0


async def test_a_client_reset_mid_message_gives_everything_back(autojump_clock):
    app = App()
    server = make_server(app)
    async with memory_channel(server) as channel:
        async with channel.client_stream("/t.S/Ignore", Int64Value) as call:

            async def send() -> None:
                with pytest.raises(GrpcError) as caught:
                    await _whole_then_partial(call)
                assert caught.value.status is Status.CANCELLED

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()
                assert server_wire(server).unacknowledged_bytes > 0
                call.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert server.open_calls == 0
        assert server_wire(server).unacknowledged_bytes == 0


async def test_a_unary_request_never_taken_gives_its_window_back(autojump_clock):
    # The reviewer's scenario: the request arrives whole, but its END_STREAM never does; the
    # call ends DEADLINE_EXCEEDED (request_timeout_s) with the message unread. Ten such calls
    # used to take the whole connection window.
    server = make_server(App(), request_timeout_s=1)
    message = encode_message(BytesValue(value=b"x" * 1_000_000).SerializeToString())
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        await peer.flush()
        with trio.fail_after(5):  # the server's SETTINGS (its stream window) and window
            await peer.read_until(
                lambda events: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
            )
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(CALLS_TO_EXHAUST):
            stream_id = peer.h2.get_next_available_stream_id()
            peer.h2.send_headers(stream_id, request_headers("/t.S/Echo"))
            assert peer.h2.local_flow_control_window(stream_id) >= len(message)
            peer.h2.send_data(stream_id, message)  # no END_STREAM
            await peer.flush()

            def answered(events, stream_id=stream_id) -> bool:
                return any(
                    isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id
                    for e in events
                )

            with trio.fail_after(5):
                events = await peer.read_until(answered)
            statuses = [
                dict(e.headers).get(b"grpc-status")
                for e in events
                if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived)
            ]
            assert str(Status.DEADLINE_EXCEEDED.value).encode() in statuses
            await trio.testing.wait_all_tasks_blocked()
            assert server_wire(server).unacknowledged_bytes == 0


async def test_leaving_a_server_stream_mid_message_gives_everything_back(autojump_clock):
    server = make_server(App())
    async with memory_channel(server, max_receive_message_bytes=2 * len(CLIENT_BIG)) as channel:
        async with channel.server_stream("/t.S/Two", BytesValue(), BytesValue):
            # Not reading: "first" waits unread, CLIENT_BIG arrives in part and is held back.
            await trio.testing.wait_all_tasks_blocked()
            assert channel._driver.connection.unacknowledged_bytes > 0
        await trio.testing.wait_all_tasks_blocked()
        assert channel._driver.connection.unacknowledged_bytes == 0
        # And the connection still carries a whole stream of it.
        async with channel.server_stream("/t.S/Two", BytesValue(), BytesValue) as replies:
            with trio.fail_after(5):
                assert [len(r.value) async for r in replies] == [5, len(CLIENT_BIG)]
        await trio.testing.wait_all_tasks_blocked()
        assert channel._driver.connection.unacknowledged_bytes == 0
        assert server_wire(server).unacknowledged_bytes == 0


async def test_a_too_large_message_after_a_partial_one_leaks_nothing(autojump_clock):
    server = make_server(App(), max_receive_message_bytes=len(BIG) - 1)
    async with memory_channel(server) as channel:
        with pytest.raises(GrpcError) as caught:
            async with channel.client_stream("/t.S/Ignore", Int64Value) as call:
                with trio.fail_after(5):
                    await _whole_then_partial(call)
                    await call.response()
        assert caught.value.status is Status.RESOURCE_EXHAUSTED
        await trio.testing.wait_all_tasks_blocked()
        assert server_wire(server).unacknowledged_bytes == 0
        assert channel._driver.connection.unacknowledged_bytes == 0
