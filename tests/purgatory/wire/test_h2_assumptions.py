"""What wire/h2_internals.py assumes about h2, checked against the installed h2, hpack and
hyperframe: a release that breaks an assumption fails the test named after it.

Each test plays two plain h2 connections against each other and compares what our function
does with what h2 itself does, or shows the h2 behaviour the function relies on.
"""

from __future__ import annotations

import gc
import weakref

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, SettingsFrame

from jobworker.purgatory.wire import h2_internals
from jobworker.purgatory.wire.fields import RepeatDecoder, UndecodableBlock, encode_block

from .peers import parse

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/p.S/M"),
    (b":authority", b"localhost"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
S = h2.settings.SettingCodes


def _h2(client_side: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """A client and a server, prefaces exchanged and acknowledged."""
    client, server = _h2(True), _h2(False)
    client.initiate_connection()
    server.initiate_connection()
    _exchange(client, server)
    return client, server


def _exchange(a: h2.connection.H2Connection, b: h2.connection.H2Connection) -> list:
    events = []
    for _ in range(4):
        events += b.receive_data(a.data_to_send())
        events += a.receive_data(b.data_to_send())
    return events


def _open_stream(client, server, *, respond: bool = True) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, REQUEST)
    _exchange(client, server)
    if respond:
        server.send_headers(stream_id, RESPONSE)
        _exchange(client, server)
    return stream_id


# --- setting up ------------------------------------------------------------------------------


def test_install_decoder_decodes_every_block_and_keeps_getting_limit_updates() -> None:
    class Counting(RepeatDecoder):
        blocks = 0

        def decode(self, data: bytes, raw: bool = False) -> list:  # type: ignore[override]
            self.blocks += 1
            return super().decode(data, raw)

    client, server = _h2(True), _h2(False)
    decoder = Counting(64 * 1024, list_limit=16 * 1024)
    h2_internals.install_decoder(server, decoder)
    server.update_settings({S.MAX_HEADER_LIST_SIZE: 12345})
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, REQUEST)
    events = _exchange(client, server)
    assert server.decoder is decoder  # the acknowledged SETTINGS updated ours, not a new one
    assert decoder.max_header_list_size == 12345
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert received and received[0].headers == REQUEST
    assert decoder.blocks == 1


