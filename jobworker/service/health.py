"""The standard grpc.health.v1 Health service (grpc/grpc doc/health-checking.md).

Check answers SERVING or NOT_SERVING for the server as a whole ("") and for each service it
knows, and NOT_FOUND for any other name, as the protocol requires. Watch sends the status at
once and again on every change, and SERVICE_UNKNOWN (keeping the stream open) for a name it
does not know.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from jobworker._pb.grpc.health.v1 import health_pb2
from jobworker.purgatory import GrpcError, RpcMethod, ServerCall, Status

SERVICE_NAME = "grpc.health.v1.Health"
_Response = health_pb2.HealthCheckResponse


class Health:
    def __init__(self, services: Iterable[str]) -> None:
        self._services = frozenset({"", *services})
        self._serving = True
        self._changed = trio.Event()

    @property
    def serving(self) -> bool:
        return self._serving

    def set_serving(self, serving: bool) -> None:
        """Every known service SERVING (True) or NOT_SERVING (False); watchers are told."""
        if serving != self._serving:
            self._serving = serving
            self._changed.set()
            self._changed = trio.Event()

    def methods(self) -> list[RpcMethod]:
        request, response = health_pb2.HealthCheckRequest, _Response
        return [
            RpcMethod(f"/{SERVICE_NAME}/Check", request, response, self.check),
            RpcMethod(
                f"/{SERVICE_NAME}/Watch", request, response, self.watch, server_streaming=True
            ),
        ]

    def _status(self) -> _Response.ServingStatus.ValueType:
        return _Response.SERVING if self._serving else _Response.NOT_SERVING

    async def check(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> _Response:
        if request.service not in self._services:
            raise GrpcError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        return _Response(status=self._status())

    async def watch(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> None:
        if request.service not in self._services:
            await call.send(_Response(status=_Response.SERVICE_UNKNOWN))
            await trio.sleep_forever()  # the set of services never changes
        sent = None
        while True:
            changed = self._changed  # before reading the status: no change can be missed
            status = self._status()
            if status != sent:
                await call.send(_Response(status=status))
                sent = status
            await changed.wait()
