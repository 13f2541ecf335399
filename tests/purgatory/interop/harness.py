"""What both directions share: the Echo service written twice (grpcio, purgatory) with the same
behaviour, the deterministic stream content, the spies through which handlers report, TLS configs.

The generated ``echo_pb2`` module exists only once the session fixture has run, so everything here
that builds messages takes it as an argument (``pb``).
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import trio

from jobworker.purgatory import GrpcError, Metadata, RpcMethod, ServerCall, Status
from jobworker.purgatory.testing import client_config, server_config

UNARY = "/purgatory.interop.Echo/Unary"
STREAM = "/purgatory.interop.Echo/Stream"
UPLOAD = "/purgatory.interop.Echo/Upload"
CHAT = "/purgatory.interop.Echo/Chat"
MISSING = "/purgatory.interop.Echo/Nope"

MAX_REQUEST_BYTES = 1 * 2**20  # both servers' receive limit
MAX_RESPONSE_BYTES = 1 * 2**20  # the clients' receive limit, where a test lowers it
CONCURRENT_STREAMS = 100  # = purgatory's default max_concurrent_streams: the full allowance
MESSAGE = "état: ☕ 100% ok"  # non-ASCII, and a "%" that must survive percent-encoding

# Hang guards and backstops: never expected to fire, only to turn a hang into a failure.
GUARD_S = 20.0
CALL_TIMEOUT_S = 30.0  # every grpcio call's own deadline, so an abandoned thread still ends
# Both directions stream the same 100 MiB and test the same short deadline.
BIG_CHUNKS = 1600  # x 64 KiB = 100 MiB
BIG_CHUNK_BYTES = 64 * 2**10
DEADLINE_S = 0.5
HANG_LIMIT_S = 30.0  # a grpcio handler thread waits at most this long for its call to end

GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

_T = TypeVar("_T")


async def in_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run a blocking (grpcio) call in a worker thread. If the test's hang guard fires the thread
    is abandoned; the grpcio call in it still ends, by its own ``timeout``."""
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
    )


@dataclass(frozen=True)
class Served:
    port: int
    spy: Any  # TrioSpy for purgatory, ThreadSpy for grpcio


@dataclass(frozen=True)
class GrpcioClient:
    channel: grpc.Channel
    stub: Any


# ---------------------------------------------------------------------------------------------
# Stream content: chunk `index` of stream `seed` is known to both ends without being sent twice


