"""A stream's state on our side (inbound decoder and acknowledgement books, outbox), and what
ends a stream: the h2 errors of a stream already gone, the status of a broken inbound message."""

from __future__ import annotations

import collections

import h2.exceptions

from .errors import MessageTooLarge, UnsupportedEncoding, WireError
from .framing import MessageDecoder
from .status import Status

CONTENT_TYPE = b"application/grpc"

# What h2 raises for a command on a stream it has closed or already forgotten (e.g. one it
# reset by itself for a frame that arrived after END_STREAM): that stream is over, nothing more.
STREAM_GONE = (
    h2.exceptions.StreamClosedError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.NoSuchStreamError,
)


class EndOfOutput:
    """The last item of an outbox: the server's trailers (the call is over for us), or the
    client's bare END_STREAM (it still awaits the response)."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]] | None) -> None:
        self.headers = headers


class Stream:
    """One stream's state on our side: its inbound decoder and acknowledgement books, its
    outbox."""

    __slots__ = (
        "decoder",
        "encoding",
        "headers_sent",
        "outbox",
        "outbox_bytes",
        "partial_acked",
        "partial_held",
        "unconsumed",
        "done",
        "gone",
        "messages_left",
    )

    def drop_outbox(self) -> None:
        """Forget what is queued to send: the stream will carry none of it."""
        self.outbox.clear()
        self.outbox_bytes = 0

    def __init__(self, max_message_bytes: int) -> None:
        self.decoder = MessageDecoder(max_message_bytes=max_message_bytes)
        self.encoding: str | None = None  # the peer's grpc-encoding
        self.headers_sent = False
        self.outbox: collections.deque[memoryview | EndOfOutput] = collections.deque()
        self.outbox_bytes = 0
        # Wire bytes of the message being received: acknowledged already, and held back.
        self.partial_acked = 0
        self.partial_held = 0
        self.unconsumed = 0  # messages delivered and not yet acknowledged by the consumer
        self.done = False  # locally finished: trailers queued or stream reset
        self.gone = False  # HTTP/2 had closed it: what was queued was dropped, never sent
        self.messages_left: int | None = None  # inbound messages still allowed (None: any)


def failure(exc: WireError) -> tuple[Status, str]:
    """The status a broken inbound message gives its call (the spec's mapping)."""
    if isinstance(exc, MessageTooLarge):
        return Status.RESOURCE_EXHAUSTED, (
            f"received message larger than max ({exc.declared_bytes} vs. {exc.max_bytes} bytes)"
        )
    if isinstance(exc, UnsupportedEncoding):
        return Status.UNIMPLEMENTED, str(exc)
    if isinstance(exc, HeadersTooLarge):
        return Status.RESOURCE_EXHAUSTED, str(exc)
    return Status.INTERNAL, str(exc)


class HeadersTooLarge(WireError):
    """A header list over the announced limit, decoded whole: only its stream fails."""
