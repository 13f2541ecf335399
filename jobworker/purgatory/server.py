"""The gRPC server: methods registered with their protobuf types, calls run as tasks.

Each connection is a nursery holding its driver (reader and writer, see driver.py) and one task
per call. A call's task runs in a cancel scope whose deadline is the client's grpc-timeout; a
client's RST_STREAM cancels it at once. Handlers raise `GrpcError` for a status of their
choosing. Any other exception goes to the server's `errors` hook (the application's one table
of domain errors to statuses); what it does not map is logged here and answered INTERNAL with a
generic message — never a traceback on the wire. `_status_of` is the one place a handler's
exception becomes a status. Cancellation is never converted into a status.

Everything the connection learns about a call it tells the call (`deliver`, `end_input`,
`fail`); everything a call says goes through the driver's commands.

Every knob is a field of one `ServerLimits` (limits.py). Connections are admitted and timed:
the TLS handshake is bounded by the TLS config; then the client has `preface_timeout_s` to send
its HTTP/2 preface, `first_request_timeout_s` to start a call, and once no call has been open
for `idle_timeout_s` the connection is closed gracefully (GOAWAY, then close: grpc-go's
MaxConnectionIdle). A unary or server-streaming call's request must arrive in full within
`request_timeout_s` of its headers (DEADLINE_EXCEEDED otherwise): an open call keeps a
connection from being idle, so streams of headers alone would hold it forever. A streaming
request (client-streaming, bidirectional) lasts as long as its call by design: its deadline and
`max_concurrent_streams` bound it, and its unread messages are bounded by the stream's window
(a message is acknowledged only once the handler has taken it). A peer that vanished without
closing (no FIN) is found by TCP keepalive on the accepted socket and, above it, by a keepalive
PING while its calls are open (ServerLimits: tcp_keepalive_*, keepalive_*). A connection beyond
its identity's cap answers its first call RESOURCE_EXHAUSTED, naming the cap, and closes (or closes
after a second without a call): the client learns why, which a bare close or a GOAWAY before
any stream would not tell it (clients retry those transparently, reconnecting in a loop). At most
`limits.REFUSALS_PER_IDENTITY` such connections per identity wait to be told; any more are
closed right after the handshake.

A call whose stream is gone (the client reset it, even in the same read as the request) ends
quietly: its handler is cancelled, or never started, and nothing is logged for it. A handler
cancelled that way may take a while to finish (cleanup, a shielded section); until it does it
still counts against `max_concurrent_streams`, plus `lingering_handler_allowance`, and new
streams beyond that are refused (REFUSED_STREAM): resetting streams cannot pile up handlers.

Graceful shutdown is a ladder (`Server.shutdown`): stop accepting; GOAWAY(2^31-1) and a PING to
every connection; once the PING is answered (the client has seen the GOAWAY) the second GOAWAY
with the real last stream id; then in-flight calls have until the grace deadline to finish;
whatever is left is cancelled.

Observing: the server's `observe` hook is told of every call once it has ended (`CallEnded`:
method, connection and identity, status, duration, the request and response when there were
some), refused ones included — a connection whose `identify` failed, an unknown method, a
stream refused while handlers linger, a request the wire answered or refused before any handler
(metadata over the limit, an unsupported encoding, a bad grpc-timeout or content-type, a stream
over the stream limit or opened while draining: the status the client was told, a duration of
~0, `method` None unless the path names one); a call the wire answered for its handler (a message
over the size limit) has that answer's status; a call that ended without an answer (reset by
the client, its connection gone) is CANCELLED. The hook runs on the call's path, synchronously:
it must be cheap, and whatever it raises is logged, never the call's concern.
"""

from __future__ import annotations

import array
import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio
from cryptography import x509
from google.protobuf.message import DecodeError, Message

from .driver import Driver
from .limits import RateLimitedLog, ServerLimits
from .tls import TLSConfig, TLSError, TLSStream
from .tls.config import SUBJECT_CHARS, printable
from .wire import (
    SHUTDOWN_PING,
    ConnectionTerminated,
    GrpcError,
    InputEnded,
    MessageReceived,
    Metadata,
    PingAcknowledged,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    Status,
    StreamFailed,
)

log = logging.getLogger("jobworker.purgatory")

Q = TypeVar("Q", bound=Message)

# The application's mapping of a handler's exception to a status: a GrpcError, or None for
# "not mine" (then INTERNAL, logged).
ErrorMapper = Callable[[Exception], "GrpcError | None"]
Identify = Callable[[x509.Certificate | None], Any]
CallObserver = Callable[["CallEnded"], None]

