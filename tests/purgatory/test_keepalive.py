"""Dead peers are reclaimed: accepted sockets carry TCP keepalive (and TCP_USER_TIMEOUT) as
ServerLimits says, so a client whose host vanished without a FIN has its connection reset by the
kernel within minutes, and its calls' slots freed. What is deterministic is checked: the options
on the server's real accepted socket, over loopback TLS."""

from __future__ import annotations

import math
import socket

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from jobworker.purgatory import RpcMethod, Server, ServerLimits
from jobworker.purgatory.testing import (
    CertSet,
    client_config,
    make_cert_set,
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
