"""The server's `observe` hook (one `CallEnded` per call, refused calls included), its open
connection and call counts, and a failed handshake's log line naming the certificate."""

from __future__ import annotations

import logging

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue
from hyperframe.frame import HeadersFrame, PingFrame, RstStreamFrame

from jobworker.purgatory import (
    CallEnded,
    GrpcError,
    RpcMethod,
    Server,
    Status,
    TLSError,
)
from jobworker.purgatory.testing import (
    CertSet,
    RawPeer,
    client_config,
    make_cert_set,
    memory_channel,
    memory_stream,
    request_headers,
    serve,
    server_config,
)
from jobworker.purgatory.wire import SHUTDOWN_PING

# Frame types, as RawPeer reports the frames its h2 refused after a GOAWAY.
RST_STREAM_TYPE, PING_TYPE = 0x3, 0x6


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


class App:
    def __init__(self) -> None:
        self.in_flight = trio.Event()
        self.release = trio.Event()

    async def echo(self, request: StringValue, call) -> StringValue:
        if request.value == "deny":
            raise GrpcError(Status.PERMISSION_DENIED, "not you")
        return StringValue(value=request.value.upper())

    async def hold(self, request: StringValue, call) -> None:
        await call.send(BytesValue(value=b"started"))
        self.in_flight.set()
        await self.release.wait()


def methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod("/t.T/Echo", StringValue, StringValue, app.echo),
        RpcMethod("/t.T/Hold", StringValue, BytesValue, app.hold, server_streaming=True),
    ]


async def test_each_call_is_observed_once_with_its_status_request_and_answer():
    app, seen = App(), []
    server = Server(methods(app), tls=None, identify=lambda cert: "someone", observe=seen.append)
    async with memory_channel(server) as channel:
        reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
        with pytest.raises(GrpcError):
            await channel.unary("/t.T/Echo", StringValue(value="deny"), StringValue)
        with pytest.raises(GrpcError):
            await channel.unary("/t.T/Nope", StringValue(value="x"), StringValue)
    assert reply.value == "HI"
    ok, denied, unknown = seen
    assert (ok.path, ok.status, ok.connection.identity) == ("/t.T/Echo", Status.OK, "someone")
    assert ok.request == StringValue(value="hi") and ok.response == StringValue(value="HI")
    assert ok.duration_s >= 0
    assert (denied.status, denied.message) == (Status.PERMISSION_DENIED, "not you")
    assert denied.request == StringValue(value="deny") and denied.response is None
    assert (unknown.path, unknown.method, unknown.status) == (
        "/t.T/Nope",
        None,
        Status.UNIMPLEMENTED,
    )


async def test_calls_on_a_connection_whose_identify_failed_are_observed_refused():
    def refuse(cert):
        raise GrpcError(Status.UNAUTHENTICATED, "who are you?")

    seen: list[CallEnded] = []
    server = Server(methods(App()), tls=None, identify=refuse, observe=seen.append)
    async with memory_channel(server) as channel:
        with pytest.raises(GrpcError) as caught:
            await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert caught.value.status is Status.UNAUTHENTICATED
    [refused] = seen
    assert (refused.path, refused.status, refused.message) == (
        "/t.T/Echo",
        Status.UNAUTHENTICATED,
        "who are you?",
    )
    assert refused.method is not None and refused.connection.identity is None
    assert refused.request is None  # never decoded: the handler's business, not the refusal's


async def test_a_call_the_client_abandons_is_observed_cancelled_and_counted_while_open():
    app, seen = App(), []
    server = Server(methods(app), tls=None, observe=seen.append)
    async with memory_channel(server) as channel:
        async with channel.server_stream("/t.T/Hold", StringValue(), BytesValue) as replies:
            assert (await replies.__anext__()).value == b"started"
            assert (server.open_connections, server.open_calls) == (1, 1)
            assert seen == []
        # Leaving the stream resets it: the handler is cancelled, the call ends unanswered.
        with trio.fail_after(5):
            while not seen:
                await trio.testing.wait_all_tasks_blocked()
        assert server.open_calls == 0
    [abandoned] = seen
    assert (abandoned.path, abandoned.status) == ("/t.T/Hold", Status.CANCELLED)