# The client's connection preface (24 bytes) and the header of its first frame, SETTINGS: once
# this much has arrived (and h2 did not reject it) the client speaks HTTP/2.
_PREFACE_BYTES = 24 + 9
# An idle connection's GOAWAY is answered by a PING's acknowledgement within this time, or the
# connection is closed without waiting further.
_IDLE_GOAWAY_S = 10.0
# The PING of the server's keepalive (see ServerLimits), told apart from the shutdown's.
_KEEPALIVE_PING = b"liveness"
# How long a connection beyond its identity's cap waits for the call it will refuse.
_OVER_CAP_FIRST_REQUEST_S = 1.0
# How much of a failed handshake's error a log line shows (it embeds the peer's words).
_HANDSHAKE_ERROR_CHARS = 1024


class _Inbox:
    """A streaming request's messages, delivered and not yet taken by the handler, packed:
    their payloads end to end in one buffer, their lengths and window shares in two arrays.

    The stream's window bounds the bytes held, not the messages: a 5-byte empty message is a
    whole message, and as one event object in a queue it cost ~14 bytes of memory per byte
    on the wire, so a client flooding a handler that does not read could make a window of
    1 MiB cost the server 14. Packed, a message costs its payload plus 8 bytes (1.7 bytes
    per wire byte measured at worst, empty messages), and no call is ever failed for sending
    small messages: a cap on their number would also refuse a slow, legitimate stream of small
    ones (a line-buffered `jobctl run -i` into a job that is not reading its stdin)."""

    __slots__ = ("_data", "_start", "_lengths", "_shares", "_next")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # where the next payload begins in _data
        self._lengths = array.array("I")
        self._shares = array.array("I")
        self._next = 0  # the index of the next message in the arrays

    def __len__(self) -> int:
        return len(self._lengths) - self._next

    @property
    def payload_bytes(self) -> int:
        """The payload bytes held."""
        return len(self._data) - self._start

    def append(self, payload: bytes, flow_controlled_bytes: int) -> None:
        self._data += payload
        self._lengths.append(len(payload))
        self._shares.append(flow_controlled_bytes)

    def popleft(self) -> tuple[bytes, int]:
        """The oldest message's payload and its window share (IndexError when empty)."""
        index = self._next
        length, share = self._lengths[index], self._shares[index]
        start = self._start
        payload = bytes(self._data[start : start + length])
        self._next, self._start = index + 1, start + length
        if self._next == len(self._lengths):
            self._reset()
        elif self._next >= 1024 and self._next * 2 >= len(self._lengths):
            # Compact once half is taken: each byte is moved at most once more on average.
            del self._lengths[: self._next], self._shares[: self._next], self._data[: self._start]
            self._next = self._start = 0
        return payload, share

    def take_shares(self) -> list[int]:
        """Empty the inbox: the window shares of the messages nobody took."""
        shares = self._shares[self._next :].tolist()
        self._reset()
        return shares

    def _reset(self) -> None:
        self._data = bytearray()
        self._lengths = array.array("I")
        self._shares = array.array("I")
        self._next = self._start = 0


class _StreamGone(trio.BrokenResourceError):
    """The call's stream can carry nothing more: reset by the client, or the connection ended."""


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One method: its path, its message types, and its handler. The two flags are the
    .proto's ``stream`` keywords (as in a MethodDescriptorProto), and choose the handler's form:

    Unary: ``async def handler(request, call) -> response``.
    Server streaming: ``async def handler(request, call) -> None``, sending with ``call.send()``.
    Client streaming: ``async def handler(requests, call) -> response``.
    Bidirectional: ``async def handler(requests, call) -> None``, sending with ``call.send()``.

    ``requests`` is a `RequestStream`: an async iterator of the decoded request messages that
    ends when the client half-closes. Each message's flow-control window goes back to the
    client only when the handler takes it, so a handler that does not read stops its client
    after one window. A handler may answer (return, or raise) before the client has finished
    sending: the call ends then, and the client is told to stop sending.
    """

    path: str  # "/package.Service/Method"
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, ServerCall], Awaitable[Any]]
    server_streaming: bool = False
    client_streaming: bool = False


@dataclass(frozen=True, slots=True)
class CallEnded:
    """One call, once it has ended: what the server's `observe` hook is told."""

    path: str  # what the client asked for, registered or not
    method: RpcMethod | None  # None: no such method (UNIMPLEMENTED)
    connection: ConnectionInfo
    status: Status
    message: str  # the status message sent ("" for OK)
    duration_s: float  # from its headers to its trailers (or its end), on the Trio clock
    # Decoded, if it got that far; of a streaming request, the first message the handler took.
    request: Message | None = None
    response: Message | None = None  # a unary call's answer


