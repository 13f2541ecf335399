"""The gRPC client: a channel over one TLS + HTTP/2 connection, multiplexing calls.

    async with open_channel("127.0.0.1", 50051, tls=TLSConfig.client(...)) as channel:
        reply = await channel.unary("/pkg.Svc/Method", request, ReplyType, timeout_s=5)
        async with channel.server_stream("/pkg.Svc/Watch", request, ChunkType) as chunks:
            async for chunk in chunks:
                ...
        async with channel.client_stream("/pkg.Svc/Upload", ReplyType) as call:
            for piece in pieces:
                await call.send(piece)
            reply = await call.response()  # half-closes, then the one response
        async with channel.bidi_stream("/pkg.Svc/Chat", ReplyType) as call:
            await call.send(hello)
            call.done_sending()
            async for reply in call:
                ...

A non-OK status raises `GrpcError` (code, message, trailing metadata). A deadline becomes
DEADLINE_EXCEEDED locally as well as a grpc-timeout for the server. Leaving a stream early, or
being cancelled mid-call, or `cancel()`, resets the stream (RST_STREAM CANCEL), so the server's
handler is cancelled too. A streamed request's `send()` waits while the server's window is
closed: a server that does not read holds its client after one window. Received messages are
acknowledged to HTTP/2 only as they are consumed, so a slow consumer slows the server down
instead of filling memory.
"""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from .driver import Driver
from .tls import TLSConfig, TLSStream
from .wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CallEnded,
    ClientConnection,
    ConnectionTerminated,
    GrpcError,
    MessageReceived,
    Metadata,
    ProtocolError,
    ResponseReceived,
    Status,
)

R = TypeVar("R", bound=Message)