async def test_a_call_the_wire_answered_is_observed_with_that_answer():
    # A message over max_receive_message_bytes: the wire answers RESOURCE_EXHAUSTED itself and
    # cancels the handler. The observer (the audit log, the metrics) must say what the client
    # was told, not CANCELLED.
    async def total(requests, call) -> Int64Value:
        n = 0
        async for request in requests:
            n += len(request.value)
        return Int64Value(value=n)

    seen: list[CallEnded] = []
    method = RpcMethod("/t.T/Total", BytesValue, Int64Value, total, client_streaming=True)
    server = Server([method], tls=None, observe=seen.append, max_receive_message_bytes=1000)
    async with memory_channel(server) as channel:
        with pytest.raises(GrpcError) as caught:
            async with channel.client_stream("/t.T/Total", Int64Value) as call:
                await call.send(BytesValue(value=b"x" * 10))
                await call.send(BytesValue(value=b"x" * 5000))
                await call.response()
        with trio.fail_after(5):
            while not seen:
                await trio.testing.wait_all_tasks_blocked()
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    [ended] = seen
    assert (ended.status, ended.message) == (caught.value.status, caught.value.message)
    assert "larger than max" in ended.message


async def test_a_streaming_request_is_observed_by_its_first_message():
    async def total(requests, call) -> Int64Value:
        return Int64Value(value=sum([len(request.value) async for request in requests]))

    seen: list[CallEnded] = []
    method = RpcMethod("/t.T/Total", BytesValue, Int64Value, total, client_streaming=True)
    server = Server([method], tls=None, observe=seen.append)
    async with memory_channel(server) as channel:
        async with channel.client_stream("/t.T/Total", Int64Value) as call:
            for value in (b"first", b"second", b"third"):
                await call.send(BytesValue(value=value))
            assert (await call.response()).value == 16
        with trio.fail_after(5):
            while not seen:
                await trio.testing.wait_all_tasks_blocked()
    [ended] = seen
    assert ended.status is Status.OK
    assert ended.request == BytesValue(value=b"first")
    assert ended.response == Int64Value(value=16)


async def test_an_observer_that_fails_is_logged_and_the_call_is_unharmed(caplog):
    def broken(ended: CallEnded) -> None:
        raise RuntimeError("observer bug")

    server = Server(methods(App()), tls=None, observe=broken)
    async with memory_channel(server) as channel:
        reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "HI"
    assert any("call observer failed on /t.T/Echo" in r.getMessage() for r in caplog.records)


async def test_open_connections_counts_connections_past_their_handshake(certs):
    app = App()
    server = Server(methods(app), tls=server_config(certs))
    async with serve(server) as on_loopback:
        assert server.open_connections == 0
        async with on_loopback.connect(client_config(certs)) as channel:
            async with channel.server_stream("/t.T/Hold", StringValue(), BytesValue) as replies:
                await replies.__anext__()
                assert (server.open_connections, server.open_calls) == (1, 1)
                app.release.set()
                assert [r async for r in replies] == []


