"""Regressions: purgatory bugs found through real grpcio peers, reproduced in memory on virtual
time. An idle grpcio client closes its connection as soon as it reads the server's first
(graceful) GOAWAY — "a client that leaves while the server drains" — and a malformed request
once escaped the wire layer and could stop the whole server.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue
from hyperframe.frame import DataFrame

from jobworker.purgatory import RpcMethod, Server
from jobworker.purgatory.testing import memory_channel, memory_stream
from jobworker.purgatory.wire import ClientConnection

GRACE_S = 5.0


async def _shutdown_while_the_client_leaves() -> tuple[BaseException | None, float]:
    """Start a graceful shutdown; once the drain waits for the client's PING answer, the
    client closes its end instead. What shutdown raised (None: nothing), and how long it took."""
    server = Server([], tls=None)
    outcome: BaseException | None = None
    took_s = 0.0

    async def shut_down() -> None:
        nonlocal outcome, took_s
        started = trio.current_time()
        try:
            await server.shutdown(GRACE_S)
        except Exception as exc:
            outcome = exc
        took_s = trio.current_time() - started

    async with memory_stream(server) as client, trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()  # connection up, server preface sent
        nursery.start_soon(shut_down)
        await trio.testing.wait_all_tasks_blocked()  # GOAWAY + PING sent; drain awaits the ack
        await client.aclose()
    return outcome, took_s


async def test_shutdown_does_not_raise_when_a_client_leaves_mid_drain(autojump_clock) -> None:
    outcome, _ = await _shutdown_while_the_client_leaves()
    assert outcome is None, f"shutdown raised {outcome!r}"


async def test_shutdown_does_not_wait_for_a_client_that_left(autojump_clock) -> None:
    _, took_s = await _shutdown_while_the_client_leaves()
    assert took_s < GRACE_S


def _a_request_that_ends_inside_a_message_then_sends_more() -> bytes:
    """A valid call's headers, then DATA with END_STREAM holding only a message prefix (which
    announces one byte), then one more DATA frame on the now closed stream. h2 reads both frames
    (resetting the stream for the second) before our wire layer sees the StreamEnded event."""
    client = ClientConnection(authority="test")
    client.initiate()
    stream_id = client.start_call("/t.T/Echo")
    ends_early = DataFrame(stream_id, data=b"\0\0\0\0\x01", flags=["END_STREAM"])
    too_late = DataFrame(stream_id, data=b"x")
    return client.data_to_send() + ends_early.serialize() + too_late.serialize()


async def test_a_malformed_request_does_not_take_the_connection_down(caplog) -> None:
    async def echo(request: Any, call: Any) -> Any:
        return request

    server = Server([RpcMethod("/t.T/Echo", BytesValue, BytesValue, echo)], tls=None)
    async with memory_stream(server) as client:
        await client.send_all(_a_request_that_ends_inside_a_message_then_sends_more())
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
        # Let the server read the end of the connection before the kit cancels it: whatever
        # it would log on the way out, it has logged by then.
        await trio.testing.wait_all_tasks_blocked()
    # Handled by the wire layer itself, not merely contained by serve_stream's boundary.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_exception_inside_a_channel_block_reaches_the_caller() -> None:
    # Found by jobctl: the channel's cleanup awaited inside its cancelled nursery, and the
    # resulting Cancelled swallowed the caller's exception (`jobctl status` exited 0, silent).
    # memory_channel is open_channel_over on a memory stream, and the kit re-raises what
    # leaves its block as it came: an ExceptionGroup, or nothing, would fail this test.
    with pytest.raises(LookupError, match="raised in the block"):  # bare, not in a group
        async with memory_channel(Server([], tls=None)):
            raise LookupError("raised in the block")
