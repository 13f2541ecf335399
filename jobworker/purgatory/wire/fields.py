"""Header blocks: RFC 9113's rules for those we receive, and an HPACK encoding for those we send.

Received
--------
RFC 9113's rules for a received header block (§8.2 field validity, §8.3 pseudo-headers).

h2 can check these itself, but its checks run as a chain of seven generators with a Python loop
over every byte of every name and value, and they fail the whole connection. We switch them off
and check here instead, with one regular expression per name and per value: a unary request's
headers cost a few microseconds instead of about a fifth of the request's parsing. The RFC also
asks for less than h2 does: a malformed message is a *stream* error (§8.1.1), so a client that
sends one bad request loses that request, not every call on its connection.

`block_problem` returns what is wrong, or None; the connection decides what to do with it.
Clients repeat their blocks call after call, so the verdicts on the last few dozen are kept.
Which grpc headers a call needs (content-type, te, the path's shape) is the connection's
business, not this module's: these are the rules any HTTP/2 message must keep.

Decoding is hpack's, with one shortcut (`RepeatDecoder`): a client that makes the same call
again sends the very same block, each field a reference into the HPACK tables (grpcio's repeated
requests are eight one-byte references). Such a block cannot change the tables, so as long as
nothing else has changed them it decodes to the same list as last time, and we hand that list
back instead of decoding it again (hpack spends about a quarter of a unary request's parsing on
it, measured).

Sent
----
`encode_block` renders a server's response headers and trailers as HPACK literals that leave
the dynamic table alone (RFC 7541 §6.2.2, "without indexing"). h2's encoder is shared by the
whole connection and is still used for everything else; since these blocks neither add to nor
refer to its dynamic table, the two can interleave freely. Compared with h2's send_headers,
which encodes through hpack and checks and normalizes as it goes, this costs a few
microseconds instead of about 15 per block, for at most a few dozen bytes more on the wire.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from enum import Enum

import h2.errors
import h2.exceptions
from hpack import Decoder, HPACKError

# §8.2.1: names are lowercase, without controls, space, DEL or non-ASCII; a colon may only open
# a pseudo-header's name. Values hold no NUL, CR or LF, and neither start nor end with
# whitespace (an empty value is allowed).
_BAD_NAME = re.compile(rb"[\x00-\x20A-Z\x7f-\xff]|(?<=.):", re.DOTALL)
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")

# §8.2.2: fields that only mean something to one HTTP/1.1 hop.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class Block(Enum):
    """Which header block of a message: each allows different pseudo-headers (§8.3)."""

    # CONNECT, the one request that may lack :scheme and :path, has no place in gRPC.
    REQUEST = (
        frozenset({b":method", b":scheme", b":path", b":authority"}),
        (b":method", b":scheme", b":path"),
    )
    RESPONSE = (frozenset({b":status"}), (b":status",))
    TRAILERS = (frozenset(), ())

    def __init__(self, allowed: frozenset[bytes], required: tuple[bytes, ...]) -> None:
        self.allowed = allowed
        self.required = required


def block_problem(headers: Iterable[tuple[bytes, bytes]], block: Block) -> str | None:
    """Why `headers` (as received, names and values bytes) is a malformed `block`, or None."""
    return _problem(tuple(headers), block)


# A verdict costs a few microseconds (two regular expressions per field); looking one up, a
# hash of the block. At most 64 blocks are kept, each within hpack's header list limit (64 KiB):
# a few MiB at worst, for the whole process.
@functools.lru_cache(maxsize=64)
def _problem(headers: tuple[tuple[bytes, bytes], ...], block: Block) -> str | None:
    pseudo: set[bytes] = set()
    regular_seen = False
    authority = host = None
    for name, value in headers:
        if not name or _BAD_NAME.search(name):
            return f"invalid header name {name!r}"
        if value and _BAD_VALUE.search(value):
            return f"invalid value for header {name.decode('ascii')!r}"
        if name[0] == 0x3A:  # b":"
            if name not in block.allowed:
                return f"pseudo-header {name.decode('ascii')!r} not allowed in {block.name}"
            if regular_seen:
                return f"pseudo-header {name.decode('ascii')!r} after a regular header"
            if name in pseudo:
                return f"duplicate pseudo-header {name.decode('ascii')!r}"
            pseudo.add(name)
            if name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
        else:
            regular_seen = True
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific header {name.decode('ascii')!r}"
            if name == b"te" and value.lower() != b"trailers":
                return "te may only be 'trailers'"
            if name == b"host":
                if host is not None:
                    return "more than one host header"
                host = value
    for name in block.required:
        if name not in pseudo:
            return f"{block.name} without {name.decode('ascii')}"
    if block is Block.REQUEST:
        if authority is None and host is None:
            return "REQUEST without :authority or host"
        if authority is not None and host is not None and authority != host:
            return "host and :authority disagree"
    return None


# A block made only of indexed fields (RFC 7541 §6.1): each is one byte 0x80-0xFE, or 0xFF and
# the rest of its index as a 7-bit-prefix integer (continuation bytes, then a final byte < 0x80).
_ONLY_INDEXED = re.compile(rb"(?:[\x80-\xfe]|\xff[\x80-\xff]*[\x00-\x7f])*")
# Per connection, a handful of call shapes of a few dozen fields: what clients repeat, and little
# memory for one that sends many distinct blocks to make us keep them.
_REMEMBERED_BLOCKS = 8
_REMEMBERED_FIELDS = 32


class UndecodableBlock(h2.exceptions.ProtocolError):
    """A header block hpack could not decode, or stopped decoding at the hard budget: the
    HPACK state is lost, a connection error of type COMPRESSION_ERROR (RFC 9113 §4.3).

    An h2 ProtocolError, so that h2 answers it with a GOAWAY of this code; h2 itself would
    say PROTOCOL_ERROR (and ENHANCE_YOUR_CALM for an oversized list)."""

    error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 32
    return size


class RepeatDecoder(Decoder):
    """hpack's decoder, which remembers the header lists of blocks made only of references,
    and counts the blocks whose list exceeds the announced limit.

    A reference changes no table, so a remembered list stays right until a block of another
    kind arrives (a literal may add to the dynamic table, a size update may evict from it):
    then everything is forgotten. Limits are part of the key, so a block decoded under looser
    ones is decoded again, with hpack's checks, once they tighten. Only a few short lists are
    kept (see _REMEMBERED_BLOCKS).

    `max_header_list_size` is hpack's own check, made as it decodes: past it, decoding stops
    (UndecodableBlock). `list_limit`, lower, is the limit announced to the peer: a list over
    it is decoded whole, so the tables stay in sync, and `oversized` counts it; the
    connection, which knows the stream, refuses that stream alone and resets the count.
    """

    def __init__(self, max_header_list_size: int, *, list_limit: int | None = None) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.list_limit = max_header_list_size if list_limit is None else list_limit
        self.oversized = 0
        self._remembered: dict[tuple[bytes, bool, int, int], tuple[list, int]] = {}

    def decode(self, data: bytes, raw: bool = False) -> list:  # type: ignore[override]
        key = (bytes(data), raw, self.max_header_list_size, self.max_allowed_table_size)
        remembered = self._remembered
        known = remembered.get(key)
        if known is not None:
            headers, size = known
        else:
            only_indexed = _ONLY_INDEXED.fullmatch(key[0]) is not None
            if not only_indexed:
                remembered.clear()
            try:
                headers = super().decode(data, raw)
            except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
                raise UndecodableBlock(f"header block not decoded: {exc}") from None
            size = header_list_size(headers)
            if only_indexed and len(headers) <= _REMEMBERED_FIELDS:
                if len(remembered) >= _REMEMBERED_BLOCKS:
                    remembered.clear()
                remembered[key] = (headers, size)
        if size > self.list_limit:
            self.oversized += 1
        return list(headers)

    @property
    def remembered_blocks(self) -> int:
        """How many decoded blocks are kept for reuse (at most _REMEMBERED_BLOCKS)."""
        return len(self._remembered)

    def forget(self) -> None:
        """Drop the remembered lists (their memory goes with them)."""
        self._remembered.clear()


def encode_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HPACK header block of `headers` as literals without indexing, names and values
    given as they must appear (lowercase names, validated values: we only encode our own)."""
    return b"".join([_literal(name, value) for name, value in headers])


def _literal(name: bytes, value: bytes) -> bytes:
    # 0x00: a literal field without indexing whose name is a literal too; then each string as
    # a 7-bit-prefix length (no Huffman coding) and its bytes.
    return b"\0" + _length(len(name)) + name + _length(len(value)) + value


def _length(n: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), the H bit clear."""
    if n < 0x7F:
        return bytes((n,))
    out = bytearray((0x7F,))
    n -= 0x7F
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)