class _Lines(logging.Handler):
    """The messages logged, and an event set when one containing `text` arrives (the server
    logs in the test's own thread, so a Trio event may be set here)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.lines: list[str] = []
        self.arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if self.text in self.lines[-1]:
            self.arrived.set()


@pytest.mark.parametrize("who", ["mallory", "nobody"])
async def test_a_failed_handshake_names_the_peer_and_the_certificate_presented(certs, who):
    lines = _Lines("TLS handshake with")
    logger = logging.getLogger("jobworker.purgatory")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel: it clears the loggers' isEnabledFor caches
    try:
        server = Server(methods(App()), tls=server_config(certs))
        async with serve(server) as on_loopback:
            if who == "mallory":  # a certificate of a CA this server does not trust
                tls = client_config(certs, certs.mallory)
                with pytest.raises((TLSError, trio.BrokenResourceError, GrpcError)):
                    async with on_loopback.connect(tls) as channel:
                        await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
            else:  # not TLS at all: no certificate to name
                async with await trio.open_tcp_stream(on_loopback.host, on_loopback.port) as raw:
                    await raw.send_all(b"GET / HTTP/1.1\r\n\r\n")
            with trio.fail_after(5):
                await lines.arrived.wait()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    [line] = [line for line in lines.lines if lines.text in line]
    assert "TLS handshake with 127.0.0.1:" in line
    if who == "mallory":
        assert 'client certificate "OU=admin,CN=mallory"' in line, line
        assert "certificate verify failed" in line, line
    else:
        assert "(no client certificate seen)" in line, line


# --- requests the wire answers or refuses before any handler --------------------------------


def _status_of(events: list[object], stream_id: int) -> tuple[bytes | None, bytes | None]:
    """(HTTP :status, grpc-status) of the answer on `stream_id` among a RawPeer's events."""
    for event in events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
            fields = dict(event.headers)
            return fields.get(b":status"), fields.get(b"grpc-status")
    return None, None


def _ended(stream_id: int):
    def done(events: list[object]) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
            and e.stream_id == stream_id
            for e in events
        )

    return done


async def _observed(seen: list[CallEnded], count: int) -> None:
    with trio.fail_after(5):
        while len(seen) < count:
            await trio.testing.wait_all_tasks_blocked()


async def _echo(peer: RawPeer) -> None:
    """A good call on the peer's connection, answered: the server has read all sent before."""
    stream_id = peer.queue_unary("/t.T/Echo", StringValue(value="sync").SerializeToString())
    await peer.flush()
    with trio.fail_after(5):
        events = await peer.read_until(_ended(stream_id))
    assert _status_of(events, stream_id) == (b"200", None)  # headers first, then the answer


def _with(path: str, **changes: bytes) -> list[tuple[bytes, bytes]]:
    headers = dict(request_headers(path))
    headers.update({name.replace("_", "-").encode(): value for name, value in changes.items()})
    return list(headers.items())


REFUSALS = {
    # kind: (headers, HTTP status, gRPC status, words of the message)
    "metadata over the limit": (
        _with("/t.T/Echo", x_big=b"x" * 20_000),
        b"200",
        Status.RESOURCE_EXHAUSTED,
        "exceeds the limit",
    ),
    "unsupported grpc-encoding": (
        _with("/t.T/Echo", grpc_encoding=b"br"),
        b"200",
        Status.UNIMPLEMENTED,
        "'br' is not supported",
    ),
    "bad grpc-timeout": (
        _with("/t.T/Nope", grpc_timeout=b"soon"),
        b"200",
        Status.INTERNAL,
        "grpc-timeout",
    ),
    "bad content-type": (
        _with("/t.T/Echo", content_type=b"text/plain"),
        b"415",
        Status.INTERNAL,
        "is not gRPC",
    ),
}


@pytest.mark.parametrize("kind", REFUSALS)
async def test_a_request_the_wire_answers_is_observed_once_with_that_answer(kind):
    headers, http_status, status, words = REFUSALS[kind]
    path = dict(headers)[b":path"].decode()
    seen: list[CallEnded] = []
    server = Server(methods(App()), tls=None, observe=seen.append)
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        stream_id = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(stream_id, headers, end_stream=True)
        await peer.flush()
        with trio.fail_after(5):
            events = await peer.read_until(_ended(stream_id))
        assert _status_of(events, stream_id) == (http_status, str(int(status)).encode())
        # A late RST_STREAM on the answered stream tells of no second call.
        late = RstStreamFrame(stream_id)
        late.error_code = h2.errors.ErrorCodes.CANCEL
        await stream.send_all(late.serialize())
        await _echo(peer)
        await _observed(seen, 2)
        await trio.testing.wait_all_tasks_blocked()
    refused, echoed = seen
    assert (refused.path, refused.status) == (path, status)
    assert words in refused.message
    assert refused.method is server._methods.get(path)  # None for /t.T/Nope
    assert refused.request is None and refused.response is None
    assert (echoed.path, echoed.status) == ("/t.T/Echo", Status.OK)


