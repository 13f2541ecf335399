"""In-memory peers for the wire tests: our two connections back to back, or a plain h2 client
(one that can send what our client never would) against our server, and the frames on the
wire parsed back with hyperframe. No event loop: bytes are handed across by hand."""

from __future__ import annotations

import gc

import h2.config
import h2.connection
import hpack
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from jobworker.purgatory.wire import ClientConnection, ServerConnection

METHOD = "/test.Echo/Unary"


class Pair:
    """A client and a server connection wired back to back; events collected per side."""

    def __init__(self, **server_options) -> None:
        self.client = ClientConnection(authority="localhost")
        self.server = ServerConnection(**server_options)
        self.client_events: list = []
        self.server_events: list = []
        self.client.initiate()
        self.server.initiate()
        self.exchange()

    def exchange(self) -> None:
        """Hand bytes across until neither side has anything to say."""
        while True:
            to_server, to_client = self.client.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            if to_client:
                self.client_events += self.client.receive_data(to_client)

    def take(self, side: str, kind: type) -> list:
        """The events of `kind` collected on `side` ("client" or "server"), removed."""
        events = self.client_events if side == "client" else self.server_events
        found = [e for e in events if isinstance(e, kind)]
        events[:] = [e for e in events if not isinstance(e, kind)]
        return found


def raw_client() -> h2.connection.H2Connection:
    """A plain h2 client, its preface queued."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


def raw_exchange(raw: h2.connection.H2Connection, server: ServerConnection) -> tuple[list, list]:
    """Hand bytes across until neither says anything; (server events, raw client events)."""
    server_events, raw_events = [], []
    while True:
        a, b = raw.data_to_send(), server.data_to_send()
        if not a and not b:
            return server_events, raw_events
        if a:
            server_events += server.receive_data(a)
        if b:
            raw_events += raw.receive_data(b)


def connected(**options) -> tuple[h2.connection.H2Connection, ServerConnection]:
    """A raw h2 client and our server, past the preface and both SETTINGS acknowledged, with
    nothing left to send on either side."""
    client = raw_client()
    server = ServerConnection(**options)
    server.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client, server


def parse(data: bytes | memoryview) -> list[Frame]:
    """The frames in `data`, which must hold whole frames only."""
    frames, pos, view = [], 0, memoryview(data)
    while pos < len(view):
        frame, length = Frame.parse_frame_header(view[pos : pos + 9])
        frame.parse_body(view[pos + 9 : pos + 9 + length])
        frames.append(frame)
        pos += 9 + length
    return frames


def header_blocks(frames: list[Frame]) -> list[tuple[int, dict[bytes, bytes], bool]]:
    """(stream id, decoded fields, END_STREAM) of each HEADERS frame among `frames`, decoded
    in order by one HPACK decoder, as the peer would (no CONTINUATION expected)."""
    decoder = hpack.Decoder()
    return [
        (f.stream_id, dict(decoder.decode(bytes(f.data), raw=True)), "END_STREAM" in f.flags)
        for f in frames
        if isinstance(f, HeadersFrame)
    ]


def goaway(frames: list[Frame]) -> GoAwayFrame:
    """The one GOAWAY among `frames`."""
    (frame,) = [f for f in frames if isinstance(f, GoAwayFrame)]
    return frame


def live(kind: type) -> int:
    """How many objects of `kind` the collector tracks now: what is still alive, without a
    reference to any of them."""
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))