def test_undecodable_block_error_code_becomes_the_goaway_code() -> None:
    client, server = _pair()
    h2_internals.install_decoder(server, RepeatDecoder(64, list_limit=64))  # too small
    client.send_headers(1, REQUEST)
    with pytest.raises(UndecodableBlock):
        server.receive_data(client.data_to_send())
    (goaway,) = [f for f in parse(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == h2.errors.ErrorCodes.COMPRESSION_ERROR


def test_replace_local_settings_is_announced_and_enforced() -> None:
    client, server = _h2(True), _h2(False)
    announced = {S.MAX_CONCURRENT_STREAMS: 3, S.INITIAL_WINDOW_SIZE: 100_000}
    h2_internals.replace_local_settings(
        server, h2.settings.Settings(client=False, initial_values=announced)
    )
    server.initiate_connection()
    (settings,) = [f for f in parse(server.data_to_send()) if isinstance(f, SettingsFrame)]
    assert settings.settings[S.MAX_CONCURRENT_STREAMS] == 3
    assert settings.settings[S.INITIAL_WINDOW_SIZE] == 100_000
    # Swapped after initiate (nothing pending): the new limit is the one h2 checks.
    h2_internals.replace_local_settings(
        server, h2.settings.Settings(client=False, initial_values={S.MAX_CONCURRENT_STREAMS: 1})
    )
    client.initiate_connection()
    client.send_headers(1, REQUEST)
    client.send_headers(3, REQUEST)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        server.receive_data(client.data_to_send())


def test_settings_initial_values_count_as_acknowledged() -> None:
    settings = h2.settings.Settings(client=False, initial_values={S.MAX_FRAME_SIZE: 2**20})
    assert settings.max_frame_size == 2**20
    assert settings.acknowledge() == {}


def test_set_max_inbound_frame_size_is_what_the_parser_accepts() -> None:
    client, server = _pair()
    stream_id = _open_stream(client, server)
    frame = DataFrame(stream_id, b"x" * 30_000)  # over HTTP/2's default 16,384
    h2_internals.set_max_inbound_frame_size(server, 2**20)
    events = server.receive_data(frame.serialize())
    assert [type(e) for e in events] == [h2.events.DataReceived]
    h2_internals.set_max_inbound_frame_size(server, 16_384)
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        server.receive_data(frame.serialize())


def test_inbound_connection_window_is_what_increment_raises() -> None:
    _client, server = _pair()
    before = h2_internals.inbound_connection_window(server)
    assert before == 65_535
    server.increment_flow_control_window(1000)
    assert h2_internals.inbound_connection_window(server) == before + 1000


def test_unacknowledged_inbound_bytes_counts_data_until_acknowledged() -> None:
    client, server = _pair()
    assert h2_internals.unacknowledged_inbound_bytes(server) == 0
    stream_id = _open_stream(client, server)
    client.send_data(stream_id, b"x" * 10_000, pad_length=10)  # 10_011 bytes of window
    [received] = [e for e in _exchange(client, server) if isinstance(e, h2.events.DataReceived)]
    assert h2_internals.unacknowledged_inbound_bytes(server) == 10_011
    server.acknowledge_received_data(received.flow_controlled_length - 11, stream_id)
    assert h2_internals.unacknowledged_inbound_bytes(server) == 11
    # Past the half-window threshold: the acknowledgements become a WINDOW_UPDATE.
    for _ in range(3):
        client.send_data(stream_id, b"y" * 10_000)
    _exchange(client, server)
    server.acknowledge_received_data(30_011, stream_id)
    assert h2_internals.unacknowledged_inbound_bytes(server) == 0
    # DATA on a stream h2 has reset is charged and given back by h2 itself.
    server.reset_stream(stream_id)
    client.send_data(stream_id, b"z" * 1000)
    server.receive_data(client.data_to_send())
    assert h2_internals.unacknowledged_inbound_bytes(server) == 0


# --- reading state -----------------------------------------------------------------------------


def test_highest_inbound_stream_id_is_what_close_connection_sends() -> None:
    client, server = _pair()
    _open_stream(client, server)
    _open_stream(client, server)
    assert h2_internals.highest_inbound_stream_id(server) == 3
    server.close_connection()
    (goaway,) = [f for f in parse(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway.last_stream_id == 3


def test_open_outbound_streams_counts_streams_until_closed() -> None:
    client, server = _pair()
    first = _open_stream(client, server)
    _open_stream(client, server)
    assert h2_internals.open_outbound_streams(client) == 2
    client.end_stream(first)
    server.send_headers(first, [(b"grpc-status", b"0")], end_stream=True)
    _exchange(client, server)
    assert h2_internals.open_outbound_streams(client) == 1


def test_forgotten_streams_are_dropped_by_h2_and_send_headers_would_open_them_anew() -> None:
    client, server = _pair()
    client.update_settings({S.MAX_CONCURRENT_STREAMS: 0})  # no streams of the server's
    _exchange(client, server)
    first = _open_stream(client, server, respond=False)
    assert not h2_internals.forgotten(server, first)
    client.end_stream(first)
    ended = client.data_to_send()
    # DATA after END_STREAM (h2 resets the stream itself: STREAM_CLOSED), then a new stream.
    late = DataFrame(first, data=b"x").serialize()
    second = client.get_next_available_stream_id()
    client.send_headers(second, REQUEST)
    events = server.receive_data(ended + late + client.data_to_send())
    assert any(isinstance(e, h2.events.StreamReset) and not e.remote_reset for e in events)
    # The new stream made h2 count the open ones, and drop the closed one.
    assert h2_internals.forgotten(server, first)
    assert not h2_internals.forgotten(server, second)
    with pytest.raises(h2.exceptions.TooManyStreamsError):  # a new stream of ours, refused
        server.send_headers(first, RESPONSE)


def test_half_closed_local_follows_h2_stream_states() -> None:
    client, server = _pair()
    stream_id = _open_stream(client, server)
    assert not h2_internals.half_closed_local(server, stream_id)
    server.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    assert h2_internals.half_closed_local(server, stream_id)
    assert not h2_internals.half_closed_local(server, 99)


# --- the DATA fast path ------------------------------------------------------------------------


def test_emit_data_keeps_the_books_h2_send_data_keeps() -> None:
    """The same DATA frame through h2 and through emit_data: the same bytes on the wire, the
    same windows, the same states, and the peer reads the same."""
    payload = b"0123456789" * 100
    results = []
    for ours in (False, True):
        client, server = _pair()
        stream_id = _open_stream(client, server)
        if ours:
            h2_stream = h2_internals.data_stream(server, stream_id)
            assert h2_stream is not None
            assert h2_internals.whole_data_stream(server, stream_id, len(payload)) is h2_stream
            out: list = []
            frame = DataFrame(stream_id, payload).serialize()
            h2_internals.emit_data(server, h2_stream, out, [frame[:9], frame[9:]], len(payload))
            wire = b"".join(out) + server.data_to_send()
        else:
            server.send_data(stream_id, payload)
            wire = server.data_to_send()
        h2_stream = server.streams[stream_id]
        events = client.receive_data(wire)
        results.append(
            (
                wire,
                server.outbound_flow_control_window,
                h2_stream.outbound_flow_control_window,
                server.local_flow_control_window(stream_id),
                h2_stream.state_machine.state,
                server.state_machine.state,
                [(type(e), getattr(e, "data", None)) for e in events],
            )
        )
    assert results[0] == results[1]


def test_data_stream_refuses_where_h2_send_data_raises() -> None:
    client, server = _pair()
    stream_id = _open_stream(client, server)
    window = server.local_flow_control_window(stream_id)
    assert h2_internals.whole_data_stream(server, stream_id, window + 1) is None
    assert h2_internals.whole_data_stream(server, 99, 1) is None
    server.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    assert h2_internals.data_stream(server, stream_id) is None
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_data(stream_id, b"x")
    server.close_connection()
    assert h2_internals.data_stream(server, stream_id) is None


# --- the inbound DATA fast path ----------------------------------------------------------------


def _books(connection: h2.connection.H2Connection, stream_id: int) -> tuple:
    h2_stream = connection.streams[stream_id]
    return (
        connection._inbound_flow_control_window_manager.current_window_size,
        h2_stream._inbound_window_manager.current_window_size,
        h2_stream._actual_content_length,
        h2_stream.state_machine.state,
        connection.state_machine.state,
    )


@pytest.mark.parametrize("receiver_is_client", [True, False])
def test_take_inbound_data_keeps_the_books_h2_receive_data_keeps(receiver_is_client: bool) -> None:
    """The same DATA frames read by h2 and taken past it: the same windows, content length
    and states, and acknowledging them gives the peer the same WINDOW_UPDATEs."""
    payload = b"0123456789" * 1000
    results = []
    for ours in (False, True):
        client, server = _pair()
        stream_id = _open_stream(client, server)
        sender, receiver = (server, client) if receiver_is_client else (client, server)
        for _ in range(2):
            sender.send_data(stream_id, payload)
            wire = sender.data_to_send()
            if ours:
                assert h2_internals.take_inbound_data(receiver, stream_id, len(payload))
            else:
                (event,) = receiver.receive_data(wire)
                assert isinstance(event, h2.events.DataReceived)
        books = _books(receiver, stream_id)
        receiver.acknowledge_received_data(2 * len(payload), stream_id)
        updates = receiver.data_to_send()
        sender.receive_data(updates)
        results.append((books, updates, sender.local_flow_control_window(stream_id)))
    assert results[0] == results[1]


def test_take_inbound_data_refuses_what_h2_would_not_take_quietly() -> None:
    client, server = _pair()
    take = h2_internals.take_inbound_data
    # Before the response headers: h2 refuses DATA (a protocol error), so must see it.
    stream_id = _open_stream(client, server, respond=False)
    assert not take(client, stream_id, 10)
    server.send_headers(stream_id, RESPONSE)
    _exchange(client, server)
    assert take(client, stream_id, 10)
    # Over a receive window: h2 raises its FlowControlError, nothing is charged here.
    before = _books(client, stream_id)
    window = client.streams[stream_id]._inbound_window_manager.current_window_size
    assert not take(client, stream_id, window + 1)
    assert _books(client, stream_id) == before
    # A stream h2 does not know, and one a content-length is checked on.
    assert not take(client, 99, 1)
    other = _open_stream(client, server, respond=False)
    server.send_headers(other, [*RESPONSE, (b"content-length", b"5")])
    _exchange(client, server)
    assert not take(client, other, 1)
    # A stream the peer ended (trailers): closed for DATA.
    server.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    _exchange(client, server)
    assert not take(client, stream_id, 1)
    # A connection that is over.
    client.close_connection()
    assert not take(client, other, 1)


# --- the HEADERS fast path ---------------------------------------------------------------------


@pytest.mark.parametrize("end_stream", [False, True])
def test_emit_headers_makes_h2_send_headers_transitions(end_stream: bool) -> None:
    states = []
    for ours in (False, True):
        client, server = _pair()
        stream_id = _open_stream(client, server, respond=False)
        if ours:
            block = encode_block(RESPONSE)
            h2_stream = h2_internals.literal_headers_stream(server, stream_id, len(block))
            assert h2_stream is not None
            frame = HeadersFrame(stream_id, block)
            frame.flags.add("END_HEADERS")
            if end_stream:
                frame.flags.add("END_STREAM")
            out: list = []
            h2_internals.emit_headers(
                server, h2_stream, out, frame.serialize(), end_stream=end_stream
            )
            wire = b"".join(out)
        else:
            server.send_headers(stream_id, RESPONSE, end_stream=end_stream)
            wire = server.data_to_send()
        events = client.receive_data(wire)
        states.append(
            (
                server.streams[stream_id].state_machine.state,
                server.state_machine.state,
                [(type(e), getattr(e, "headers", None)) for e in events],
            )
        )
    assert states[0] == states[1]


def test_emit_headers_raises_what_h2_raises_on_a_closed_stream() -> None:
    client, server = _pair()
    stream_id = _open_stream(client, server)
    server.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    h2_stream = server.streams[stream_id]
    with pytest.raises(h2.exceptions.ProtocolError):
        h2_internals.emit_headers(server, h2_stream, [], b"", end_stream=True)


def test_literal_headers_wait_for_a_pending_table_size_update() -> None:
    client, server = _pair()
    stream_id = _open_stream(client, server, respond=False)
    assert h2_internals.literal_headers_stream(server, stream_id, 10) is not None
    client.update_settings({S.HEADER_TABLE_SIZE: 1024})
    _exchange(client, server)
    assert server.encoder.header_table.resized
    assert h2_internals.literal_headers_stream(server, stream_id, 10) is None
    server.send_headers(stream_id, RESPONSE)  # h2's encoder announces the new size
    assert not server.encoder.header_table.resized
    too_big = server.max_outbound_frame_size + 1
    assert h2_internals.literal_headers_stream(server, stream_id, too_big) is None


# --- the graceful GOAWAY bypass ----------------------------------------------------------------


def test_h2_closes_everything_on_a_graceful_goaway_so_we_bypass_it() -> None:
    """python-hyper/h2#1181: when this fails, h2 lets streams finish after a NO_ERROR GOAWAY,
    sent or received, and server_side's and client_side's bypasses can go."""
    client, server = _pair()
    stream_id = _open_stream(client, server)
    server.close_connection(error_code=0, last_stream_id=2**31 - 1)
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_data(stream_id, b"x")
    client.receive_data(server.data_to_send())
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send_data(stream_id, b"x")
    # And a server that receives the client's graceful GOAWAY can answer nothing more.
    client, server = _pair()
    stream_id = _open_stream(client, server, respond=False)
    client.close_connection(error_code=0)
    server.receive_data(client.data_to_send())
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(stream_id, RESPONSE)


# --- tearing down ------------------------------------------------------------------------------


def test_break_cycles_frees_h2_without_the_collector() -> None:
    client, server = _pair()
    _open_stream(client, server)
    client.send_headers(client.get_next_available_stream_id(), REQUEST)
    server.receive_data(client.data_to_send())
    gone = weakref.ref(server)
    stream = weakref.ref(next(iter(server.streams.values())))
    gc.collect()
    gc.disable()
    try:
        h2_internals.break_cycles(server)
        del server
        assert gone() is None
        assert stream() is None
    finally:
        gc.enable()


# --- frame repr --------------------------------------------------------------------------------


def test_h2_formats_repr_of_every_received_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the repr is made cheap: when this fails, h2 no longer formats every frame, and
    h2_internals._make_frame_repr_cheap can go."""
    client, server = _pair()
    stream_id = _open_stream(client, server)
    seen: list[int] = []
    monkeypatch.setattr(DataFrame, "__repr__", lambda self: seen.append(1) or "DataFrame")
    client.send_data(stream_id, b"x" * 100)
    server.receive_data(client.data_to_send())
    assert seen == [1]


def test_frame_repr_is_cheap() -> None:
    assert repr(DataFrame(1, b"x" * 1000)) == "DataFrame(stream_id=1)"
