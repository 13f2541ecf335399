"""gRPC Length-Prefixed-Message framing: a 1-byte compressed flag, a big-endian u32 length, body.

Spec: grpc/grpc doc/PROTOCOL-HTTP2.md ("Length-Prefixed-Message"). DATA frame boundaries bear no
relation to message boundaries, so the decoder is resumable: feed it whatever arrived and it
returns the messages completed so far.

Buffering strategy of `MessageDecoder` (why it looks the way it does):

* The length limit is checked the moment the 5-byte prefix is complete, before a single body
  byte is kept: a peer cannot make us hold more than `max_message_bytes` per stream.
* A body that lies entirely inside one fed chunk is sliced out of it with one copy (the
  `bytes` the caller receives). Feeding many small messages at once walks one memoryview
  with an offset, so it is linear in the chunk size.
* A body spread over several chunks is kept as a list of pieces and joined once at the end:
  one copy in total, however many chunks. Pieces of immutable `bytes` are kept as zero-copy
  memoryviews (this pins at most the one partly-used chunk the body began in); pieces of
  mutable buffers are copied, since the caller may reuse them after `feed` returns.
* The prefix itself may also be split; its fragment lives in a 5-byte bytearray.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from jobworker.purgatory.wire.errors import MessageTooLarge, ProtocolError, WireError

PREFIX_BYTES = 5
MAX_WIRE_MESSAGE_BYTES = 2**32 - 1
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
_PREFIX = struct.Struct(">BI")


@dataclass(frozen=True, slots=True)
class Message:
    """One received message; `compressed` means the body is in the stream's grpc-encoding."""

    payload: bytes
    compressed: bool


def encode_message_prefix(payload_bytes: int, *, compressed: bool = False) -> bytes:
    """The 5-byte prefix for a message body of `payload_bytes` bytes."""
    if not 0 <= payload_bytes <= MAX_WIRE_MESSAGE_BYTES:
        raise ValueError(f"a gRPC message cannot be {payload_bytes} bytes long")
    return _PREFIX.pack(1 if compressed else 0, payload_bytes)


def encode_message_parts(payload: bytes, *, compressed: bool = False) -> tuple[bytes, bytes]:
    """`(prefix, payload)` without concatenating, for a writer that sends pieces as they are."""
    return encode_message_prefix(len(payload), compressed=compressed), payload


def encode_message(payload: bytes, *, compressed: bool = False) -> bytes:
    """The complete framed message, prefix and body."""
    return encode_message_prefix(len(payload), compressed=compressed) + payload


class MessageDecoder:
    """Resumable decoder for one direction of one stream.

    `feed(data)` returns the list of messages completed by `data` (possibly empty). Any
    `WireError` it raises is final: the stream's framing is lost, so every later `feed`
    raises `ProtocolError` too.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self.max_message_bytes = max_message_bytes
        self._prefix = bytearray()  # fragment of a prefix split across feeds (< 5 bytes)
        self._declared_bytes: int | None = None  # body length once the prefix is complete
        self._compressed = False
        self._pieces: list[bytes | memoryview] = []  # body received so far, in order
        self._body_bytes = 0  # sum of len(pieces)
        self._failure: WireError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of the incomplete message held in memory (prefix fragment plus body so far).

        Always < `max(PREFIX_BYTES, max_message_bytes)`.
        """
        return len(self._prefix) + self._body_bytes

    @property
    def partial_message_bytes(self) -> int:
        """Wire bytes (prefix included) of the message being received; 0 at a boundary.

        Flow-control accounting needs this: these bytes arrived but belong to no message yet.
        """
        if self._declared_bytes is not None:
            return PREFIX_BYTES + self._body_bytes
        return len(self._prefix)

    @property
    def at_message_boundary(self) -> bool:
        """True when no message is partly received; False at end of stream means truncation."""
        return self._declared_bytes is None and not self._prefix

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Consume `data`; return the messages it completed, in order."""
        if self._failure is not None:
            raise ProtocolError("message decoder already failed") from self._failure
        try:
            return self._feed(data)
        except WireError as exc:
            self._failure = exc
            self._prefix.clear()
            self._pieces.clear()
            self._body_bytes = 0
            self._declared_bytes = None
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        immutable = isinstance(view.obj, bytes)
        end = len(view)
        pos = 0
        messages: list[Message] = []
        while True:
            if self._declared_bytes is None:
                if pos == end:
                    break
                if not self._prefix and end - pos >= PREFIX_BYTES:
                    flag, length = _PREFIX.unpack_from(view, pos)
                    pos += PREFIX_BYTES
                else:
                    take = min(PREFIX_BYTES - len(self._prefix), end - pos)
                    self._prefix += view[pos : pos + take]
                    pos += take
                    if len(self._prefix) < PREFIX_BYTES:
                        break
                    flag, length = _PREFIX.unpack(self._prefix)
                    self._prefix.clear()
                self._start_message(flag, length)
            # In a body (possibly empty): take what this chunk holds of it.
            assert self._declared_bytes is not None
            missing = self._declared_bytes - self._body_bytes
            take = min(missing, end - pos)
            if take == missing and not self._pieces:
                payload = view[pos : pos + take].tobytes()
            elif take == missing:
                self._pieces.append(view[pos : pos + take])
                payload = b"".join(self._pieces)
                self._pieces.clear()
                self._body_bytes = 0
            else:
                if take:
                    piece = view[pos : pos + take]
                    self._pieces.append(piece if immutable else piece.tobytes())
                    self._body_bytes += take
                break
            pos += take
            messages.append(Message(payload, self._compressed))
            self._declared_bytes = None
        return messages

    def _start_message(self, flag: int, length: int) -> None:
        if flag > 1:
            raise ProtocolError(f"invalid compressed flag {flag} in message prefix")
        if length > self.max_message_bytes:
            raise MessageTooLarge(length, self.max_message_bytes)
        self._compressed = flag == 1
        self._declared_bytes = length