@functools.lru_cache(maxsize=4 * CONCURRENT_STREAMS)
def _block(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def chunk_data(seed: int, index: int, size: int) -> bytes:
    """The index (8 bytes), then the seed's random block rotated by an index-dependent amount:
    no two chunks alike, so a chunk lost, repeated, reordered or cut shows in the digest."""
    block = _block(seed, size)
    turn = index * 7919 % size if size else 0
    return (index.to_bytes(8, "big") + block[turn:] + block[:turn])[:size]


def expected_digest(seed: int, chunks: int, size: int) -> bytes:
    sha = hashlib.sha256()
    for index in range(chunks):
        sha.update(chunk_data(seed, index, size))
    return sha.digest()


class StreamCheck:
    """Folds received chunks into a digest, checking their order; keeps none of the data."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self._sha = hashlib.sha256()

    def add(self, chunk: Any) -> None:
        assert chunk.index == self.count, f"chunk {chunk.index} arrived in place {self.count}"
        self._sha.update(chunk.data)
        self.count += 1
        self.bytes += len(chunk.data)

    def digest(self) -> bytes:
        return self._sha.digest()


# ---------------------------------------------------------------------------------------------
# Metadata: both servers echo the client's "x-*" entries back, in three places


SENT_METADATA: Metadata = (
    ("x-text", "hello, world ~!"),
    ("x-blob-bin", bytes(range(256))),
    ("x-dup", "one"),
    ("x-dup", "two"),
    ("x-zero-bin", b"\x00"),
)


def x_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """The custom "x-*" entries, in order (each side adds its own others, e.g. user-agent)."""
    return tuple((key, value) for key, value in metadata if key.startswith("x-"))


def echoed(received: Metadata, where: str) -> Metadata:
    return (*received, ("x-where", where))


def as_entries(metadata: Metadata) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else v.encode("ascii")) for k, v in metadata]


def make_reply(pb: Any, request: Any, received: Metadata) -> Any:
    return pb.EchoReply(
        text=request.text,
        payload=request.payload + b"Z" * request.reply_bytes,
        metadata=[pb.MetadataEntry(key=k, value=v) for k, v in as_entries(received)],
    )


# ---------------------------------------------------------------------------------------------
# Echo on purgatory (runs in the test's Trio run)


class TrioSpy:
    """What purgatory's handlers report. `ended` is set when a *hanging* call's handler exits;
    `cancelled` says whether it exited by cancellation."""

    def __init__(self) -> None:
        self.ended = trio.Event()
        self.started = trio.Event()  # an Upload's handler has taken its first chunk
        self.cancelled = False
        self.peers: set[str] = set()  # of rendezvous calls
        self._arrived = 0
        self._everyone_here = trio.Event()

    async def rendezvous(self, peer: str) -> None:
        self.peers.add(peer)
        self._arrived += 1
        if self._arrived == CONCURRENT_STREAMS:
            self._everyone_here.set()
        await self._everyone_here.wait()

    @contextmanager
    def watch(self, active: bool) -> Iterator[None]:
        if not active:
            yield
            return
        try:
            yield
        except trio.Cancelled:
            self.cancelled = True
            raise
        finally:
            self.ended.set()


def purgatory_methods(pb: Any, spy: TrioSpy) -> list[RpcMethod]:
    async def unary(request: Any, call: ServerCall) -> Any:
        received = x_metadata(call.metadata)
        if request.echo_metadata:
            call.send_initial_metadata(echoed(received, "initial"))
            call.trailing_metadata = echoed(received, "trailing")
        if request.hang:
            with spy.watch(True):
                await trio.sleep_forever()
        if request.fail_code:
            raise GrpcError(
                Status(request.fail_code),
                request.fail_message,
                trailers=(("x-code", str(request.fail_code)),),
            )
        return make_reply(pb, request, received)

    async def stream(request: Any, call: ServerCall) -> None:
        if request.echo_metadata:
            received = x_metadata(call.metadata)
            call.send_initial_metadata(echoed(received, "initial"))
            call.trailing_metadata = echoed(received, "trailing")
        with spy.watch(request.hang):
            if request.rendezvous:
                await spy.rendezvous(call.connection.peer_address)
            for index in range(request.chunks):
                data = chunk_data(request.seed, index, request.chunk_bytes)
                await call.send(pb.Chunk(index=index, data=data))
            if request.hang:
                await trio.sleep_forever()

    async def upload(chunks: Any, call: ServerCall) -> Any:
        with spy.watch(True):
            sha = hashlib.sha256()
            count = 0
            async for chunk in chunks:
                sha.update(chunk.data)
                count += 1
                spy.started.set()
        return pb.Digest(count=count, sha256=sha.digest())

    async def chat(requests: Any, call: ServerCall) -> None:
        received = x_metadata(call.metadata)
        async for request in requests:
            if request.fail_code:
                raise GrpcError(Status(request.fail_code), request.fail_message)
            # Watched from before the reply: the client may cancel as soon as it has it.
            with spy.watch(request.hang):
                await call.send(make_reply(pb, request, received))
                if request.hang:
                    await trio.sleep_forever()
        await call.send(pb.EchoReply(text="end"))

    return [
        RpcMethod(UNARY, pb.EchoRequest, pb.EchoReply, unary),
        RpcMethod(STREAM, pb.StreamRequest, pb.Chunk, stream, server_streaming=True),
        RpcMethod(UPLOAD, pb.Chunk, pb.Digest, upload, client_streaming=True),
        RpcMethod(
            CHAT, pb.EchoRequest, pb.EchoReply, chat, client_streaming=True, server_streaming=True
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Echo on grpcio (handlers run in the server's thread pool)


class ThreadSpy:
    """What grpcio's handlers report. For a *hanging* call, the RPC's termination callback
    (``context.add_callback``) records whether the call was still active (it must not be) and
    sets `ended`. The callback, not the handler's own code, is the witness: when the client
    resets a stream while grpcio is still sending to it, grpcio abandons the handler's
    generator at its ``yield`` and never resumes it."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.saw_inactive = False
        self.peers: set[str] = set()  # of rendezvous calls
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(CONCURRENT_STREAMS, timeout=HANG_LIMIT_S)

    def rendezvous(self, peer: str) -> None:
        with self._lock:
            self.peers.add(peer)
        self._barrier.wait()  # BrokenBarrierError on timeout: the call, and the test, fail

    def watch(self, context: grpc.ServicerContext) -> threading.Event:
        """Watch this call; the returned event is set when it terminates, however it does."""
        over = threading.Event()

        def on_termination() -> None:
            self.saw_inactive = not context.is_active()
            over.set()
            self.ended.set()

        if not context.add_callback(on_termination):
            on_termination()  # already over
        return over


class GrpcioEcho:
    def __init__(self, pb: Any, spy: ThreadSpy) -> None:
        self._pb = pb
        self._spy = spy

    def Unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        received = x_metadata(context.invocation_metadata())
        if request.echo_metadata:
            context.send_initial_metadata(echoed(received, "initial"))
            context.set_trailing_metadata(echoed(received, "trailing"))
        if request.hang:
            self._spy.watch(context).wait(HANG_LIMIT_S)
        if request.fail_code:
            context.set_trailing_metadata((("x-code", str(request.fail_code)),))
            context.abort(GRPC_CODES[request.fail_code], request.fail_message)
        return make_reply(self._pb, request, received)

    def Stream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call_over = self._spy.watch(context) if request.hang else None
        if request.echo_metadata:
            received = x_metadata(context.invocation_metadata())
            context.send_initial_metadata(echoed(received, "initial"))
            context.set_trailing_metadata(echoed(received, "trailing"))
        if request.rendezvous:
            self._spy.rendezvous(context.peer())
        for index in range(request.chunks):
            data = chunk_data(request.seed, index, request.chunk_bytes)
            yield self._pb.Chunk(index=index, data=data)
        if call_over is not None:
            call_over.wait(HANG_LIMIT_S)

    def Upload(self, chunks: Iterator[Any], context: grpc.ServicerContext) -> Any:
        sha = hashlib.sha256()
        count = 0
        for chunk in chunks:
            sha.update(chunk.data)
            count += 1
        return self._pb.Digest(count=count, sha256=sha.digest())

    def Chat(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        received = x_metadata(context.invocation_metadata())
        for request in requests:
            if request.fail_code:
                context.abort(GRPC_CODES[request.fail_code], request.fail_message)
            # Watched from before the reply: cancelled at the yield, the generator is never
            # resumed (see ThreadSpy).
            call_over = self._spy.watch(context) if request.hang else None
            yield make_reply(self._pb, request, received)
            if call_over is not None:
                call_over.wait(HANG_LIMIT_S)
                return
        yield self._pb.EchoReply(text="end")


# ---------------------------------------------------------------------------------------------
# TLS


# Our ends' TLS, as every purgatory test makes it (the kit: jobworker.purgatory.testing).
purgatory_server_tls = server_config
purgatory_client_tls = client_config
