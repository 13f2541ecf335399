"""Attack clients: raw HTTP/2 over real TLS, frames made by h2's own client or by hand.

async with raw_connection(port, client_config(certs)) as peer:
    peer.h2.send_headers(...); await peer.flush()
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import trio

from jobworker.purgatory.tls import TLSConfig, TLSStream

__all__ = ["RawPeer", "raw_connection", "request_headers", "unary_request_frames"]


def request_headers(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


class RawPeer:
    """A TLS stream and an h2 client connection that writes nothing unless told to."""

    def __init__(self, stream: TLSStream, *, initial_window_bytes: int | None = None) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        self._buffer = bytearray()
        if initial_window_bytes is not None:
            self.h2.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window_bytes}
            )

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def read_until_closed(self, *, answer: bool = True) -> list[object]:
        """Every h2 event until the server closes the connection. With `answer`, send what h2
        queues meanwhile (the preface, SETTINGS and PING acknowledgements) as a real client
        would; without, stay silent."""
        events: list[object] = []
        while True:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                return events
            if not data:
                return events
            events += self.receive(data)
            if answer:
                await self.flush()

    def receive(self, data: bytes) -> list[object]:
        """h2's events for `data`, fed frame by frame: h2 refuses every frame after a GOAWAY
        (python-hyper/h2#1181), such as the PING of our server's graceful close; such a frame
        becomes ("refused", frame type) and the events before it are kept."""
        self._buffer += data
        events: list[object] = []
        while len(self._buffer) >= 9:
            end = 9 + int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < end:
                break
            frame, self._buffer = self._buffer[:end], self._buffer[end:]
            try:
                events += self.h2.receive_data(bytes(frame))
            except h2.exceptions.ProtocolError:
                events.append(("refused", frame[3]))
        return events


@asynccontextmanager
async def raw_connection(port: int, tls: TLSConfig) -> AsyncIterator[TLSStream]:
    """A handshaken TLS stream to 127.0.0.1:port and nothing else (no HTTP/2 preface)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = TLSStream(tcp, tls)
    try:
        await stream.do_handshake()
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


def unary_request_frames(peer: RawPeer, path: str, payload: bytes, *, reset: bool) -> None:
    """Queue one unary call: HEADERS, DATA(END_STREAM) with one message, and if `reset`, the
    RST_STREAM right behind them, so the server reads all three at once."""
    stream_id = peer.h2.get_next_available_stream_id()
    peer.h2.send_headers(stream_id, request_headers(path))
    message = b"\0" + len(payload).to_bytes(4, "big") + payload
    peer.h2.send_data(stream_id, message, end_stream=True)
    if reset:
        peer.h2.reset_stream(stream_id)
