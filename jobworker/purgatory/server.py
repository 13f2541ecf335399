"""The gRPC server: methods registered with their protobuf types, calls run as tasks.

Each connection is a nursery holding its driver (reader and writer, see driver.py) and one task
per call. A call's task runs in a cancel scope whose deadline is the client's grpc-timeout; a
client's RST_STREAM cancels it at once. Handlers raise `GrpcError` for a status of their
choosing; any other exception is logged here and answered INTERNAL with a generic message —
never a traceback on the wire. Cancellation is never converted into a status.

Graceful shutdown is a ladder (`Server.shutdown`): stop accepting; GOAWAY(2^31-1) and a PING to
every connection; once the PING is answered (the client has seen the GOAWAY) the second GOAWAY
with the real last stream id; then in-flight calls have until the grace deadline to finish;
whatever is left is cancelled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509
from google.protobuf.message import DecodeError, Message

from .driver import Driver
from .tls import TLSConfig, TLSError, TLSStream
from .wire.connection import (
    SHUTDOWN_PING,
    InputEnded,
    MessageReceived,
    PingAcknowledged,
    RequestReceived,
    ServerConnection,
    StreamFailed,
)
from .wire.framing import DEFAULT_MAX_MESSAGE_BYTES
from .wire.metadata import Metadata
from .wire.status import GrpcError, Status

log = logging.getLogger("jobworker.purgatory")


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One method: its path, its message types, and its handler.

    Unary: ``async def handler(request, call) -> response``.
    Server streaming: ``async def handler(request, call) -> None``, sending with ``call.send()``.
    """

    path: str  # "/package.Service/Method"
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, ServerCall], Awaitable[Any]]
    server_streaming: bool = False


class ServerCall:
    """What a handler sees of its call."""

    def __init__(
        self,
        driver: Driver,
        stream_id: int,
        method: RpcMethod,
        request: RequestReceived,
        connection_info: ConnectionInfo,
    ) -> None:
        self._driver = driver
        self._connection: ServerConnection = driver.connection
        self.stream_id = stream_id
        self.method = method
        self.metadata: Metadata = request.metadata
        self.deadline = (
            trio.current_time() + request.timeout_s if request.timeout_s is not None else math.inf
        )
        self.connection = connection_info
        self.trailing_metadata: Metadata = ()
        self._scope = trio.CancelScope(deadline=self.deadline)
        self._request: tuple[bytes, int] | None = None
        self._extra_request = False
        self._input_ended = trio.Event()
        self._failed: StreamFailed | None = None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.connection.peer_certificate

    @property
    def identity(self) -> Any:
        return self.connection.identity

    def send_initial_metadata(self, metadata: Metadata) -> None:
        self._connection.send_headers(self.stream_id, metadata)
        self._driver.push()

    async def send(self, message: Message) -> None:
        """Send one response message; waits while the client is not reading (flow control)."""
        if not isinstance(message, self.method.response_type):
            raise TypeError(
                f"{self.method.path} sends {self.method.response_type.__name__}, "
                f"not {type(message).__name__}"
            )
        await self._driver.send_message(self.stream_id, message.SerializeToString())

    # -- driven by the connection task --

    def _on_message(self, event: MessageReceived) -> None:
        if self._request is None:
            self._request = (event.payload, event.flow_controlled_bytes)
        else:
            self._extra_request = True
            self._connection.acknowledge(self.stream_id, event.flow_controlled_bytes)

    async def _receive_request(self) -> Message:
        # Usually the whole request came in the read that started the call: then no wait, and
        # no extra scheduling round (the handler's own awaits are its checkpoints).
        if not self._input_ended.is_set():
            await self._input_ended.wait()
        if self._request is None or self._extra_request:
            raise GrpcError(
                Status.INTERNAL,
                f"{self.method.path} takes exactly one request message",
            )
        payload, flow_bytes = self._request
        # Usually no WINDOW_UPDATE comes of it (h2 returns window in large steps); when one
        # does, it goes out now rather than after the handler.
        self._connection.acknowledge(self.stream_id, flow_bytes)
        self._driver.push()
        try:
            return self.method.request_type.FromString(payload)
        except DecodeError:
            raise GrpcError(Status.INTERNAL, "could not parse the request message") from None


