"""gRPC server reflection (grpc/grpc doc/server-reflection.md), v1 and v1alpha, for any services.

    methods = [*my_methods]
    server = Server([*methods, *reflection_methods(service_names(methods))], tls=...)

Tools such as grpcurl, Postman, Evans and grpcio-reflection's client ask a server, on one
bidirectional stream, which services it serves and for the protobuf file descriptors that
define them; with those they can build requests without a copy of the .proto files.

Everything is answered from a protobuf descriptor pool (the default pool: the generated
modules register themselves there when imported), by full names, never by Python modules: the
services are given as names ("grpc.health.v1.Health") and looked up once, when the methods are
built, so a generated module that moves to another package changes nothing here, and a name
whose module has not been imported is refused at startup rather than at the first question.

Only what the listed services need is ever answered: the files that define them and, transitively,
the files those import, fixed when the methods are built. Anything else in the pool (a module
imported for internal use, now or later) is NOT_FOUND like a name that does not exist, so
reflection never describes more than the server serves.

Files are answered the way grpc-go answers them: the file asked for, then those of its
transitive dependencies not yet sent on this stream (each once per stream), so a client can
build the file into its own pool. A question with no answer (an unknown symbol, file, type or
extension) gets an ErrorResponse with NOT_FOUND, and the stream goes on.

Caveat for tests: grpcio-reflection's own generated module registers the same
`grpc.reflection.v1alpha` messages under another file name, and a descriptor pool refuses a
symbol defined twice; a process that imports both cannot import this module. Its client is
therefore run in a process of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from jobworker._pb.grpc.reflection.v1 import reflection_pb2 as v1
from jobworker._pb.grpc.reflection.v1alpha import reflection_pb2 as v1alpha

from .server import RpcMethod, ServerCall
from .wire import Status

__all__ = [
    "REFLECTION_SERVICES",
    "reflection_methods",
    "service_names",
]

# The two versions are the same protocol under two packages (wire-identical messages).
_VERSIONS: tuple[ModuleType, ...] = (v1, v1alpha)
REFLECTION_SERVICES = tuple(
    module.DESCRIPTOR.services_by_name["ServerReflection"].full_name for module in _VERSIONS
)


def service_names(methods: Iterable[RpcMethod]) -> list[str]:
    """The full names of the services `methods` belong to ("/pkg.Svc/Method" → "pkg.Svc"), in
    the order they first appear."""
    names: dict[str, None] = {}
    for method in methods:
        service, _, _ = method.path.lstrip("/").rpartition("/")
        names.setdefault(service)
    return list(names)


def reflection_methods(
    services: Iterable[str], *, pool: descriptor_pool.DescriptorPool | None = None
) -> list[RpcMethod]:
    """The ServerReflectionInfo methods of v1 and v1alpha, listing `services` (full names) and
    the reflection services themselves, and answering from `pool` (default: the default pool).

    Raises ValueError for a service the pool does not know (its generated module has not been
    imported): a server that cannot describe what it serves should not start."""
    pool = pool if pool is not None else descriptor_pool.Default()
    listed: dict[str, None] = {}
    for name in [*services, *REFLECTION_SERVICES]:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(
                f"service {name!r} is not in the descriptor pool (import its generated module)"
            ) from None
        listed.setdefault(name)
    reflector = _Reflector(pool, tuple(listed))
    methods = []
    for module in _VERSIONS:
        service = module.DESCRIPTOR.services_by_name["ServerReflection"]

        async def handler(requests: Any, call: ServerCall, module: ModuleType = module) -> None:
            await reflector.serve(module, requests, call)

        methods.append(
            RpcMethod(
                f"/{service.full_name}/ServerReflectionInfo",
                module.ServerReflectionRequest,
                module.ServerReflectionResponse,
                handler,
                client_streaming=True,
                server_streaming=True,
            )
        )
    return methods


class _NotFound(Exception):
    pass


class _Reflector:
    def __init__(self, pool: descriptor_pool.DescriptorPool, services: tuple[str, ...]) -> None:
        self._pool = pool
        self._services = services
        # The files of the services and their transitive imports: all that may be answered.
        served: set[str] = set()
        queue = deque(pool.FindServiceByName(name).file for name in services)
        while queue:
            file = queue.popleft()
            if file.name not in served:
                served.add(file.name)
                queue.extend(file.dependencies)
        self._served = frozenset(served)

    def _serves(self, file: FileDescriptor) -> bool:
        return file.name in self._served

    async def serve(self, pb: ModuleType, requests: Any, call: ServerCall) -> None:
        sent: set[str] = set()  # files this stream has been sent: each goes once
        async for request in requests:
            response = pb.ServerReflectionResponse(valid_host=request.host)
            response.original_request.CopyFrom(request)
            try:
                self._answer(pb, request, response, sent)
            except _NotFound as exc:
                response.error_response.error_code = Status.NOT_FOUND
                response.error_response.error_message = str(exc)
            await call.send(response)

    def _answer(self, pb: ModuleType, request: Any, response: Any, sent: set[str]) -> None:
        pool = self._pool
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            response.list_services_response.service.extend(
                pb.ServiceResponse(name=name) for name in self._services
            )
        elif kind == "file_by_filename":
            try:
                file = pool.FindFileByName(request.file_by_filename)
            except KeyError:
                file = None
            if file is None or not self._serves(file):
                raise _NotFound(f"file {request.file_by_filename!r} not found")
            self._files(response, file, sent)
        elif kind == "file_containing_symbol":
            self._files(response, self._file_of_symbol(request.file_containing_symbol), sent)
        elif kind == "file_containing_extension":
            asked = request.file_containing_extension
            try:
                message = pool.FindMessageTypeByName(asked.containing_type)
                extension = pool.FindExtensionByNumber(message, asked.extension_number)
            except KeyError:
                extension = None
            if extension is None or not self._serves(extension.file):
                raise _NotFound(
                    f"extension {asked.extension_number} of {asked.containing_type!r} not found"
                )
            self._files(response, extension.file, sent)
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            try:
                message = pool.FindMessageTypeByName(name)
            except KeyError:
                message = None
            if message is None or not self._serves(message.file):
                raise _NotFound(f"message type {name!r} not found")
            answer = response.all_extension_numbers_response
            answer.base_type_name = message.full_name
            answer.extension_number.extend(
                sorted(
                    extension.number
                    for extension in pool.FindAllExtensions(message)
                    if self._serves(extension.file)
                )
            )
        else:
            response.error_response.error_code = Status.INVALID_ARGUMENT
            response.error_response.error_message = "the request asks nothing (no message_request)"

    def _file_of_symbol(self, symbol: str) -> FileDescriptor:
        pool = self._pool
        try:
            # Messages, enums, services, extensions, fields and enum values, nested or not.
            file = pool.FindFileContainingSymbol(symbol)
        except KeyError:
            pass
        else:
            if self._serves(file):
                return file
            raise _NotFound(f"symbol {symbol!r} not found")
        # A method ("pkg.Svc.Method"): the pool looks up services, not their members.
        parent, _, member = symbol.rpartition(".")
        try:
            service = pool.FindServiceByName(parent)
        except KeyError:
            service = None
        if service is not None and member in service.methods_by_name and self._serves(service.file):
            return service.file
        raise _NotFound(f"symbol {symbol!r} not found")

    @staticmethod
    def _files(response: Any, file: FileDescriptor, sent: set[str]) -> None:
        """The file, always, then its transitive dependencies this stream has not been sent
        (breadth first, as grpc-go does)."""
        out = response.file_descriptor_response.file_descriptor_proto
        out.append(file.serialized_pb)
        sent.add(file.name)
        queue = deque(file.dependencies)
        while queue:
            dependency = queue.popleft()
            if dependency.name in sent:
                continue
            sent.add(dependency.name)
            out.append(dependency.serialized_pb)
            queue.extend(dependency.dependencies)