class ServerCall:
    """What a handler sees of its call."""

    def __init__(
        self,
        driver: Driver,
        stream_id: int,
        method: RpcMethod,
        request: RequestReceived,
        connection_info: ConnectionInfo,
        request_timeout_s: float = math.inf,
    ) -> None:
        self._driver = driver
        self._request_timeout_s = request_timeout_s
        self.stream_id = stream_id
        self.method = method
        self.metadata: Metadata = request.metadata
        self.began = trio.current_time()
        timeout_s = request.timeout_s
        self.deadline = self.began + timeout_s if timeout_s is not None else math.inf
        self.connection = connection_info
        self.trailing_metadata: Metadata = ()
        self._scope = trio.CancelScope(deadline=self.deadline)
        self._request: tuple[bytes, int] | None = None
        self._request_unacknowledged = 0  # its window, until the handler's task takes it
        self._extra_request = False
        # A streaming request's messages, delivered and not yet taken by the handler: bounded
        # by the stream's window, since none of them has been acknowledged.
        self._inbox = _Inbox()
        self._arrived = trio.Event()  # renewed each time: a message, the end, a failure
        self._input_ended = trio.Event()
        self._failed: StreamFailed | None = None
        # A streaming request's first message, once the handler has taken it: what the
        # observer is told as the call's request (it names what the call is about, e.g. the
        # job of a WriteJobInput). The messages after it are not kept.
        self._first_request: Message | None = None
        self.started = False  # its task has begun: from then on it counts as a running handler

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.connection.peer_certificate

    @property
    def identity(self) -> Any:
        return self.connection.identity

    @property
    def failed(self) -> bool:
        """The stream is gone (reset by the client, or failed by the wire): nobody listens."""
        return self._failed is not None

    def send_initial_metadata(self, metadata: Metadata) -> None:
        """Send the response headers now. On a stream the client has reset this does nothing:
        the handler is being cancelled, and its next checkpoint says so."""
        if not self._driver.stream_open(self.stream_id):
            if self._failed is not None:
                return
            raise _StreamGone(f"stream {self.stream_id} is closed")
        self._driver.send_headers(self.stream_id, metadata)

    async def send(self, message: Message) -> None:
        """Send one response message; waits while the client is not reading (flow control).

        The message is serialized at once and not kept: a handler that passes it as a
        temporary (``await call.send(make())``) holds no copy of it while the client stalls.
        """
        if not isinstance(message, self.method.response_type):
            raise TypeError(
                f"{self.method.path} sends {self.method.response_type.__name__}, "
                f"not {type(message).__name__}"
            )
        payload = message.SerializeToString()
        del message  # while we wait on flow control, only the payload is held (see above)
        await self.send_serialized(payload)

    async def send_serialized(self, payload: bytes) -> None:
        """`send` for a message the handler has serialized itself (`SerializeToString()` of
        the method's response type): the payload is queued as it is, never copied."""
        if not self._driver.stream_open(self.stream_id):
            # Reset by the client: the scope is cancelled and this checkpoint raises. Otherwise
            # the connection is gone or the wire ended the stream: nobody is listening.
            await trio.lowlevel.checkpoint()
            raise _StreamGone(f"stream {self.stream_id} is closed")
        await self._driver.send_message(self.stream_id, payload)

    # -- what the connection tells the call (from its reader task) --

    def deliver(self, event: MessageReceived) -> None:
        """A request message arrived. A streaming request's are kept for the handler to take.
        Otherwise the first is kept; any more make the call fail (the method takes one), and
        their window goes back at once."""
        if self.method.client_streaming:
            self._inbox.append(event.payload, event.flow_controlled_bytes)
            self._notify()
        elif self._request is None:
            self._request = (event.payload, event.flow_controlled_bytes)
            self._request_unacknowledged = event.flow_controlled_bytes
        else:
            self._extra_request = True
            self._driver.acknowledge(self.stream_id, event.flow_controlled_bytes)

    def end_input(self) -> None:
        """The client has sent all of its request."""
        self._input_ended.set()
        self._notify()

    def fail(self, event: StreamFailed) -> None:
        """The stream is gone: cancel the handler; the call ends without an answer."""
        self._failed = event
        self._scope.cancel()
        self._notify()

    def _notify(self) -> None:
        arrived, self._arrived = self._arrived, trio.Event()
        arrived.set()

    def _release_unread(self) -> None:
        """The call is over: give back the window of request messages nobody will read (the
        connection's window too, which would otherwise shrink for good): a streaming request's
        unread inbox, and a unary request never taken (its request timed out while the client
        held back the end of it, or the client reset the stream)."""
        for share in self._inbox.take_shares():  # one acknowledgement per message, as ever
            self._driver.acknowledge(self.stream_id, share)
        if self._request_unacknowledged:
            unacknowledged, self._request_unacknowledged = self._request_unacknowledged, 0
            self._driver.acknowledge(self.stream_id, unacknowledged)

    # -- the call's own task --

    async def _receive_request(self) -> Message:
        # Usually the whole request came in the read that started the call: then no wait, and
        # no extra scheduling round (the handler's own awaits are its checkpoints).
        if not self._input_ended.is_set():
            # A client holding its request back holds a stream, a task and the connection
            # (an open call is not idle): it gets a while, not forever.
            with trio.move_on_after(self._request_timeout_s):
                await self._input_ended.wait()
            if not self._input_ended.is_set():
                raise GrpcError(
                    Status.DEADLINE_EXCEEDED,
                    f"the request did not arrive in full within {self._request_timeout_s:g} s"
                    " (request_timeout_s)",
                )
        if self._request is None or self._extra_request:
            raise GrpcError(
                Status.INTERNAL,
                f"{self.method.path} takes exactly one request message",
            )
        payload, flow_bytes = self._request
        # Usually no WINDOW_UPDATE comes of it (h2 returns window in large steps); when one
        # does, it goes out now rather than after the handler.
        self._request_unacknowledged = 0
        self._driver.acknowledge(self.stream_id, flow_bytes)
        try:
            return self.method.request_type.FromString(payload)
        except DecodeError as exc:
            # The client's bytes, not our fault: e.g. a string field that is not UTF-8.
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"could not parse the request message: {exc}"
            ) from None