@dataclass(slots=True)
class ConnectionInfo:
    """Per connection: the verified peer and whatever `identify` made of it (done once)."""

    peer_address: str
    peer_certificate: x509.Certificate | None
    identity: Any = None


class Server:
    def __init__(
        self,
        methods: Iterable[RpcMethod] = (),
        *,
        tls: TLSConfig | None,
        identify: Callable[[x509.Certificate | None], Any] | None = None,
        max_concurrent_streams: int = 100,
        max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """`tls=None` serves plaintext h2c: for tests over memory streams only.

        `identify` runs once per connection with the verified client certificate; its result
        is `call.identity` for every call on that connection. If it raises GrpcError, every
        call on the connection gets that status.
        """
        self._methods: dict[str, RpcMethod] = {}
        for method in methods:
            self.add(method)
        self._tls = tls
        self._identify = identify
        self._max_concurrent_streams = max_concurrent_streams
        self._max_receive_message_bytes = max_receive_message_bytes
        self._connections: set[_ServerConnection] = set()
        self._accepting: trio.CancelScope | None = None
        self._connections_scope: trio.CancelScope | None = None

    def add(self, method: RpcMethod) -> None:
        if method.path in self._methods:
            raise ValueError(f"{method.path} is registered twice")
        self._methods[method.path] = method

    # --- serving -------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port and serve until cancelled or shut down. Reports the bound
        addresses (port 0 picks a free port)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        async with trio.open_nursery() as connections:
            self._connections_scope = connections.cancel_scope
            with trio.CancelScope() as self._accepting:
                task_status.started(addresses)
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, connections)
            for listener in listeners:
                await listener.aclose()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: say so, keep serving
                log.error("accept failed: %s", exc)
                await trio.sleep(0.1)  # back off while descriptors are exhausted
                continue
            connections.start_soon(self.serve_stream, stream)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection on an accepted byte stream, until it ends."""
        peer = _peer_address(stream)
        certificate = None
        if self._tls is not None:
            tls_stream = TLSStream(stream, self._tls)
            try:
                await tls_stream.do_handshake()  # bounded by the config's handshake timeout
            except TLSError as exc:
                log.info("TLS handshake with %s failed: %s", peer, exc)
                await trio.aclose_forcefully(stream)
                return
            certificate, stream = tls_stream.peer_certificate, tls_stream
        info = ConnectionInfo(peer, certificate)
        refusal = None
        if self._identify is not None:
            try:
                info.identity = self._identify(certificate)
            except GrpcError as exc:
                refusal = exc
        connection = _ServerConnection(self, stream, info, refusal)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:
            # The containment boundary: whatever went wrong in one connection (a bug, a peer
            # finding an edge we did not foresee) ends that connection, never the server.
            log.exception("connection from %s failed", peer)
        finally:
            self._connections.discard(connection)
            await trio.aclose_forcefully(stream)

    async def shutdown(self, grace_period_s: float) -> None:
        """The graceful ladder (see the module docstring). Returns when every connection is
        closed; calls still running after `grace_period_s` are cancelled."""
        if self._accepting is not None:
            self._accepting.cancel()
        deadline = trio.current_time() + grace_period_s
        async with trio.open_nursery() as nursery:
            for connection in list(self._connections):
                nursery.start_soon(connection.drain, deadline)
        if self._connections_scope is not None:
            self._connections_scope.cancel()


class _ServerConnection:
    def __init__(
        self,
        server: Server,
        stream: trio.abc.Stream,
        info: ConnectionInfo,
        refusal: GrpcError | None,
    ) -> None:
        self._server = server
        self._info = info
        self._refusal = refusal
        self._wire = ServerConnection(
            max_message_bytes=server._max_receive_message_bytes,
            max_concurrent_streams=server._max_concurrent_streams,
        )
        self._driver = Driver(self._wire, stream)
        self._calls: dict[int, ServerCall] = {}
        self._nursery: trio.Nursery | None = None
        self._ping_answered = trio.Event()
        self._idle = trio.Event()

    async def run(self) -> None:
        self._wire.initiate()
        self._driver.push()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._driver.run(self._on_event)
            nursery.cancel_scope.cancel()  # the peer is gone: so are its calls

    async def drain(self, deadline: float) -> None:
        """The graceful ladder for this connection; returns early if the client leaves."""
        closed = self._driver.closed
        if not closed.is_set():
            self._wire.start_graceful_shutdown()
            self._driver.wake()
            with trio.move_on_at(deadline):
                await _first_of(self._ping_answered, closed)  # the client saw the GOAWAY
        if not closed.is_set():
            self._wire.finish_graceful_shutdown()
            self._driver.wake()
            with trio.move_on_at(deadline):
                if self._calls:
                    await _first_of(self._idle, closed)
            with trio.move_on_after(1):  # let the last frames out; bounded
                try:
                    await self._driver.flush()
                except trio.BrokenResourceError:
                    pass  # the client left meanwhile: nothing more to say
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _on_event(self, event) -> None:
        if isinstance(event, RequestReceived):
            self._start_call(event)
        elif isinstance(event, MessageReceived):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call._on_message(event)
            else:
                self._wire.acknowledge(event.stream_id, event.flow_controlled_bytes)
        elif isinstance(event, InputEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call._input_ended.set()
        elif isinstance(event, StreamFailed):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call._failed = event
                call._scope.cancel()
        elif isinstance(event, PingAcknowledged) and event.data == SHUTDOWN_PING:
            self._ping_answered.set()
        # ConnectionTerminated: the client is leaving; its calls finish or its stream closes.

    def _start_call(self, request: RequestReceived) -> None:
        stream_id = request.stream_id
        if self._refusal is not None:
            self._wire.send_trailers(stream_id, self._refusal.status, self._refusal.message)
            return
        method = self._server._methods.get(request.method)
        if method is None:
            self._wire.send_trailers(
                stream_id, Status.UNIMPLEMENTED, f"method {request.method} is not implemented"
            )
            return
        call = ServerCall(self._driver, stream_id, method, request, self._info)
        self._calls[stream_id] = call
        if self._idle.is_set():
            self._idle = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call)

    async def _run_call(self, call: ServerCall) -> None:
        wire, stream_id = self._wire, call.stream_id
        status, message, trailers = Status.OK, "", ()
        try:
            with call._scope:
                try:
                    request = await call._receive_request()
                    response = await call.method.handler(request, call)
                    if not call.method.server_streaming:
                        if not isinstance(response, call.method.response_type):
                            raise TypeError(
                                f"{call.method.path} returned {type(response).__name__}, "
                                f"not {call.method.response_type.__name__}"
                            )
                        # One message: queued with the trailers below, one write for both.
                        wire.send_message(stream_id, response.SerializeToString())
                    trailers = call.trailing_metadata
                except Exception as exc:  # the one place errors become statuses
                    status, message, trailers = _status_of(exc, call)
            if call._scope.cancelled_caught:
                if call._failed is not None:
                    return  # the client reset the stream, or the wire failed it: already said
                status, message, trailers = Status.DEADLINE_EXCEEDED, "deadline exceeded", ()
            if wire.stream_open(stream_id):
                wire.send_trailers(stream_id, status, message, trailers)
                if len(self._calls) > 1:
                    # Other calls are running: their answers tend to come in this same
                    # scheduling round, and the writer sends them all in one write.
                    self._driver.wake()
                else:
                    self._driver.push()  # alone: no round to wait for
        finally:
            self._calls.pop(stream_id, None)
            self._driver.forget(stream_id)
            if not self._calls:
                self._idle.set()


async def _first_of(*events: trio.Event) -> None:
    """Wait until any of the events is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


def _status_of(exc: Exception, call: ServerCall) -> tuple[Status, str, Metadata]:
    error = exc
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, GrpcError):
        return error.status, error.message, error.trailers
    if isinstance(error, trio.BrokenResourceError):
        return Status.UNAVAILABLE, "connection lost", ()
    log.exception("%s failed on stream %d", call.method.path, call.stream_id, exc_info=exc)
    return Status.INTERNAL, "internal error", ()


def _peer_address(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "(in-memory)"
    try:
        address = socket.getpeername()
    except OSError:
        return "(unknown)"
    if not isinstance(address, tuple):  # a Unix socket: a path, or nothing (a socketpair)
        return f"unix:{address}" if address else "(unix socket)"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
