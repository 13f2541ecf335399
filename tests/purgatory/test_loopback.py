"""Our server and our client over real sockets and real TLS: calls, identity, shutdown."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from jobworker.purgatory import GrpcError, RpcMethod, Server, Status, TLSStream, open_channel_over
from jobworker.purgatory.testing import CertSet, client_config, make_cert_set, serve, server_config
from jobworker.purgatory.wire.client_side import CLIENT_STREAM_WINDOW_BYTES


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


class App:
    def __init__(self) -> None:
        self.release = trio.Event()
        self.in_flight = trio.Event()
        self.cancelled = trio.Event()

    async def whoami(self, request: StringValue, call) -> StringValue:
        return StringValue(value=f"{call.identity} via {request.value}")

    async def slow(self, request: StringValue, call) -> None:
        self.in_flight.set()
        try:
            await call.send(BytesValue(value=b"started"))
            await self.release.wait()
            await call.send(BytesValue(value=b"finished"))
        finally:
            if not self.release.is_set():
                self.cancelled.set()


def common_name(certificate) -> str:
    from cryptography.x509.oid import NameOID

    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture
async def served(certs):
    app = App()
    server = Server(
        [
            RpcMethod("/t.T/WhoAmI", StringValue, StringValue, app.whoami),
            RpcMethod("/t.T/Slow", StringValue, BytesValue, app.slow, server_streaming=True),
        ],
        tls=server_config(certs),
        identify=common_name,
    )
    async with serve(server) as on_loopback:
        yield server, on_loopback, app


async def test_identity_comes_from_the_verified_certificate(served, certs):
    _, on_loopback, _ = served
    async with on_loopback.connect(client_config(certs)) as channel:
        reply = await channel.unary("/t.T/WhoAmI", StringValue(value="tls"), StringValue)
    assert reply.value == "alice via tls"


async def test_graceful_shutdown_finishes_calls_in_flight_and_refuses_new_ones(served, certs):
    server, on_loopback, app = served
    async with on_loopback.connect(client_config(certs)) as channel:
        async with channel.server_stream("/t.T/Slow", StringValue(), BytesValue) as replies:
            assert (await replies.__anext__()).value == b"started"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.shutdown, 30)
                # The client hears the GOAWAY: no new calls on this connection...
                with trio.fail_after(10):
                    await channel.going_away.wait()
                with pytest.raises(GrpcError) as refused:
                    await channel.unary("/t.T/WhoAmI", StringValue(), StringValue)
                assert refused.value.status is Status.UNAVAILABLE
                # ...while the call in flight goes on to its natural end.
                app.release.set()
                assert [r.value async for r in replies] == [b"finished"]
    assert not app.cancelled.is_set()
    with pytest.raises(OSError):  # nothing listens any more
        await trio.open_tcp_stream(on_loopback.host, on_loopback.port)


async def test_shutdown_cancels_what_outlives_the_grace_period(served, certs, autojump_clock):
    server, on_loopback, app = served
    async with on_loopback.connect(client_config(certs)) as channel:
        async with channel.server_stream("/t.T/Slow", StringValue(), BytesValue) as replies:
            await replies.__anext__()
            await server.shutdown(5)
            await app.cancelled.wait()
            with pytest.raises(GrpcError) as caught:
                await replies.__anext__()
    assert caught.value.status is Status.UNAVAILABLE


async def test_a_full_socket_holds_the_sender_and_loses_no_byte(nursery, certs):
    """Over tiny socket buffers the server's writes stop short of what it queued (the rest
    waits for the writer, see Driver.push) while a slow client reads: every message arrives,
    whole and in order, and the other calls on the connection go on meanwhile. A socket pair,
    not the kit's loopback listener: the buffers must be tiny on both ends from the start."""
    # Twice the client's stream window: beyond any window.
    messages = [
        bytes([i % 256]) * (50_000 + i) for i in range(2 * CLIENT_STREAM_WINDOW_BYTES // 50_000)
    ]
    sent = 0

    async def burst(request: StringValue, call) -> None:
        nonlocal sent
        for message in messages:
            await call.send(BytesValue(value=message))
            sent += 1

    async def echo(request: StringValue, call) -> StringValue:
        return request

    server = Server(
        [
            RpcMethod("/t.T/Burst", StringValue, BytesValue, burst, server_streaming=True),
            RpcMethod("/t.T/Echo", StringValue, StringValue, echo),
        ],
        tls=server_config(certs),
    )
    client_socket, server_socket = trio.socket.socketpair()
    for sock in (client_socket, server_socket):
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    nursery.start_soon(server.serve_stream, trio.SocketStream(server_socket))
    client_tls = TLSStream(trio.SocketStream(client_socket), client_config(certs))
    await client_tls.do_handshake()
    async with open_channel_over(client_tls, authority="localhost") as channel:
        async with channel.server_stream("/t.T/Burst", StringValue(), BytesValue) as replies:
            received = [(await replies.__anext__()).value]
            await trio.testing.wait_all_tasks_blocked()
            assert sent < len(messages)  # held back by the full socket and the windows
            reply = await channel.unary("/t.T/Echo", StringValue(value="meanwhile"), StringValue)
            assert reply.value == "meanwhile"
            received += [reply.value async for reply in replies]
    assert received == messages
