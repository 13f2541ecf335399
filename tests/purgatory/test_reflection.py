"""Server reflection (v1 and v1alpha) over in-memory streams, answering from a descriptor pool
built from test protos: every kind of question, dependencies sent once per stream, and questions
without an answer (NOT_FOUND, the stream goes on). grpcio's clients are in interop/."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from jobworker._pb.grpc.reflection.v1 import reflection_pb2 as v1
from jobworker._pb.grpc.reflection.v1alpha import reflection_pb2 as v1alpha
from jobworker.purgatory import RpcMethod, Server, Status
from jobworker.purgatory.reflection import (
    REFLECTION_SERVICES,
    reflection_methods,
    service_names,
)
from jobworker.purgatory.testing import memory_channel

PROTOS = Path(__file__).parent / "reflection_protos"
TIMESTAMP = "google/protobuf/timestamp.proto"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    """A pool of its own, holding the test protos (and what they import) and reflection's."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("reflection") / "set.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    exit_code = protoc.main(
        [
            "protoc",
            f"--proto_path={PROTOS}",
            f"--proto_path={well_known}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            "sample.proto",
            "other.proto",
        ]
    )
    assert exit_code == 0
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)  # protoc lists dependencies first
    for module in (v1, v1alpha):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


@pytest.fixture(params=[v1, v1alpha], ids=["v1", "v1alpha"])
def version(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


class Reflection:
    """One ServerReflectionInfo stream: ask, and get the answer."""

    def __init__(self, call, pb: ModuleType) -> None:
        self._call = call
        self._pb = pb

    async def ask(self, **question):
        request = self._pb.ServerReflectionRequest(host="test-host", **question)
        await self._call.send(request)
        response = await self._call.receive()
        assert response.valid_host == "test-host"
        assert response.original_request == request
        return response

    async def files(self, **question) -> list[str]:
        response = await self.ask(**question)
        assert response.WhichOneof("message_response") == "file_descriptor_response", response
        return [
            descriptor_pb2.FileDescriptorProto.FromString(blob).name
            for blob in response.file_descriptor_response.file_descriptor_proto
        ]

    async def error(self, **question) -> tuple[Status, str]:
        response = await self.ask(**question)
        assert response.WhichOneof("message_response") == "error_response", response
        return Status(response.error_response.error_code), response.error_response.error_message


@pytest.fixture
async def reflect(pool, version):
    server = Server(reflection_methods(["purgatory.sample.Sample"], pool=pool), tls=None)
    path = f"/{version.DESCRIPTOR.package}.ServerReflection/ServerReflectionInfo"
    async with memory_channel(server) as channel:

        def open_stream():
            return channel.bidi_stream(path, version.ServerReflectionResponse)

        yield open_stream, version


async def test_list_services_names_the_services_and_reflection_itself(reflect):
    open_stream, pb = reflect
    async with open_stream() as call:
        response = await Reflection(call, pb).ask(list_services="*")
    names = [service.name for service in response.list_services_response.service]
    assert names == ["purgatory.sample.Sample", *REFLECTION_SERVICES]


async def test_a_file_comes_with_its_dependencies_once_per_stream(reflect):
    open_stream, pb = reflect
    async with open_stream() as call:
        reflection = Reflection(call, pb)
        # Breadth first, as grpc-go: the file, then what it imports, and so on.
        assert await reflection.files(file_containing_symbol="purgatory.sample.Sample") == [
            "sample.proto",
            "base.proto",
            TIMESTAMP,
        ]
        # Asked again: the file itself, but its dependencies were sent already.
        assert await reflection.files(file_by_filename="sample.proto") == ["sample.proto"]
        assert await reflection.files(file_by_filename="base.proto") == ["base.proto"]
    # A new stream knows nothing yet.
    async with open_stream() as call:
        assert await Reflection(call, pb).files(file_by_filename="base.proto") == [
            "base.proto",
            TIMESTAMP,
        ]


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("purgatory.sample.Sample", "sample.proto"),  # a service
        ("purgatory.sample.Sample.Chat", "sample.proto"),  # a method
        ("purgatory.sample.Base", "base.proto"),  # a message
        ("purgatory.sample.Base.Inner", "base.proto"),  # a nested message
        ("purgatory.sample.Base.Kind", "base.proto"),  # a nested enum
        ("purgatory.sample.Base.at", "base.proto"),  # a field
        ("purgatory.sample.note", "sample.proto"),  # an extension
        ("google.protobuf.Timestamp", TIMESTAMP),  # a dependency's message
    ],
)
async def test_file_containing_symbol(reflect, symbol, file):
    open_stream, pb = reflect
    async with open_stream() as call:
        assert (await Reflection(call, pb).files(file_containing_symbol=symbol))[0] == file


