"""Running a sans-IO gRPC connection over a Trio stream: one reader, one writer.

Theory of operation
-------------------
A `Driver` owns one wire connection (`wire.ServerConnection` or `wire.ClientConnection`) and
one byte stream (TLS in production, memory streams in tests). Two tasks run in the
connection's nursery:

- the **reader** receives bytes, feeds them to the connection, and hands each event to the
  side-specific `on_event` (server: start or cancel calls; client: complete them);
- the **writer** sleeps until woken, then sends whatever the connection has queued.

Call tasks never await the stream, and never touch the wire object: they post commands through
the driver (`send_headers`, `send_message`, `send_trailers`, `acknowledge`, `reset`,
`start_call`...), each of which queues on the wire (synchronously, so a command can never be
torn by a task switch) and then decides, in one place, how the bytes leave: `push()`. While the
reader is handing out events, commands only queue: the reader pushes once after the batch.
`push()`: when nobody is writing and the stream
can write without waiting (`TLSStream.send_nowait`, TLS straight on a socket), the bytes go out
at once, in the calling task, synchronously, so no cancellation can tear them either; whatever
the socket does not take now is left to the writer, which must send it before anything else.
Otherwise `push()` wakes the writer. Writing in place saves a scheduling round per write: a
unary call costs one round instead of three, a streamed message one instead of two.

When sending, call tasks wait for backpressure: first HTTP/2 flow control (the stream's outbox
drains only as the peer opens its window), then the socket: when it is full, or past a
high-water mark of bytes not yet written, a sender waits until the writer has put them on the
wire. A slow peer therefore slows exactly the calls that talk to it, and memory per connection
stays bounded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from .wire import (
    CallEnded,
    ConnectionBroken,
    Event,
    Metadata,
    OutboxDrained,
    Status,
    StreamFailed,
)

# RST_STREAM error codes (RFC 9113 section 7).
_REFUSED_STREAM = 0x7
_CANCEL = 0x8

log = logging.getLogger("jobworker.purgatory")

RECEIVE_BYTES = 256 * 2**10
# A sender may run this far ahead of the socket before it waits for the writer (like asyncio's
# drain()): consecutive messages then share one writer batch and one TLS send.
HIGH_WATER_BYTES = 256 * 2**10


class Driver:
    """Owns `connection` (a wire.ServerConnection or ClientConnection) from here on."""

    def __init__(self, connection, stream: trio.abc.Stream) -> None:
        self.connection = connection
        self.stream = stream
        # Streams that can write without waiting (TLSStream); for others every write is the
        # writer's.
        self._send_nowait = getattr(stream, "send_nowait", None)
        self._wakeup = trio.Event()
        self._taken = 0  # batches the writer has taken from the connection
        self._sent = 0  # batches it has finished sending
        self._batch_sent = trio.Event()
        self._writing = False  # the writer is inside the stream's send_all
        # Bytes taken from the connection that the stream has not taken yet: the writer's to
        # send, before anything else (see TLSStream.send_nowait).
        self._carry: memoryview | None = None
        self._drained: dict[int, trio.Event] = {}
        self._backlog_bytes = 0  # queued by senders, not yet written
        self.closed = trio.Event()  # the byte stream is finished, either way
        self.received_bytes = 0  # from the peer, in all (the server's preface timeout looks)
        # When the peer last sent anything, on the Trio clock (the server's keepalive looks).
        self.received_at = trio.current_time()
        # When the reader stops waiting for the peer and calls `run`'s on_deadline, which sets
        # the next one: the server's connection timeouts ride on the read every connection
        # waits in anyway, rather than on a task of their own per connection.
        self.deadline = math.inf
        self.broken: BaseException | None = None
        self._scope = trio.CancelScope()
        self._dispatching = False  # the reader is handing out events: it pushes afterwards

    # --- commands: each queues on the wire, then sends or wakes the writer ----------------------

    def initiate(self) -> None:
        """The connection preface (client) or our SETTINGS (server)."""
        self.connection.initiate()
        # The writer's: before the reader has run, a failure to write would hide what the
        # peer has to say (a client whose certificate the server rejected reads why).
        self.wake()

    def stream_open(self, stream_id: int) -> bool:
        """True while the stream can still carry something from us."""
        return self.connection.stream_open(stream_id)

    @property
    def stream_available(self) -> bool:
        """Client: the server's MAX_CONCURRENT_STREAMS allows one more call now."""
        return self.connection.stream_available

    def send_headers(self, stream_id: int, metadata: Metadata = ()) -> None:
        self.connection.send_headers(stream_id, metadata)
        self._posted()

    def send_trailers(
        self,
        stream_id: int,
        status: Status,
        message: str = "",
        metadata: Metadata = (),
        *,
        response: bytes | None = None,
        others_running: bool = False,
    ) -> None:
        """End the call, after `response` (a unary call's one message, queued with the
        trailers so both leave in one write) when given. `others_running`: other calls of
        this connection are still at work."""
        connection = self.connection
        if response is not None:
            connection.send_message(stream_id, response)
        connection.send_trailers(stream_id, status, message, metadata)
        if self._dispatching:
            return
        if others_running:
            # Other calls are running: their answers tend to come in this same scheduling
            # round, and the writer sends them all in one write.
            self.wake()
        else:
            self.push()  # alone: no round to wait for

    def acknowledge(self, stream_id: int, flow_controlled_bytes: int) -> None:
        """The consumer has read this much of the stream's data: give the window back."""
        self.connection.acknowledge(stream_id, flow_controlled_bytes)
        self._posted()

    def reset(self, stream_id: int, error_code: int = _CANCEL) -> None:
        """Abandon a stream (RST_STREAM); harmless on one that already ended."""
        self.connection.reset(stream_id, error_code)
        # Its outbox is dropped: a sender waiting on it (another task) must look again.
        drained = self._drained.pop(stream_id, None)
        if drained is not None:
            drained.set()
        self._posted()

    def refuse(self, stream_id: int) -> None:
        """Refuse a stream the peer opened (RST_STREAM REFUSED_STREAM): it may retry it."""
        self.reset(stream_id, _REFUSED_STREAM)

    def start_call(
        self, method: str, metadata: Metadata, timeout_s: float | None, request: bytes
    ) -> int:
        """Client: open a stream for `method` with its one request message and the end of
        input; the stream id. Raises wire.ProtocolError once the server has sent GOAWAY."""
        connection = self.connection
        stream_id = connection.start_call(method, metadata, timeout_s=timeout_s)
        # The request and the end of input go out together, as the windows allow: one message
        # per call, so queueing it costs at most one message of memory.
        connection.send_message(stream_id, request)
        connection.end_input(stream_id)
        self._posted()
        return stream_id

    def open_call(self, method: str, metadata: Metadata, timeout_s: float | None) -> int:
        """Client: open a stream for `method` whose request is a stream of messages, sent with
        `send_message` and ended with `end_input`; the stream id. Raises wire.ProtocolError
        once the server has sent GOAWAY."""
        stream_id = self.connection.start_call(method, metadata, timeout_s=timeout_s)
        self._posted()
        return stream_id

    def end_input(self, stream_id: int) -> None:
        """Client: no more request messages (END_STREAM), behind those still queued."""
        self.connection.end_input(stream_id)
        self._posted()

    def ping(self, data: bytes) -> None:
        """Send a PING (8 bytes of `data`); its answer comes as a PingAcknowledged."""
        self.connection.ping(data)
        self.wake()

    def start_graceful_shutdown(self) -> None:
        """Server: the first GOAWAY (2^31-1) and the PING that tells when it was seen."""
        self.connection.start_graceful_shutdown()
        self.wake()

    def finish_graceful_shutdown(self) -> None:
        """Server: the second GOAWAY, with the real last stream id."""
        self.connection.finish_graceful_shutdown()
        self.wake()

    async def close(self) -> None:
        """Client: GOAWAY, then return once it is written (or the connection is gone)."""
        if self.closed.is_set():
            return
        self.connection.close()
        try:
            await self.flush()
        except trio.BrokenResourceError:
            pass

    def _posted(self) -> None:
        if not self._dispatching:
            self.push()

    # --- what call tasks use -------------------------------------------------------------------

    def wake(self) -> None:
        """Have the writer send what is queued, in its own time."""
        self._wakeup.set()

    def push(self) -> bool:
        """Send what is queued now, in this task and without waiting, if that can be done;
        otherwise wake the writer. True when everything queued has been written."""
        if (
            self._send_nowait is None
            or self._wakeup.is_set()  # the writer will take it, with whatever joins meanwhile
            or self._writing
            or self._carry is not None
            or self.closed.is_set()
        ):
            self.wake()
            return False
        data = self.connection.data_to_send()
        if not data:
            return True
        try:
            taken = self._send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lose(exc)
            return False
        if taken < len(data):
            self._carry = memoryview(data)[taken:]  # senders wait while there is one
            self.wake()
            return False
        self._backlog_bytes = 0
        return True

    async def flush(self) -> None:
        """Return once everything queued so far has been written to the stream."""
        if self.push():
            await trio.lowlevel.checkpoint()
            return
        target = self._taken + 1  # the writer's next batch is taken after our commands
        while self._sent < target:
            if self.closed.is_set():
                raise trio.BrokenResourceError("connection closed") from self.broken
            await self._batch_sent.wait()

    async def send_message(self, stream_id: int, payload: bytes) -> None:
        """Queue a message and push it; wait while HTTP/2 flow control holds it back, and
        while the socket is full or the bytes not yet written exceed the high-water mark."""
        self.connection.send_message(stream_id, payload)
        self._backlog_bytes += len(payload)
        self.push()
        while self.connection.outbound_pending(stream_id):
            drained = self._drained.setdefault(stream_id, trio.Event())
            await drained.wait()
            if self.closed.is_set():
                raise trio.BrokenResourceError("connection closed") from self.broken
        if self._carry is not None or self._backlog_bytes > HIGH_WATER_BYTES:
            await self.flush()
        else:
            await trio.lowlevel.checkpoint()

    def forget(self, stream_id: int) -> None:
        self._drained.pop(stream_id, None)

    def dispose(self) -> None:
        """Once the connection has ended: let go of the wire object, the stream and any bytes
        still held, so none of it waits for the cyclic collector (a reference from a frame or a
        traceback that outlives us then keeps only this small object)."""
        self._carry = None
        self._drained.clear()
        # The exception's traceback holds the reader's frame, which holds us: a cycle.
        self.broken = None
        if self.connection is not None:
            self.connection.dispose()  # breaks h2's own cycles
        self.connection = None
        self.stream = None
        self._send_nowait = None

    # --- the two tasks -------------------------------------------------------------------------

    async def run(self, on_event, on_deadline: Callable[[], None] | None = None) -> None:
        """Run reader and writer until the stream ends or breaks; then wake every waiter.
        `on_deadline` is called (in the reader, synchronously) when `deadline` passes while
        the reader waits; it moves `deadline` on, or ends the connection."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                await self._reader(on_event, on_deadline)
                nursery.cancel_scope.cancel()
        finally:
            self.closed.set()
            self._batch_sent.set()
            for event in self._drained.values():
                event.set()

    async def _reader(self, on_event, on_deadline: Callable[[], None] | None) -> None:
        while True:
            # Cancelling a receive loses nothing (see tls): the next one picks up.
            with trio.move_on_at(self.deadline) as waiting:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.broken = exc
                    return
            if waiting.cancelled_caught:
                if on_deadline is None:
                    self.deadline = math.inf
                else:
                    on_deadline()
                continue
            if not data:
                return
            self.received_bytes += len(data)
            self.received_at = now = trio.current_time()
            try:
                # The clock lets the wire refill its rate budgets (resets, pings).
                events: list[Event] = self.connection.receive_data(data, now=now)
            except ConnectionBroken as exc:
                log.info("closing connection: %s", exc)
                self.broken = exc
                with trio.move_on_after(1):  # the GOAWAY, if the peer still listens
                    await self.flush()
                return
            self._dispatching = True
            try:
                for event in events:
                    if isinstance(event, OutboxDrained):
                        drained = self._drained.pop(event.stream_id, None)
                        if drained is not None:
                            drained.set()
                    else:
                        if isinstance(event, CallEnded | StreamFailed):
                            # The stream is gone and so is its outbox: a sender waiting for
                            # the peer's window (a client streaming its request) looks again
                            # and finds nothing pending, rather than waiting forever.
                            drained = self._drained.pop(event.stream_id, None)
                            if drained is not None:
                                drained.set()
                        on_event(event)
            finally:
                self._dispatching = False
            self.push()  # acknowledgements, SETTINGS ACKs, PING answers, freed windows

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._taken += 1
            self._backlog_bytes = 0  # all of it is in this batch
            self._writing = True
            try:
                carry, self._carry = self._carry, None
                if carry is not None:
                    await self._send(carry)
                await self._send(self.connection.data_to_send())
            finally:
                self._writing = False
            self._sent += 1
            done, self._batch_sent = self._batch_sent, trio.Event()
            done.set()

    async def _send(self, data: bytes | memoryview) -> None:
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        """The peer is gone: end the connection (the reader may be blocked forever). The first
        cause is kept: a failed write after the reader's error says less (TLS: "broken")."""
        if self.broken is None:
            self.broken = exc
        self._scope.cancel()
