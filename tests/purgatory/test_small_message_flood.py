"""A client streaming tiny messages to a handler that does not read: the stream windows bound
the bytes it can send, and what the server holds for them stays of the same order — not an
object per 5-byte message (the reviewer measured 13 bytes of memory per byte on the wire). The
attack is a real HTTP/2 peer speaking by hand; memory is what tracemalloc sees held.
"""

from __future__ import annotations

import gc
import tracemalloc

import h2.events
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from jobworker.purgatory import RpcMethod, Server
from jobworker.purgatory.testing import RawPeer, memory_channel, memory_stream, request_headers
from jobworker.purgatory.wire.core import DEFAULT_STREAM_WINDOW_BYTES

# Allocations made by the transport's code, or by h2 when the transport calls it.
OURS = [tracemalloc.Filter(True, "*/jobworker/*"), tracemalloc.Filter(True, "*/h2/*")]
EMPTY_MESSAGE = b"\0" * 5  # a gRPC message: not compressed, 0 bytes long
# Half a stream window on each of two calls: ~210,000 messages. The stream window would take
# twice as many; the cost per wire byte is the same, and tracemalloc makes each one slow.
STREAMS = 2
FLOOD_BYTES = DEFAULT_STREAM_WINDOW_BYTES // 2 // len(EMPTY_MESSAGE) * len(EMPTY_MESSAGE)


async def _stall(requests, call) -> Int64Value:
    await trio.sleep_forever()


async def _echo(request: BytesValue, call) -> BytesValue:
    return request


async def _flood(peer: RawPeer) -> int:
    """Open STREAMS calls and send each FLOOD_BYTES of empty messages (its window allows)."""
    chunk = EMPTY_MESSAGE * 13_000
    sent = 0
    for _ in range(STREAMS):
        stream_id = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(stream_id, request_headers("/t.S/Stall"))
        left = FLOOD_BYTES
        while left:
            size = min(peer.h2.local_flow_control_window(stream_id), len(chunk), left)
            size -= size % len(EMPTY_MESSAGE)
            assert size > 0
            peer.h2.send_data(stream_id, chunk[:size])
            sent += size
            left -= size
            await peer.flush()
    return sent


async def test_a_flood_of_empty_messages_costs_about_what_it_sends():
    server = Server(
        [
            RpcMethod("/t.S/Stall", BytesValue, Int64Value, _stall, client_streaming=True),
            RpcMethod("/t.S/Echo", BytesValue, BytesValue, _echo),
        ],
        tls=None,
    )
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        await peer.flush()
        with trio.fail_after(5):  # the server's SETTINGS and its connection window
            await peer.read_until(
                lambda events: any(
                    isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0 for e in events
                )
            )
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(OURS)
            sent = await _flood(peer)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(OURS)
        finally:
            tracemalloc.stop()
        # What the transport's code allocated, and h2's under it: in a whole suite, other
        # threads (a test's leftovers) allocate meanwhile, and their memory is not the flood's.
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        (connection,) = server._connections
        unread = sum(len(call._inbox) for call in connection._calls.values())
        assert sent == STREAMS * FLOOD_BYTES  # the attack ran
        assert unread == sent // len(EMPTY_MESSAGE)  # every message kept for its handler
        # (at least the packed inbox itself: its lengths and shares, some bytes a message)
        assert sent < held < 3 * sent, f"{held / sent:.1f} bytes of memory per byte on the wire"
        # The server serves on, on another connection.
        async with memory_channel(server) as channel:
            with trio.fail_after(5):
                reply = await channel.unary("/t.S/Echo", BytesValue(value=b"hi"), BytesValue)
        assert reply.value == b"hi"


async def test_messages_held_packed_come_out_whole_and_in_order():
    # Enough unread messages that the packed inbox compacts while the handler reads (it does
    # once 1024 are taken and half of what it holds), with more arriving meanwhile.
    arrived_all = trio.Event()
    got: list[bytes] = []

    async def collect(requests, call) -> Int64Value:
        await arrived_all.wait()
        async for request in requests:
            got.append(request.value)
        return Int64Value(value=len(got))

    server = Server(
        [RpcMethod("/t.S/Collect", BytesValue, Int64Value, collect, client_streaming=True)],
        tls=None,
    )
    sent = [str(i).encode() * (i % 7) for i in range(5000)]
    async with memory_channel(server) as channel:
        async with channel.client_stream("/t.S/Collect", Int64Value) as call:
            for value in sent[:3000]:
                await call.send(BytesValue(value=value))
            await trio.testing.wait_all_tasks_blocked()
            arrived_all.set()
            for value in sent[3000:]:
                await call.send(BytesValue(value=value))
            with trio.fail_after(5):
                assert (await call.response()).value == len(sent)
    assert got == sent