class RequestStream(Generic[Q]):
    """The request messages of a client-streaming or bidirectional call, decoded, in order; the
    iteration ends when the client half-closes (END_STREAM).

    A message is acknowledged to HTTP/2 (its window given back) when it is taken here, never
    before: the client can run at most one stream window ahead of the handler. A message that
    does not parse raises GrpcError(INVALID_ARGUMENT); the handler may catch it and read on.
    """

    def __init__(self, call: ServerCall) -> None:
        self._call = call

    def __aiter__(self) -> RequestStream[Q]:
        return self

    async def __anext__(self) -> Q:
        call = self._call
        # No scheduling round while messages wait (the handler's own awaits are its
        # checkpoints), but a cancelled call (reset, deadline) stops here, not after its inbox.
        await trio.lowlevel.checkpoint_if_cancelled()
        while not call._inbox:
            if call._input_ended.is_set():
                raise StopAsyncIteration
            if call._failed is not None:
                # The call's scope is cancelled (reset) and this checkpoint says so; otherwise
                # the wire failed the stream and nobody is listening.
                await trio.lowlevel.checkpoint()
                raise _StreamGone(f"stream {call.stream_id} is closed")
            await call._arrived.wait()
        payload, share = call._inbox.popleft()
        call._driver.acknowledge(call.stream_id, share)
        try:
            message = call.method.request_type.FromString(payload)
        except DecodeError as exc:
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"could not parse a request message: {exc}"
            ) from None
        if call._first_request is None:
            call._first_request = message
        return message


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
        identify: Identify | None = None,
        errors: ErrorMapper | None = None,
        limits: ServerLimits | None = None,
        observe: CallObserver | None = None,
        **knobs: Any,
    ) -> None:
        """`tls=None` serves plaintext h2c: for tests over memory streams only.

        `identify` runs once per connection with the verified client certificate; its result
        is `call.identity` for every call on that connection. If it raises GrpcError, every
        call on the connection gets that status. Its result, if hashable (and not None), is
        what `max_connections_per_identity` counts; otherwise the certificate's subject is.

        `errors` maps an exception a handler raised (other than GrpcError, which is its own
        status) to a GrpcError, or to None when it is not the application's: that one is logged
        and answered INTERNAL. It is where an application's domain errors become statuses,
        once for every method.

        `limits`: every knob of the transport (`ServerLimits`: timeouts, connection caps, the
        wire's budgets); any of its fields may also be given as a keyword, overriding it.

        `observe` is told of every call once it has ended (`CallEnded`; see the module
        docstring): one hook for an audit log and for metrics.
        """
        limits = limits if limits is not None else ServerLimits()
        if knobs:
            limits = limits.replace(**knobs)
        self.limits = limits
        self._methods: dict[str, RpcMethod] = {}
        for method in methods:
            self.add(method)
        self._tls = tls
        self._identify = identify
        self._errors = errors
        self._observe = observe
        self.admission = limits.admission()
        self._log = RateLimitedLog(log)
        self._connections: set[_ServerConnection] = set()
        self._accepting: trio.CancelScope | None = None
        self._connections_scope: trio.CancelScope | None = None

    def add(self, method: RpcMethod) -> None:
        if method.path in self._methods:
            raise ValueError(f"{method.path} is registered twice")
        self._methods[method.path] = method

    @property
    def open_connections(self) -> int:
        """Connections past their TLS handshake, not yet closed."""
        return len(self._connections)

    @property
    def open_calls(self) -> int:
        """Calls whose handlers run now (those of reset streams still finishing included)."""
        return sum(len(connection._calls) for connection in self._connections)

    def _observed(
        self,
        path: str,
        method: RpcMethod | None,
        info: ConnectionInfo,
        status: Status,
        message: str,
        began: float,
        request: Message | None = None,
        response: Message | None = None,
    ) -> None:
        if self._observe is None:
            return
        ended = CallEnded(
            path, method, info, status, message, trio.current_time() - began, request, response
        )
        try:
            self._observe(ended)
        except Exception:  # an observer's bug must not become the call's, nor go unseen
            log.exception("the call observer failed on %s", path)

    def _takes_a_stream(self, path: str) -> bool:
        method = self._methods.get(path)
        return method is not None and method.client_streaming

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
            except OSError as exc:  # EMFILE and friends: say so (once a burst), keep serving
                self._log(logging.ERROR, "accept", "accept failed: %s", exc)
                await trio.sleep(0.1)  # back off while descriptors are exhausted
                continue
            self._admit(stream, connections)
            # No local keeps the connection once its own task has it: its memory goes when it
            # ends, not when the next client arrives.
            del stream

    def _admit(self, stream: trio.SocketStream, connections: trio.Nursery) -> None:
        admission = self.admission
        host = _peer_host(stream)
        refused = admission.admit(host)
        if refused is None:
            self.limits.keep_alive(stream.socket)  # dead peers are reclaimed (see ServerLimits)
            connections.start_soon(self._serve_admitted, stream, host)
            return
        self._log(
            logging.WARNING,
            refused,
            "refusing connections (%s from %s): %s=%d reached",
            _peer_address(stream),  # while the socket still has its peer
            host,
            refused,
            getattr(admission, refused),
        )
        # Closed at once: the peer sees its connection end, and costs us nothing more.
        stream.socket.close()

    async def _serve_admitted(self, stream: trio.SocketStream, host: str) -> None:
        try:
            await self._serve(stream, host)
        finally:
            self.admission.release()

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection on an accepted byte stream, until it ends."""
        await self._serve(stream, None)

    async def _serve(self, stream: trio.abc.Stream, admitted_host: str | None) -> None:
        """`admitted_host`: the connection holds a handshake slot of this peer host."""
        peer = _peer_address(stream)
        certificate = None
        try:
            if self._tls is not None:
                tls_stream = TLSStream(stream, self._tls)
                try:
                    await tls_stream.do_handshake()  # bounded by the config's handshake timeout
                except TLSError as exc:
                    # Formatted only here, on failure; the error's text carries the peer's
                    # words (a subject, ALPN names): escaped and bounded like the subject.
                    self._log(
                        logging.INFO,
                        "handshake",
                        "TLS handshake with %s (%s) failed: %s",
                        peer,
                        _presented(tls_stream.presented_subject),
                        printable(str(exc), _HANDSHAKE_ERROR_CHARS),
                    )
                    await trio.aclose_forcefully(stream)
                    return
                except Exception:
                    # A peer found an edge of OpenSSL, pyOpenSSL or our callbacks that raises
                    # something else: like any failure of one connection (see the containment
                    # boundary below), it ends that connection alone, never the server.
                    log.exception("TLS handshake with %s failed unexpectedly", peer)
                    await trio.aclose_forcefully(stream)
                    return
                certificate, stream = tls_stream.peer_certificate, tls_stream
        finally:
            if admitted_host is not None:
                self.admission.handshake_ended(admitted_host)
        connection: _ServerConnection | None = None
        claimed = refusing = None  # the identity whose slot, or refusal slot, this holds
        try:
            info = ConnectionInfo(peer, certificate)
            refusal = None
            if self._identify is not None:
                try:
                    info.identity = self._identify(certificate)
                except GrpcError as exc:
                    refusal = exc
            key = _identity_key(info, certificate, refusal is None and self._identify is not None)
            if key is not None and self.admission.claim_identity(key):
                claimed = key
            elif key is not None:
                cap = self.admission.max_connections_per_identity
                if not self.admission.claim_refusal(key):
                    self._log(
                        logging.WARNING,
                        "identity",
                        "closing a connection from %s: its identity holds %d connections "
                        "(max_connections_per_identity) and is being told so on others",
                        peer,
                        cap,
                    )
                    return
                refusing = key
                refusal = GrpcError(
                    Status.RESOURCE_EXHAUSTED,
                    f"too many connections from this client identity"
                    f" (max_connections_per_identity is {cap}): close some, or reuse one"
                    " connection for many calls",
                )
                self._log(
                    logging.WARNING,
                    "identity",
                    "refusing a connection from %s: its identity holds %d connections "
                    "(max_connections_per_identity)",
                    peer,
                    cap,
                )
            connection = _ServerConnection(
                self, stream, info, refusal, over_cap=refusing is not None
            )
            self._connections.add(connection)
            await connection.run()
        except Exception:
            # The containment boundary: whatever went wrong in one connection (a bug, an
            # `identify` that raised, a peer finding an edge we did not foresee) ends that
            # connection, never the server.
            log.exception("connection from %s failed", peer)
        finally:
            if connection is not None:
                self._connections.discard(connection)
            if claimed is not None:
                self.admission.release_identity(claimed)
            if refusing is not None:
                self.admission.release_refusal(refusing)
            try:
                await trio.aclose_forcefully(stream)
            finally:
                if connection is not None:
                    connection.dispose()

    def _status_of(self, exc: Exception, call: ServerCall) -> tuple[Status, str, Metadata]:
        """The one place a handler's exception becomes a status (see the module docstring)."""
        error: BaseException = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, GrpcError):
            return error.status, error.message, error.trailers
        if self._errors is not None and isinstance(error, Exception):
            try:
                mapped = self._errors(error)
            except Exception as mapping_error:
                log.exception("the error mapping failed on %r", error, exc_info=mapping_error)
                mapped = None
            if mapped is not None:
                return mapped.status, mapped.message, mapped.trailers
        if isinstance(error, trio.BrokenResourceError):
            return Status.UNAVAILABLE, "connection lost", ()
        log.exception("%s failed on stream %d", call.method.path, call.stream_id, exc_info=exc)
        return Status.INTERNAL, "internal error", ()

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


