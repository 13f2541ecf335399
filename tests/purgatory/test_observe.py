"""The server's `observe` hook (one `CallEnded` per call, refused calls included), its open
connection and call counts, and a failed handshake's log line naming the certificate."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

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
    client_config,
    make_cert_set,
    memory_channel,
    serve,
    server_config,
)


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
