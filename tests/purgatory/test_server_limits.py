"""ServerLimits: each knob reaches what it limits; handlers of reset streams are capped; the
server's errors hook is where a handler's exception becomes a status. In memory, via the kit."""

from __future__ import annotations

import h2.events
import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from jobworker.purgatory import GrpcError, RpcMethod, Server, ServerLimits, Status
from jobworker.purgatory.testing import RawPeer, memory_channel, memory_stream, request_headers
from jobworker.purgatory.wire import encode_message

_HEADERS_TYPE = 0x1
_CONTINUATION_TYPE = 0x9
_END_HEADERS = 0x4


def _echo_server(**knobs) -> tuple[Server, list[str]]:
    seen: list[str] = []

    async def echo(request: StringValue, call) -> StringValue:
        seen.append(request.value)
        return request

    return Server([RpcMethod("/t.T/Echo", StringValue, StringValue, echo)], tls=None, **knobs), seen


def _split_header_block(data: bytes, pieces: int) -> bytes:
    """`data` (h2's output: one HEADERS frame with END_HEADERS, then whatever follows) with the
    HEADERS frame's block cut into `pieces` parts: HEADERS, then pieces-1 CONTINUATION frames,
    the last one ending the block. Same bytes of HPACK, more frames."""
    length = int.from_bytes(data[:3], "big")
    frame_type, flags, stream_id = data[3], data[4], data[5:9]
    assert frame_type == _HEADERS_TYPE and flags & _END_HEADERS
    block, rest = data[9 : 9 + length], data[9 + length :]
    step = -(-len(block) // pieces)
    parts = [block[i : i + step] for i in range(0, len(block), step)]
    assert len(parts) == pieces
    out = bytearray()
    for index, part in enumerate(parts):
        kind = _HEADERS_TYPE if index == 0 else _CONTINUATION_TYPE
        part_flags = (flags & ~_END_HEADERS) if index == 0 else 0
        if index == len(parts) - 1:
            part_flags |= _END_HEADERS
        out += len(part).to_bytes(3, "big") + bytes([kind, part_flags]) + stream_id + part
    return bytes(out + rest)


async def _call_in_continuations(server: Server, pieces: int) -> list[object]:
    """One Echo call whose header block comes in `pieces` frames; h2's events for the answer."""
    async with memory_stream(server) as client_stream:
        peer = RawPeer(client_stream)
        await peer.flush()  # preface and SETTINGS
        peer.h2.send_headers(1, request_headers("/t.T/Echo"))
        await client_stream.send_all(_split_header_block(peer.h2.data_to_send(), pieces))
        peer.h2.send_data(1, encode_message(StringValue(value="hi").SerializeToString()))
        peer.h2.end_stream(1)
        await peer.flush()
        events = await peer.read_until(
            lambda events: any(
                isinstance(e, h2.events.StreamEnded | h2.events.ConnectionTerminated)
                for e in events
            )
        )
    return events


async def test_a_wire_budget_set_on_the_server_reaches_each_connection() -> None:
    # A block in four frames (HEADERS and three CONTINUATIONs) is within the default budget...
    server, seen = _echo_server()
    events = await _call_in_continuations(server, pieces=4)
    trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert seen == ["hi"]
    assert (b"grpc-status", b"0") in trailers[0].headers
    # ...and beyond a budget of two CONTINUATION frames: the connection ends before any handler.
    server, seen = _echo_server(limits=ServerLimits(max_continuation_frames=2))
    events = await _call_in_continuations(server, pieces=4)
    assert seen == []
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code != 0
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in events)


async def test_handlers_of_reset_streams_count_against_the_stream_cap() -> None:
    # Rapid reset's other half: a client that resets streams whose handlers do not finish at
    # once must not pile handlers up; beyond max_concurrent_streams + the allowance, new
    # streams are refused (REFUSED_STREAM, which the client sees as UNAVAILABLE).
    started = 0
    release = trio.Event()

    async def hold(request: StringValue, call) -> None:
        nonlocal started
        started += 1
        await call.send(BytesValue(value=b"started"))
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # a slow cleanup: it lingers after the reset
                await release.wait()

    limits = ServerLimits(max_concurrent_streams=2, lingering_handler_allowance=1)
    server = Server(
        [RpcMethod("/t.T/Hold", StringValue, BytesValue, hold, server_streaming=True)],
        tls=None,
        limits=limits,
    )

    async def start_and_leave() -> None:
        async with channel.server_stream("/t.T/Hold", StringValue(), BytesValue) as replies:
            assert (await replies.__anext__()).value == b"started"
        # Left early: the stream is reset; its handler is cancelled but still running.
        await trio.testing.wait_all_tasks_blocked()

    async with memory_channel(server) as channel:
        try:
            for _ in range(3):  # two streams' worth plus the allowance of one
                await start_and_leave()
            assert started == 3
            with pytest.raises(GrpcError) as caught:
                await start_and_leave()
            assert caught.value.status is Status.UNAVAILABLE
            assert started == 3  # refused before any handler ran
            release.set()  # the lingering handlers finish...
            await trio.testing.wait_all_tasks_blocked()
            await start_and_leave()  # ...and streams are served again
            assert started == 4
        finally:
            release.set()  # whatever failed, the handlers may end


async def test_errors_hook_maps_a_handlers_exception_in_one_place(caplog) -> None:
    async def lookup(request: StringValue, call) -> StringValue:
        if request.value == "domain":
            raise KeyError(request.value)
        if request.value == "own":
            raise GrpcError(Status.ABORTED, "the handler's own status")
        raise RuntimeError("a bug")

    def errors(exc: Exception) -> GrpcError | None:
        if isinstance(exc, KeyError):
            return GrpcError(Status.NOT_FOUND, f"no such thing: {exc.args[0]}")
        return None

    server = Server(
        [RpcMethod("/t.T/Lookup", StringValue, StringValue, lookup)], tls=None, errors=errors
    )
    outcomes = {}
    async with memory_channel(server) as channel:
        for value in ("domain", "own", "bug"):
            with pytest.raises(GrpcError) as caught:
                await channel.unary("/t.T/Lookup", StringValue(value=value), StringValue)
            outcomes[value] = (caught.value.status, caught.value.message)
    assert outcomes == {
        "domain": (Status.NOT_FOUND, "no such thing: domain"),
        "own": (Status.ABORTED, "the handler's own status"),
        "bug": (Status.INTERNAL, "internal error"),  # not the application's: logged, generic
    }
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "/t.T/Lookup failed on stream 5"
    ]


def test_server_limits_refuse_values_out_of_range_naming_the_field() -> None:
    with pytest.raises(ValueError, match="max_header_list_bytes"):
        ServerLimits(max_header_list_bytes=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        ServerLimits(idle_timeout_s=float("nan"))
    # HTTP/2's own range: outside it every connection's SETTINGS would fail, not the start.
    for frame_bytes in (2**14 - 1, 2**24):
        with pytest.raises(ValueError, match="max_frame_bytes"):
            ServerLimits(max_frame_bytes=frame_bytes)
    with pytest.raises(TypeError, match="max_streams"):
        Server([], tls=None, max_streams=3)
    # A keyword overrides the field of `limits` of the same name, and only that one.
    server = Server([], tls=None, limits=ServerLimits(max_pending_acks=5), max_reset_burst=7)
    assert (server.limits.max_pending_acks, server.limits.max_reset_burst) == (5, 7)