def _identity_key(
    info: ConnectionInfo, certificate: x509.Certificate | None, identified: bool
) -> Hashable | None:
    """What max_connections_per_identity counts: `identify`'s result when it is a hashable
    value, else the certificate's subject; None (not counted) without a certificate."""
    if identified and info.identity is not None:
        try:
            hash(info.identity)
        except TypeError:
            pass
        else:
            return ("identity", info.identity)
    if certificate is not None:
        return ("subject", certificate.subject)
    return None


class _ServerConnection:
    def __init__(
        self,
        server: Server,
        stream: trio.abc.Stream,
        info: ConnectionInfo,
        refusal: GrpcError | None,
        *,
        over_cap: bool = False,
    ) -> None:
        self._server = server
        self._info = info
        self._refusal = refusal
        # Beyond its identity's cap: the first refused call is answered, then we close.
        self._over_cap = over_cap
        limits = server.limits
        wire = ServerConnection(
            max_message_bytes=limits.max_receive_message_bytes,
            max_concurrent_streams=limits.max_concurrent_streams,
            # A unary or server-streaming method takes exactly one request message: a flood
            # of extra messages ends its call at the wire, before any handler. Methods with a
            # streaming request take any number, each acknowledged only once read.
            max_request_messages=1,
            streaming_request=server._takes_a_stream,
            **limits.wire_budgets(),
        )
        self._driver = Driver(wire, stream)  # which owns the wire from here on
        self._calls: dict[int, ServerCall] = {}
        # Handlers may run this many at once, those of reset streams included (see the module
        # docstring): a new stream beyond it is refused.
        self._max_handlers = limits.max_concurrent_streams + limits.lingering_handler_allowance
        self._nursery: trio.Nursery | None = None
        self._ping_answered = trio.Event()
        self._idle = trio.Event()
        self._draining = False
        self._requests_seen = False
        self._quiet_since = 0.0  # when the last call ended (or the connection began)
        self._awaiting_preface = True
        self._client_leaving = False  # it sent a GOAWAY
        self._closing = False
        self._keepalive_sent_at: float | None = None  # our keepalive PING awaiting an answer
        self._preface_s = limits.preface_timeout_s
        if over_cap:  # a client that has a call to make makes it at once
            self._preface_s = min(self._preface_s, _OVER_CAP_FIRST_REQUEST_S)

    async def run(self) -> None:
        self._driver.initiate()
        self._quiet_since = trio.current_time()
        self._driver.deadline = self._quiet_since + self._preface_s
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._driver.run(self._on_event, self._on_deadline)
            nursery.cancel_scope.cancel()  # the peer is gone: so are its calls

    def dispose(self) -> None:
        """Drop what this connection refers to, once it has ended: the calls, the driver and
        the wire (h2 keeps reference cycles), so that its memory goes back at once rather than
        at the cyclic collector's next pass."""
        self._calls.clear()
        self._nursery = None
        self._driver.dispose()  # and the wire, which breaks h2's own cycles

    def _on_deadline(self) -> None:
        """The connection's timeouts (see `_timeouts`) and its keepalive: the next deadline is
        the earlier of the two."""
        next_keepalive = self._keepalive(trio.current_time())
        if next_keepalive is None:
            return  # closing: the peer did not answer
        self._timeouts()
        if next_keepalive < self._driver.deadline:
            self._driver.deadline = next_keepalive

    def _keepalive(self, now: float) -> float | None:
        """While calls are open: PING a client silent for keepalive_time_s, and close the
        connection if it stays silent keepalive_timeout_s more (None: closing). The time to
        look again (inf: no call open, nothing to watch)."""
        limits = self._server.limits
        if limits.keepalive_time_s == math.inf or self._awaiting_preface or not self._calls:
            self._keepalive_sent_at = None
            return math.inf
        received_at = self._driver.received_at
        sent_at = self._keepalive_sent_at
        if sent_at is not None:
            if received_at < sent_at:
                answer_by = sent_at + limits.keepalive_timeout_s
                if now < answer_by:
                    return answer_by
                self._server._log(
                    logging.INFO,
                    "keepalive",
                    "closing the connection from %s: no answer to a keepalive PING within %g s",
                    self._info.peer_address,
                    limits.keepalive_timeout_s,
                )
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return None
            self._keepalive_sent_at = None  # it spoke since: alive
        silent_until = received_at + limits.keepalive_time_s
        if now < silent_until:
            return silent_until
        self._driver.ping(_KEEPALIVE_PING)
        self._keepalive_sent_at = now
        return now + limits.keepalive_timeout_s

    def _timeouts(self) -> None:
        """The connection's timeouts: preface, first request, idle (see the module docstring).
        Called by the driver's reader when `driver.deadline` passes; it looks and sets the next
        one. Ending calls do not move it (the call path pays nothing but a clock read when the
        last call ends): while calls run it looks again a timeout later."""
        driver, limits, now = self._driver, self._server.limits, trio.current_time()
        driver.deadline = math.inf
        if self._awaiting_preface:
            if driver.received_bytes < _PREFACE_BYTES:
                self._server._log(
                    logging.INFO,
                    "preface",
                    "closing the connection from %s: no HTTP/2 preface within %g s",
                    self._info.peer_address,
                    self._preface_s,
                )
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return
            self._awaiting_preface = False
        if self._draining:
            return
        if self._requests_seen:
            timeout = limits.idle_timeout_s
        else:
            timeout = limits.first_request_timeout_s
            if self._over_cap:
                timeout = min(timeout, _OVER_CAP_FIRST_REQUEST_S)
        if self._calls:
            driver.deadline = now + timeout
            return
        if now < self._quiet_since + timeout:
            driver.deadline = self._quiet_since + timeout
            return
        log.debug(
            "closing the connection from %s: no call for %g s", self._info.peer_address, timeout
        )
        assert self._nursery is not None
        # Calls that start while the GOAWAY is on its way have their own deadlines.
        self._nursery.start_soon(
            functools.partial(self.drain, now + _IDLE_GOAWAY_S, calls_deadline=math.inf)
        )

    async def drain(self, deadline: float, *, calls_deadline: float | None = None) -> None:
        """The graceful ladder for this connection; returns early if the client leaves. The
        calls left after the second GOAWAY have until `calls_deadline` (default `deadline`)."""
        closed = self._driver.closed
        if self._draining:
            # Already draining (idle, or a refused connection): the earlier deadline wins.
            with trio.move_on_at(deadline):
                await closed.wait()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            return
        self._draining = True
        if not closed.is_set():
            self._driver.start_graceful_shutdown()
            with trio.move_on_at(deadline):
                await _first_of(self._ping_answered, closed)  # the client saw the GOAWAY
        if not closed.is_set():
            self._driver.finish_graceful_shutdown()
            with trio.move_on_at(deadline if calls_deadline is None else calls_deadline):
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
                call.deliver(event)
            else:
                self._driver.acknowledge(event.stream_id, event.flow_controlled_bytes)
        elif isinstance(event, InputEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.end_input()
        elif isinstance(event, StreamFailed):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.fail(event)
                if not call.started:
                    # Its handler will never run (reset in the read that opened it): it holds
                    # nothing, so it does not count against the handlers' cap.
                    del self._calls[event.stream_id]
        elif isinstance(event, RequestRefused):
            # Answered or refused by the wire: told once, in the read that brought it (no
            # stream is kept for it, so a later RST_STREAM on it fails no call).
            server = self._server
            method = server._methods.get(event.path)
            began = trio.current_time()
            server._observed(event.path, method, self._info, event.status, event.message, began)
        elif isinstance(event, PingAcknowledged) and event.data == SHUTDOWN_PING:
            self._ping_answered.set()
        elif isinstance(event, ConnectionTerminated):
            # The client's GOAWAY. With an error it has torn down: the wire has failed every
            # stream and reads nothing more, so close now. Without one it opens no more calls:
            # those in flight are answered, then the connection closes (not at the idle
            # timeout, minutes later).
            self._client_leaving = True
            if event.error_code or not self._calls:
                self._close_soon()

    def _close_soon(self) -> None:
        """Close once what is queued is out (bounded), e.g. the last answers."""
        if self._closing:
            return
        self._closing = True

        async def close() -> None:
            with trio.move_on_after(1):
                try:
                    await self._driver.flush()
                except trio.BrokenResourceError:
                    pass  # the client left meanwhile
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

        assert self._nursery is not None
        self._nursery.start_soon(close)

    def _start_call(self, request: RequestReceived) -> None:
        stream_id = request.stream_id
        self._requests_seen = True
        server, info = self._server, self._info
        if self._refusal is not None:
            self._driver.send_trailers(stream_id, self._refusal.status, self._refusal.message)
            self._quiet_since = trio.current_time()
            method = server._methods.get(request.method)
            server._observed(
                request.method,
                method,
                info,
                self._refusal.status,
                self._refusal.message,
                self._quiet_since,
            )
            if self._over_cap and not self._draining:
                assert self._nursery is not None
                self._nursery.start_soon(self.drain, trio.current_time() + _IDLE_GOAWAY_S)
            return
        if len(self._calls) >= self._max_handlers:
            # Only handlers of reset streams can fill this (the wire keeps open streams within
            # max_concurrent_streams): refuse until they finish. The client may retry.
            self._driver.refuse(stream_id)
            began = trio.current_time()
            method = server._methods.get(request.method)
            refused = "refused stream: handlers of reset streams are still running"
            server._observed(request.method, method, info, Status.UNAVAILABLE, refused, began)
            self._server._log(
                logging.INFO,
                "lingering",
                "refusing a stream from %s: %d handlers still running, some for reset streams",
                self._info.peer_address,
                len(self._calls),
            )
            return
        method = self._server._methods.get(request.method)
        if method is None:
            unknown = f"method {request.method} is not implemented"
            self._driver.send_trailers(stream_id, Status.UNIMPLEMENTED, unknown)
            self._quiet_since = trio.current_time()
            server._observed(
                request.method, None, info, Status.UNIMPLEMENTED, unknown, self._quiet_since
            )
            return
        call = ServerCall(
            self._driver,
            stream_id,
            method,
            request,
            self._info,
            request_timeout_s=self._server.limits.request_timeout_s,
        )
        self._calls[stream_id] = call
        if self._idle.is_set():
            self._idle = trio.Event()
            # The first call of a quiet spell: the keepalive watches from now on.
            watch_from = self._driver.received_at + self._server.limits.keepalive_time_s
            if watch_from < self._driver.deadline:
                self._driver.deadline = watch_from
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call)

    async def _run_call(self, call: ServerCall) -> None:
        driver, stream_id = self._driver, call.stream_id
        status, message, trailers = Status.OK, "", ()
        response: bytes | None = None
        request = result = None
        answered = False  # the trailers went out: else the call ended unanswered (CANCELLED)
        try:
            if call.failed:
                # Reset in the very read that opened it (HEADERS, DATA, RST_STREAM at once):
                # there is no one to answer, so the handler never runs.
                return
            call.started = True
            with call._scope:
                try:
                    if call.method.client_streaming:
                        # No request_timeout_s: a streaming request is as long as the call
                        # (its deadline bounds it, and max_concurrent_streams their number).
                        result = await call.method.handler(RequestStream(call), call)
                    else:
                        request = await call._receive_request()
                        result = await call.method.handler(request, call)
                    if not call.method.server_streaming:
                        if not isinstance(result, call.method.response_type):
                            raise TypeError(
                                f"{call.method.path} returned {type(result).__name__}, "
                                f"not {call.method.response_type.__name__}"
                            )
                        # One message: queued with the trailers below, one write for both.
                        response = result.SerializeToString()
                    trailers = call.trailing_metadata
                except Exception as exc:  # the one place errors become statuses
                    status, message, trailers = self._server._status_of(exc, call)
                    response = None
            if call.failed:
                return  # the client reset the stream, or the wire failed it: already said
            if call._scope.cancelled_caught:
                status, message, trailers = Status.DEADLINE_EXCEEDED, "deadline exceeded", ()
                response = None
            if driver.stream_open(stream_id):
                driver.send_trailers(
                    stream_id,
                    status,
                    message,
                    trailers,
                    response=response,
                    others_running=len(self._calls) > 1,
                )
                answered = True
        finally:
            self._calls.pop(stream_id, None)
            call._release_unread()
            driver.forget(stream_id)
            failed = call._failed
            if failed is not None and failed.answered:
                # The wire answered for the handler (a message over the size limit, a second
                # request message): the client was told this, and so is the observer.
                status, message = failed.status, failed.message
            elif not answered:
                status, message = Status.CANCELLED, "ended without an answer (reset, or gone)"
            self._server._observed(
                call.method.path,
                call.method,
                self._info,
                status,
                message,
                call.began,
                request if request is not None else call._first_request,
                result if answered and status is Status.OK else None,
            )
            if not self._calls:
                self._quiet_since = trio.current_time()
                self._idle.set()
                if self._client_leaving:
                    self._close_soon()


async def _first_of(*events: trio.Event) -> None:
    """Wait until any of the events is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


def _presented(subject: str | None) -> str:
    """The client certificate a failed handshake saw, for its log line. Unverified, so any
    stranger's words: said so, quoted (JSON, ASCII), never able to break the line, and
    bounded."""
    if subject is None:
        return "no client certificate seen"
    if len(subject) > SUBJECT_CHARS:
        subject = subject[:SUBJECT_CHARS] + "..."
    return f"unverified client certificate {json.dumps(subject)}"


def _peer_host(stream: trio.SocketStream) -> str:
    """The peer's host, what max_handshakes_per_address counts (a Unix socket: one key)."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "(unknown)"
    return address[0] if isinstance(address, tuple) else "(unix socket)"


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
