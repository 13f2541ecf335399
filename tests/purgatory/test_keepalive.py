"""Dead peers are reclaimed: accepted sockets carry TCP keepalive (and TCP_USER_TIMEOUT) as
ServerLimits says, so a client whose host vanished without a FIN has its connection reset by the
kernel within minutes, and its calls' slots freed; above TCP, a client silent while its calls
are open is PINGed, and its connection closed if it does not answer. What is deterministic is
checked: the options on the server's real accepted socket, over loopback TLS; the PINGs in
memory, on virtual time."""

from __future__ import annotations

import math
import socket

import h2.events
import pytest
import trio
from google.protobuf.wrappers_pb2 import StringValue

from jobworker.purgatory import RpcMethod, Server, ServerLimits
from jobworker.purgatory.testing import (
    CertSet,
    RawPeer,
    client_config,
    make_cert_set,
    memory_stream,
    request_headers,
    serve,
    server_config,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


async def _echo(request: StringValue, call) -> StringValue:
    return request


def _options(sock) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


async def _accepted_socket_options(certs: CertSet, **knobs) -> dict[str, int]:
    server = Server(
        [RpcMethod("/t.T/Echo", StringValue, StringValue, _echo)], tls=server_config(certs), **knobs
    )
    async with serve(server) as served, served.connect(client_config(certs)) as channel:
        await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
        (connection,) = server._connections
        return _options(connection._driver.stream.transport.socket)


async def test_accepted_sockets_detect_a_dead_peer_within_minutes_by_default(certs):
    options = await _accepted_socket_options(certs)
    limits = ServerLimits()
    detection_s = limits.tcp_keepalive_idle_s + (
        limits.tcp_keepalive_interval_s * limits.tcp_keepalive_probes
    )
    assert detection_s <= 180
    assert options == {
        "keepalive": 1,
        "idle": limits.tcp_keepalive_idle_s,
        "interval": limits.tcp_keepalive_interval_s,
        "probes": limits.tcp_keepalive_probes,
        "user_timeout_ms": detection_s * 1000,
    }


async def test_keepalive_follows_the_limits_and_can_be_turned_off(certs):
    options = await _accepted_socket_options(
        certs, tcp_keepalive_idle_s=30, tcp_keepalive_interval_s=2.5, tcp_keepalive_probes=3
    )
    assert options == {
        "keepalive": 1,
        "idle": 30,
        "interval": 3,  # whole seconds, rounded up: never more often than asked
        "probes": 3,
        "user_timeout_ms": (30 + 3 * 3) * 1000,
    }
    off = await _accepted_socket_options(certs, tcp_keepalive_idle_s=math.inf)
    assert (off["keepalive"], off["user_timeout_ms"]) == (0, 0)


@pytest.mark.parametrize(
    "knobs",
    [
        {"tcp_keepalive_idle_s": 0},
        {"tcp_keepalive_idle_s": 40_000},
        {"tcp_keepalive_interval_s": math.inf},
        {"tcp_keepalive_probes": 0},
        {"tcp_keepalive_probes": 200},
    ],
)
def test_keepalive_limits_the_kernel_cannot_apply_are_refused(knobs):
    with pytest.raises(ValueError, match="tcp_keepalive"):
        ServerLimits(**knobs)


# --- HTTP/2 keepalive PINGs, on virtual time ----------------------------------------------------

KEEPALIVE = {"keepalive_time_s": 60.0, "keepalive_timeout_s": 10.0}


def _streaming_server(cancelled: trio.Event, **knobs) -> Server:
    async def forever(requests, call) -> StringValue:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    method = RpcMethod("/t.T/Forever", StringValue, StringValue, forever, client_streaming=True)
    return Server([method], tls=None, **knobs)


async def _open_call(peer: RawPeer) -> None:
    await peer.flush()
    peer.h2.send_headers(peer.h2.get_next_available_stream_id(), request_headers("/t.T/Forever"))
    await peer.flush()


def _pings(events: list[object]) -> int:
    return sum(isinstance(e, h2.events.PingReceived) for e in events)


async def test_a_silent_peer_with_a_call_open_is_pinged_then_closed(autojump_clock):
    cancelled = trio.Event()
    server = _streaming_server(cancelled, **KEEPALIVE)
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        await _open_call(peer)
        # Says nothing more, answers nothing: a host gone without a FIN, as HTTP/2 sees it.
        with trio.fail_after(10 * KEEPALIVE["keepalive_time_s"]):  # a hang guard
            events = await peer.read_until_closed(answer=False)
            await cancelled.wait()  # the call's handler was cancelled with the connection
    assert _pings(events) == 1
    assert server.open_connections == 0


async def test_a_peer_that_answers_keeps_its_connection(autojump_clock):
    cancelled = trio.Event()
    server = _streaming_server(cancelled, **KEEPALIVE)
    async with memory_stream(server) as stream:
        peer = RawPeer(stream)
        await _open_call(peer)
        with trio.move_on_after(10 * KEEPALIVE["keepalive_time_s"]):
            events = []
            await peer.read_until(lambda new: bool(events.extend(new)), answer=True)
            while True:
                events += await peer.read_until(lambda new: bool(new), answer=True)
        assert not peer.closed and not cancelled.is_set()
        assert _pings(events) >= 5  # one per silent keepalive_time_s, each answered
        assert server.open_calls == 1


async def test_no_pings_without_calls_nor_when_turned_off(autojump_clock):
    cancelled = trio.Event()
    quiet = _streaming_server(cancelled, **KEEPALIVE, first_request_timeout_s=1000)
    off = _streaming_server(cancelled, keepalive_time_s=math.inf)
    for server, open_call in ((quiet, False), (off, True)):
        async with memory_stream(server) as stream:
            peer = RawPeer(stream)
            if open_call:
                await _open_call(peer)
            else:
                await peer.flush()
            events = []
            with trio.move_on_after(10 * KEEPALIVE["keepalive_time_s"]):
                events += await peer.read_until_closed(answer=True)
            assert _pings(events) == 0
            assert not peer.closed
