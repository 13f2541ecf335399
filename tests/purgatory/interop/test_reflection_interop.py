"""Server reflection on purgatory's server, asked by real grpcio clients over mutual TLS:
grpcio-reflection's descriptor database (v1alpha, in a process of its own: see
reflection_client.py) and a plain grpcio stream on v1 with our own message classes."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import trio

from jobworker._pb.grpc.reflection.v1 import reflection_pb2 as v1
from jobworker.purgatory import Server, Status
from jobworker.purgatory.reflection import REFLECTION_SERVICES, reflection_methods, service_names
from jobworker.purgatory.testing import CertSet, serve

from .harness import (
    CALL_TIMEOUT_S,
    GUARD_S,
    GrpcioClient,
    Served,
    TrioSpy,
    in_thread,
    purgatory_methods,
    purgatory_server_tls,
)

CLIENT = Path(__file__).parent / "reflection_client.py"
PACKAGE = "purgatory.interop"
ECHO = f"{PACKAGE}.Echo"


@pytest.fixture
async def reflecting_server(pb: ModuleType, certs: CertSet) -> AsyncIterator[Served]:
    """purgatory serving Echo and reflection for it (and for itself)."""
    methods = purgatory_methods(pb, TrioSpy())
    server = Server(
        [*methods, *reflection_methods(service_names(methods))], tls=purgatory_server_tls(certs)
    )
    async with serve(server) as on_loopback:
        yield Served(on_loopback.port, None)
        await server.shutdown(1.0)


async def run_reflection_client(port: int, certs: CertSet, *services: str) -> dict:
    """grpcio-reflection's client, in its own process; what it learnt, as a dict."""
    argv = [
        sys.executable,
        str(CLIENT),
        f"127.0.0.1:{port}",
        str(certs.ca.cert_file),
        str(certs.alice.cert_file),
        str(certs.alice.key_file),
        *services,
    ]
    with trio.fail_after(GUARD_S):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def test_grpcio_reflection_lists_and_describes_the_services(
    reflecting_server: Served, certs: CertSet
) -> None:
    learnt = await run_reflection_client(reflecting_server.port, certs, ECHO, *REFLECTION_SERVICES)
    assert learnt["services"] == sorted([ECHO, *REFLECTION_SERVICES])
    echo = learnt["described"][ECHO]
    assert echo["file"] == "echo.proto"
    # Every method, with its types and the streaming flags of all four kinds.
    assert echo["methods"] == {
        "Unary": [f"{PACKAGE}.EchoRequest", f"{PACKAGE}.EchoReply", False, False],
        "Stream": [f"{PACKAGE}.StreamRequest", f"{PACKAGE}.Chunk", False, True],
        "Upload": [f"{PACKAGE}.Chunk", f"{PACKAGE}.Digest", True, False],
        "Chat": [f"{PACKAGE}.EchoRequest", f"{PACKAGE}.EchoReply", True, True],
    }
    # The message types, built from the server's answers alone, down to nested ones.
    fields = {name: number for name, number, _ in learnt["messages"][f"{PACKAGE}.EchoReply"]}
    assert fields == {"text": 1, "payload": 2, "metadata": 3}
    assert f"{PACKAGE}.MetadataEntry" in learnt["messages"]
    v1_methods = learnt["described"]["grpc.reflection.v1.ServerReflection"]["methods"]
    assert v1_methods["ServerReflectionInfo"][2:] == [True, True]


async def test_v1_over_a_plain_grpcio_stream_and_bad_questions(
    reflecting_server: Served, certs: CertSet, grpcio_connect_to: Callable[..., GrpcioClient]
) -> None:
    client = grpcio_connect_to(reflecting_server.port)
    reflect = client.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=v1.ServerReflectionRequest.SerializeToString,
        response_deserializer=v1.ServerReflectionResponse.FromString,
    )
    questions = [
        v1.ServerReflectionRequest(list_services=""),
        v1.ServerReflectionRequest(file_containing_symbol="purgatory.interop.Nope"),
        v1.ServerReflectionRequest(file_by_filename="nope.proto"),
        v1.ServerReflectionRequest(all_extension_numbers_of_type="purgatory.interop.Nope"),
        v1.ServerReflectionRequest(file_containing_symbol=f"{ECHO}.Chat"),
    ]

    def ask() -> list[v1.ServerReflectionResponse]:
        return list(reflect(iter(questions), timeout=CALL_TIMEOUT_S))

    with trio.fail_after(GUARD_S):
        answers = await in_thread(ask)
    assert [answer.original_request for answer in answers] == questions
    listed = [service.name for service in answers[0].list_services_response.service]
    assert listed == [ECHO, *REFLECTION_SERVICES]
    for answer in answers[1:4]:  # each an error, and the stream went on
        assert answer.error_response.error_code == Status.NOT_FOUND
    (echo_file,) = answers[4].file_descriptor_response.file_descriptor_proto
    assert b"echo.proto" in echo_file


@pytest.fixture
def grpcio_connect_to(
    certs: CertSet, _grpcio_channels: list[grpc.Channel]
) -> Callable[..., GrpcioClient]:
    def connect(port: int) -> GrpcioClient:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.ca.cert_file.read_bytes(),
            private_key=certs.alice.key_file.read_bytes(),
            certificate_chain=certs.alice.cert_file.read_bytes(),
        )
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        _grpcio_channels.append(channel)
        return GrpcioClient(channel, None)

    return connect
