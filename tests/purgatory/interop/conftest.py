"""Fixtures for the interop tests: Python modules generated from echo.proto (once per session, into
a temporary directory), certificates, a grpcio server and a purgatory server serving Echo over
mutual TLS on 127.0.0.1, and clients of each. Every server, channel and thread is closed or
stopped at teardown, and `no_leaked_threads` fails a test that leaves a thread running.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from jobworker.purgatory import Channel, Server, open_channel
from jobworker.purgatory.testing import CertSet, Leaf, make_cert_set, serve

from .harness import (
    CONCURRENT_STREAMS,
    MAX_REQUEST_BYTES,
    GrpcioClient,
    GrpcioEcho,
    Served,
    ThreadSpy,
    TrioSpy,
    purgatory_client_tls,
    purgatory_methods,
    purgatory_server_tls,
)

HERE = Path(__file__).parent
GRACE_S = 1.0
THREAD_EXIT_S = 5.0


# ---------------------------------------------------------------------------------------------
# generated code and certificates


@pytest.fixture(scope="session")
def _echo_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("echo-proto")
    well_known = resources.files("grpc_tools") / "_proto"
    exit_code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={HERE}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(HERE / "echo.proto"),
        ]
    )
    assert exit_code == 0, "protoc failed on echo.proto"
    sys.path.insert(0, str(out))
    try:  # echo_pb2_grpc imports echo_pb2 by its top-level name
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="session")
def pb(_echo_modules: tuple[ModuleType, ModuleType]) -> ModuleType:
    """The generated echo_pb2: the messages."""
    return _echo_modules[0]


@pytest.fixture(scope="session")
def pb_grpc(_echo_modules: tuple[ModuleType, ModuleType]) -> ModuleType:
    """The generated echo_pb2_grpc: grpcio's stub and servicer registration."""
    return _echo_modules[1]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    # ECDSA P-256: grpcio (BoringSSL) cannot do Ed25519.
    return make_cert_set(tmp_path_factory.mktemp("interop-certs"), "ecdsa")


# ---------------------------------------------------------------------------------------------
# leak guard


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Autouse, so it is torn down last: after every server, channel and thread pool."""
    before = set(threading.enumerate())
    yield
    # Trio keeps idle worker threads for reuse (10 s); they are not ours to end.
    new = [
        thread
        for thread in threading.enumerate()
        if thread not in before and not thread.name.startswith("Trio thread")
    ]
    for thread in new:
        thread.join(THREAD_EXIT_S)
    alive = [thread.name for thread in new if thread.is_alive()]
    assert not alive, f"threads left running: {alive}"


# ---------------------------------------------------------------------------------------------
# servers


@pytest.fixture
async def purgatory_server(pb: ModuleType, certs: CertSet) -> AsyncIterator[Served]:
    """purgatory serving Echo in the test's nursery; shut down gracefully at teardown."""
    spy = TrioSpy()
    server = Server(
        purgatory_methods(pb, spy),
        tls=purgatory_server_tls(certs),
        max_concurrent_streams=CONCURRENT_STREAMS,
        max_receive_message_bytes=MAX_REQUEST_BYTES,
    )
    async with serve(server) as on_loopback:
        yield Served(on_loopback.port, spy)
        await server.shutdown(GRACE_S)


@pytest.fixture
def grpcio_server(pb: ModuleType, pb_grpc: ModuleType, certs: CertSet) -> Iterator[Served]:
    """grpcio serving Echo from a thread pool (room for every rendezvous handler at once)."""
    spy = ThreadSpy()
    executor = ThreadPoolExecutor(
        max_workers=CONCURRENT_STREAMS + 8, thread_name_prefix="grpcio-echo"
    )
    server = grpc.server(executor, options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    pb_grpc.add_EchoServicer_to_server(GrpcioEcho(pb, spy), server)
    credentials = grpc.ssl_server_credentials(
        [(certs.server.key_file.read_bytes(), certs.server.cert_file.read_bytes())],
        root_certificates=certs.ca.cert_file.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Served(port, spy)
    finally:
        server.stop(GRACE_S).wait()
        executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# clients


@pytest.fixture
def _grpcio_channels() -> Iterator[list[grpc.Channel]]:
    """Closed after the Trio run, so after purgatory's graceful shutdown: that ladder (GOAWAY,
    PING, GOAWAY) then runs against a live grpcio client."""
    channels: list[grpc.Channel] = []
    yield channels
    for channel in channels:
        channel.close()


@pytest.fixture
async def grpcio_connect(
    purgatory_server: Served,
    pb_grpc: ModuleType,
    certs: CertSet,
    _grpcio_channels: list[grpc.Channel],
) -> Callable[..., GrpcioClient]:
    """Make grpcio channels to the purgatory server (each connects on its first call)."""

    def connect(
        leaf: Leaf | None = None, options: tuple[tuple[str, Any], ...] = ()
    ) -> GrpcioClient:
        leaf = leaf or certs.alice
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.ca.cert_file.read_bytes(),
            private_key=leaf.key_file.read_bytes(),
            certificate_chain=leaf.cert_file.read_bytes(),
        )
        channel = grpc.secure_channel(
            f"127.0.0.1:{purgatory_server.port}",
            credentials,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                # One channel, one connection: no subchannel shared with another channel.
                ("grpc.use_local_subchannel_pool", 1),
                *options,
            ],
        )
        _grpcio_channels.append(channel)
        return GrpcioClient(channel, pb_grpc.EchoStub(channel))

    return connect


@pytest.fixture
async def grpcio_client(grpcio_connect: Callable[..., GrpcioClient]) -> GrpcioClient:
    return grpcio_connect()


@pytest.fixture
async def purgatory_client(grpcio_server: Served, certs: CertSet) -> AsyncIterator[Channel]:
    """Our channel to the grpcio server, as alice."""
    async with open_channel(
        "127.0.0.1", grpcio_server.port, tls=purgatory_client_tls(certs)
    ) as channel:
        yield channel