async def test_a_stream_over_the_stream_limit_is_observed_refused_once():
    app, seen = App(), []
    server = Server(methods(app), tls=None, observe=seen.append, max_concurrent_streams=1)
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        # Both before the server's SETTINGS are read: our h2 does not know the limit yet.
        held = peer.queue_unary("/t.T/Hold", StringValue().SerializeToString())
        over = peer.queue_unary("/t.T/Echo", StringValue(value="x").SerializeToString())
        await peer.flush()
        with trio.fail_after(5):
            events = await peer.read_until(_ended(over))
        [reset] = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert (reset.stream_id, reset.error_code) == (over, h2.errors.ErrorCodes.REFUSED_STREAM)
        await _observed(seen, 1)
        app.release.set()
        with trio.fail_after(5):
            await peer.read_until(_ended(held))
        await _observed(seen, 2)
    refused, finished = seen
    assert (refused.path, refused.status) == ("/t.T/Echo", Status.UNAVAILABLE)
    assert refused.method is server._methods["/t.T/Echo"]
    assert "more than 1 concurrent streams" in refused.message
    assert (finished.path, finished.status) == ("/t.T/Hold", Status.OK)


async def test_a_request_the_peer_reset_in_the_same_read_is_not_observed():
    seen: list[CallEnded] = []
    server = Server(methods(App()), tls=None, observe=seen.append)
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        stream_id = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(stream_id, _with("/t.T/Echo", grpc_timeout=b"soon"))
        peer.h2.reset_stream(stream_id)  # in the same flush: before any answer
        await _echo(peer)
        await _observed(seen, 1)
        await trio.testing.wait_all_tasks_blocked()
    [echoed] = seen  # and nothing for the stream taken back
    assert (echoed.path, echoed.status) == ("/t.T/Echo", Status.OK)


def _goaway(events: list[object]) -> bool:
    return any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def _reset_of(stream_id: int):
    def done(events: list[object]) -> bool:
        # Refused by our closed h2, or read by it: either way, the server's RST_STREAM.
        return ("refused", RST_STREAM_TYPE) in events or any(
            isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id for e in events
        )

    return done


async def test_a_stream_opened_after_the_final_goaway_is_observed_refused():
    # A client that ignores GOAWAY: the server's ladder (first GOAWAY, PING, second GOAWAY)
    # runs while a call is in flight, then the client opens another stream anyway.
    app, seen = App(), []
    server = Server(methods(app), tls=None, observe=seen.append)
    async with memory_stream(server) as stream, trio.open_nursery() as nursery:
        peer = RawPeer(stream)
        held = peer.queue_unary("/t.T/Hold", StringValue().SerializeToString())
        await peer.flush()
        with trio.fail_after(5):
            await peer.read_until(
                lambda events: any(
                    isinstance(e, h2.events.DataReceived) and e.stream_id == held for e in events
                )
            )
        nursery.start_soon(server.shutdown, 30)
        # Our h2 is closed by the first GOAWAY: the PING's answer and the stream are by hand,
        # and what h2 queues on the frames it refuses (its own GOAWAY) is never sent.
        with trio.fail_after(5):
            await peer.read_until(lambda events: ("refused", PING_TYPE) in events, answer=False)
        ack = PingFrame(0, flags=["ACK"], opaque_data=SHUTDOWN_PING)
        await stream.send_all(ack.serialize())
        with trio.fail_after(5):
            await peer.read_until(_goaway, answer=False)  # the second, h2 reads it
        late = peer.h2.get_next_available_stream_id()
        block = peer.h2.encoder.encode(request_headers("/t.T/Echo"))
        await stream.send_all(HeadersFrame(late, block, flags=["END_HEADERS"]).serialize())
        with trio.fail_after(5):
            await peer.read_until(_reset_of(late), answer=False)
        await _observed(seen, 1)
        app.release.set()
        await _observed(seen, 2)
    refused, finished = seen
    assert (refused.path, refused.status) == ("/t.T/Echo", Status.UNAVAILABLE)
    assert "final GOAWAY" in refused.message
    assert (finished.path, finished.status) == ("/t.T/Hold", Status.OK)