class _Call:
    """One call's state, as the connection's reader learns it; the caller's task waits on
    `changed` and reads."""

    __slots__ = ("changed", "ended", "initial_metadata", "messages", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.messages: collections.deque[MessageReceived] = collections.deque()
        self.initial_metadata: Metadata = ()
        self.ended: CallEnded | None = None
        self.changed = trio.Event()

    # -- what the connection tells the call

    def respond(self, event: ResponseReceived) -> None:
        self.initial_metadata = event.metadata
        self.notify()

    def deliver(self, event: MessageReceived) -> None:
        self.messages.append(event)
        self.notify()

    def end(self, event: CallEnded) -> None:
        self.ended = event
        self.notify()

    def notify(self) -> None:
        """Wake the caller (also when the connection is lost)."""
        self.changed.set()
        self.changed = trio.Event()


class Channel:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._calls: dict[int, _Call] = {}
        # Set when the server sent GOAWAY: calls in flight go on, new ones fail UNAVAILABLE.
        self.going_away = trio.Event()
        self._stream_freed = trio.Event()  # renewed each time a call ends

    # --- calls ---------------------------------------------------------------------------------

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> R:
        with _deadline_scope(timeout_s):
            call = await self._start(method, request, metadata, timeout_s)
            try:
                response = await self._next(call, response_type)
                if response is None:
                    raise GrpcError(Status.INTERNAL, "the server sent no response message")
                extra = await self._next(call, response_type)
                if extra is not None:
                    raise GrpcError(Status.INTERNAL, "the server sent more than one response")
                return response
            finally:
                self._finish(call)
        raise GrpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")

    @asynccontextmanager
    async def client_stream(
        self,
        method: str,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[StreamingCall[R]]:
        """A client-streaming call: `send()` the requests, then `await call.response()`."""
        async with self._streaming(method, response_type, timeout_s, metadata) as call:
            yield call

    @asynccontextmanager
    async def bidi_stream(
        self,
        method: str,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[StreamingCall[R]]:
        """A bidirectional call: `send()` requests and iterate over the responses, in any order
        (from two tasks, say); `done_sending()` half-closes."""
        async with self._streaming(method, response_type, timeout_s, metadata) as call:
            yield call

    @asynccontextmanager
    async def _streaming(
        self,
        method: str,
        response_type: type[R],
        timeout_s: float | None,
        metadata: Metadata,
    ) -> AsyncIterator[StreamingCall[R]]:
        with _deadline_scope(timeout_s) as scope:
            call = await self._start(method, None, metadata, timeout_s)
            streaming = StreamingCall(self, call, response_type)
            try:
                yield streaming
            finally:
                self._finish(call, half_closed=streaming._done_sending)
        if scope.cancelled_caught:
            raise GrpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")

    @asynccontextmanager
    async def server_stream(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[ResponseStream[R]]:
        with _deadline_scope(timeout_s) as scope:
            call = await self._start(method, request, metadata, timeout_s)
            try:
                yield ResponseStream(self, call, response_type, scope)
            finally:
                self._finish(call)
        if scope.cancelled_caught:
            raise GrpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")

    # --- internals -----------------------------------------------------------------------------

    async def _start(
        self, method: str, request: Message | None, metadata: Metadata, timeout_s: float | None
    ) -> _Call:
        """Open the call; with `request`, send it and half-close (unary and server streaming),
        without, leave the request stream open for `StreamingCall.send`."""
        # Past the server's MAX_CONCURRENT_STREAMS a call waits for a free stream, not fails.
        driver = self._driver
        while not driver.stream_available and not driver.closed.is_set():
            await self._stream_freed.wait()
        if driver.closed.is_set():
            raise GrpcError(
                Status.UNAVAILABLE, self._lost_reason("the connection is closed")
            ) from driver.broken
        try:
            if request is None:
                stream_id = driver.open_call(method, metadata, timeout_s)
            else:
                stream_id = driver.start_call(
                    method, metadata, timeout_s, request.SerializeToString()
                )
        except ProtocolError as exc:  # the server sent GOAWAY
            raise GrpcError(Status.UNAVAILABLE, str(exc)) from None
        call = self._calls[stream_id] = _Call(stream_id)
        return call

    async def _next(self, call: _Call, response_type: type[R]) -> R | None:
        """The next response message, or None once the call ended with OK."""
        while not call.messages:
            if call.ended is not None:
                if call.ended.status is Status.OK:
                    return None
                raise GrpcError(call.ended.status, call.ended.message, trailers=call.ended.metadata)
            if self._driver.closed.is_set():
                # Chained to the cause, typed (a TLSCertificateRejected, say): callers branch on
                # `__cause__`, not on the message's words.
                raise GrpcError(
                    Status.UNAVAILABLE, self._lost_reason("the connection was lost")
                ) from self._driver.broken
            await call.changed.wait()
        event = call.messages.popleft()
        self._driver.acknowledge(call.stream_id, event.flow_controlled_bytes)
        try:
            return response_type.FromString(event.payload)
        except DecodeError:
            raise GrpcError(Status.INTERNAL, "could not parse the response message") from None

    def _finish(self, call: _Call, *, half_closed: bool = True) -> None:
        """Leaving a call: if it has not ended, the server must stop working on it. One whose
        request we never ended is reset even when the server has answered: our half of the
        stream would otherwise stay open, and count against the server's stream limit."""
        driver = self._driver
        self._calls.pop(call.stream_id, None)
        driver.forget(call.stream_id)
        if call.ended is None or not half_closed:
            driver.reset(call.stream_id)
            self._free_stream()
        # Messages nobody will read: give their window back.
        for event in call.messages:
            driver.acknowledge(call.stream_id, event.flow_controlled_bytes)

    def _on_event(self, event) -> None:
        if isinstance(event, ConnectionTerminated):
            self.going_away.set()  # calls above its last stream end by CallEnded
            return
        call = self._calls.get(event.stream_id)
        if call is None:
            if isinstance(event, MessageReceived):
                self._driver.acknowledge(event.stream_id, event.flow_controlled_bytes)
            return
        if isinstance(event, MessageReceived):
            call.deliver(event)
        elif isinstance(event, ResponseReceived):
            call.respond(event)
        elif isinstance(event, CallEnded):
            call.end(event)
            self._free_stream()

    def _free_stream(self) -> None:
        freed, self._stream_freed = self._stream_freed, trio.Event()
        freed.set()

    def _lost_reason(self, what: str) -> str:
        broken = self._driver.broken
        return f"{what}: {broken}" if broken is not None and str(broken) else what

    def _lost(self) -> None:
        for call in self._calls.values():
            call.notify()
        self._free_stream()


class _CallMetadata:
    """What the server said of a call besides its messages."""

    _call: _Call

    @property
    def initial_metadata(self) -> Metadata:
        return self._call.initial_metadata

    @property
    def trailing_metadata(self) -> Metadata:
        return self._call.ended.metadata if self._call.ended is not None else ()


class ResponseStream(_CallMetadata, Generic[R]):
    """The responses of a server-streaming call, as an async iterator."""

    def __init__(self, channel: Channel, call: _Call, response_type: type[R], scope) -> None:
        self._channel = channel
        self._call = call
        self._response_type = response_type
        self._scope = scope

    def __aiter__(self) -> ResponseStream[R]:
        return self

    async def __anext__(self) -> R:
        message = await self._channel._next(self._call, self._response_type)
        if message is None:
            raise StopAsyncIteration
        return message


class StreamingCall(_CallMetadata, Generic[R]):
    """A call whose request is a stream of messages: client streaming (send, then
    `response()`) or bidirectional (send and receive, iterating over the responses).

    `send()` waits while HTTP/2 flow control holds the message back: at most one message is
    queued per call. Once the server has ended the call, `send()` raises its GrpcError if the
    status is not OK; after an OK end (a server may answer before the client has finished) what
    is sent is dropped, as the server has asked (RST_STREAM NO_ERROR). `cancel()` resets the
    stream (RST_STREAM CANCEL): the server's handler is cancelled, and this call's receives
    raise GrpcError(CANCELLED).
    """

    def __init__(self, channel: Channel, call: _Call, response_type: type[R]) -> None:
        self._channel = channel
        self._call = call
        self._response_type = response_type
        self._done_sending = False

    async def send(self, message: Message) -> None:
        """Send one request message (serialized at once, not kept while waiting)."""
        channel, call = self._channel, self._call
        driver = channel._driver
        if call.ended is not None:  # first: a cancelled call says CANCELLED, not "closed"
            await trio.lowlevel.checkpoint()
            if call.ended.status is not Status.OK:
                raise GrpcError(call.ended.status, call.ended.message, trailers=call.ended.metadata)
            return
        if self._done_sending:
            raise trio.ClosedResourceError("done_sending() was called: the request is over")
        payload = message.SerializeToString()
        del message
        if not driver.stream_open(call.stream_id):
            await trio.lowlevel.checkpoint()
            raise GrpcError(
                Status.UNAVAILABLE, channel._lost_reason("the connection was lost")
            ) from driver.broken
        try:
            await driver.send_message(call.stream_id, payload)
        except trio.BrokenResourceError:
            raise GrpcError(
                Status.UNAVAILABLE, channel._lost_reason("the connection was lost")
            ) from driver.broken
        # The wait on flow control also ends when the call does (cancel(), the server's
        # error): the message was dropped with the stream, and the caller must hear why.
        ended = call.ended
        if ended is not None and ended.status is not Status.OK:
            raise GrpcError(ended.status, ended.message, trailers=ended.metadata)

    def done_sending(self) -> None:
        """Half-close: no more request messages (END_STREAM, behind those already sent).
        Idempotent; nothing to do once the call has ended."""
        if self._done_sending:
            return
        self._done_sending = True
        driver = self._channel._driver
        if self._call.ended is None and driver.stream_open(self._call.stream_id):
            driver.end_input(self._call.stream_id)

    async def receive(self) -> R | None:
        """The next response message, or None once the call has ended OK; a non-OK status
        raises GrpcError."""
        return await self._channel._next(self._call, self._response_type)

    async def response(self) -> R:
        """Client streaming: half-close (if not done yet) and return the one response."""
        self.done_sending()
        response = await self.receive()
        if response is None:
            raise GrpcError(Status.INTERNAL, "the server sent no response message")
        extra = await self.receive()
        if extra is not None:
            raise GrpcError(Status.INTERNAL, "the server sent more than one response")
        return response

    def cancel(self) -> None:
        """Abandon the call: RST_STREAM CANCEL, so the server's handler is cancelled."""
        call = self._call
        if call.ended is not None:
            return
        channel = self._channel
        channel._driver.reset(call.stream_id)
        call.end(CallEnded(call.stream_id, Status.CANCELLED, "the call was cancelled", ()))
        channel._free_stream()
        self._done_sending = True

    def __aiter__(self) -> StreamingCall[R]:
        return self

    async def __anext__(self) -> R:
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message


@asynccontextmanager
async def open_channel(
    host: str,
    port: int,
    *,
    tls: TLSConfig,
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncIterator[Channel]:
    """Connect, handshake (TLS 1.3, mutual, ALPN h2) and yield a channel; close on exit."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = TLSStream(tcp, tls)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with open_channel_over(
        stream, authority=authority, max_receive_message_bytes=max_receive_message_bytes
    ) as channel:
        yield channel


@asynccontextmanager
async def open_channel_over(
    stream: trio.abc.Stream,
    *,
    authority: str,
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncIterator[Channel]:
    """A channel over an established byte stream (tests use memory streams)."""
    driver = Driver(
        ClientConnection(authority=authority, max_message_bytes=max_receive_message_bytes), stream
    )
    driver.initiate()
    channel = Channel(driver)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            try:
                await driver.run(channel._on_event)
            finally:
                channel._lost()

        nursery.start_soon(run)
        try:
            yield channel
        except BaseException as exc:
            # Raised again, bare, once the nursery has closed: through the nursery it would
            # come out wrapped in an ExceptionGroup the caller did not ask for.
            body_error = exc
        finally:
            # Shielded, and before the nursery is cancelled: an await in a cancelled scope
            # would raise Cancelled here, and the nursery would swallow it together with the
            # exception that is leaving the block (which must reach the caller).
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await driver.close()
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


def _deadline_scope(timeout_s: float | None) -> trio.CancelScope:
    return trio.CancelScope(
        deadline=trio.current_time() + timeout_s if timeout_s is not None else math.inf
    )