async def test_extensions(reflect):
    open_stream, pb = reflect
    async with open_stream() as call:
        reflection = Reflection(call, pb)
        extension = pb.ExtensionRequest(
            containing_type="purgatory.sample.Base", extension_number=150
        )
        assert (await reflection.files(file_containing_extension=extension))[0] == "sample.proto"
        response = await reflection.ask(all_extension_numbers_of_type="purgatory.sample.Base")
        numbers = response.all_extension_numbers_response
        assert (numbers.base_type_name, list(numbers.extension_number)) == (
            "purgatory.sample.Base",
            [100, 150],
        )
        # A known type without extensions: an empty list, not an error.
        response = await reflection.ask(all_extension_numbers_of_type="purgatory.sample.Base.Inner")
        assert list(response.all_extension_numbers_response.extension_number) == []


async def test_questions_without_an_answer_are_not_found_and_the_stream_goes_on(reflect):
    open_stream, pb = reflect
    async with open_stream() as call:
        reflection = Reflection(call, pb)
        missing_extension = pb.ExtensionRequest(
            containing_type="purgatory.sample.Base", extension_number=120
        )
        unknown_type = pb.ExtensionRequest(containing_type="no.Such", extension_number=100)
        for question in [
            {"file_containing_symbol": "purgatory.sample.Nope"},
            {"file_containing_symbol": "purgatory.sample.Sample.Nope"},  # no such method
            {"file_containing_symbol": ""},
            {"file_by_filename": "nope.proto"},
            {"file_containing_extension": missing_extension},
            {"file_containing_extension": unknown_type},
            {"all_extension_numbers_of_type": "no.Such"},
        ]:
            status, message = await reflection.error(**question)
            assert status is Status.NOT_FOUND, question
            assert "not found" in message
        status, _ = await reflection.error()  # asks nothing
        assert status is Status.INVALID_ARGUMENT
        # Still answering, on the same stream.
        assert await reflection.files(file_by_filename="sample.proto") == [
            "sample.proto",
            "base.proto",
            TIMESTAMP,
        ]


async def test_only_the_files_of_the_listed_services_are_served(pool, reflect):
    # other.proto is in the pool but no listed service needs it; internal.proto is added to
    # the pool after the server was built (a module imported later, say an internal API).
    internal = descriptor_pb2.FileDescriptorProto(
        name="internal.proto", package="purgatory.internal", dependency=["base.proto"]
    )
    internal.message_type.add(name="Secret").field.add(
        name="base",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".purgatory.sample.Base",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    try:
        pool.FindFileByName("internal.proto")
    except KeyError:
        pool.Add(internal)
    open_stream, pb = reflect
    async with open_stream() as call:
        reflection = Reflection(call, pb)
        for question in [
            {"file_by_filename": "other.proto"},
            {"file_by_filename": "internal.proto"},
            {"file_containing_symbol": "purgatory.sample.Other"},
            {"file_containing_symbol": "purgatory.internal.Secret"},
            {"file_containing_symbol": "purgatory.internal.Secret.base"},
            {"all_extension_numbers_of_type": "purgatory.internal.Secret"},
        ]:
            status, message = await reflection.error(**question)
            # Told apart from a name that does not exist by nothing: the same answer.
            assert (status, "not found" in message) == (Status.NOT_FOUND, True), question
        # What the listed services need is still served, dependencies included.
        assert await reflection.files(file_containing_symbol="google.protobuf.Timestamp") == [
            TIMESTAMP
        ]


def test_a_service_the_pool_does_not_know_is_refused_at_once(pool):
    with pytest.raises(ValueError, match=r"no\.such\.Service"):
        reflection_methods(["no.such.Service"], pool=pool)


def test_service_names_come_from_the_method_paths():
    async def handler(request, call):
        raise AssertionError("never called")

    methods = [
        RpcMethod(path, v1.ServerReflectionRequest, v1.ServerReflectionResponse, handler)
        for path in ["/a.B/One", "/c.D/Two", "/a.B/Three"]
    ]
    assert service_names(methods) == ["a.B", "c.D"]
