"""Issue 13, the rows the event loop decides: over real sockets and real TLS, attack clients
that speak raw HTTP/2 (the kit's RawPeer) against our server, each attack shown to run
and to fail, and bystanders shown to go on."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue
from hyperframe.frame import GoAwayFrame

from jobworker.purgatory import GrpcError, RpcMethod, Server, Status, default_max_connections
from jobworker.purgatory.limits import REFUSALS_PER_IDENTITY, RateLimitedLog
from jobworker.purgatory.testing import (
    CertSet,
    RawPeer,
    Served,
    client_config,
    make_cert_set,
    request_headers,
    serve,
    server_config,
)
from jobworker.purgatory.wire import encode_message
from jobworker.purgatory.wire.core import DEFAULT_STREAM_WINDOW_BYTES


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def bob(certs, tmp_path_factory):
    return certs.ca.issue(tmp_path_factory.mktemp("bob"), "bob", client=True)


def common_name(certificate) -> str:
    from cryptography.x509.oid import NameOID

    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


class App:
    def __init__(self) -> None:
        self.echoed = 0
        self.streams_started = 0
        self.release = trio.Event()
        self.stalled = trio.Event()
        self.stall_cancelled = trio.Event()
        self.stalls_running = 0

    async def echo(self, request: StringValue, call) -> StringValue:
        self.echoed += 1
        return request

    async def hold(self, request: StringValue, call) -> None:
        self.streams_started += 1
        await call.send(BytesValue(value=b"started"))
        await self.release.wait()

    async def stall(self, requests, call) -> StringValue:
        """A client-streaming handler that never reads its requests."""
        self.stalled.set()
        self.stalls_running += 1
        try:
            await trio.sleep_forever()
        finally:
            self.stalls_running -= 1
            self.stall_cancelled.set()


def make_server(certs: CertSet, app: App, **options) -> Server:
    return Server(
        [
            RpcMethod("/t.T/Echo", StringValue, StringValue, app.echo),
            RpcMethod("/t.T/Hold", StringValue, BytesValue, app.hold, server_streaming=True),
            RpcMethod("/t.T/Stall", BytesValue, StringValue, app.stall, client_streaming=True),
        ],
        tls=server_config(certs),
        identify=common_name,
        **options,
    )


def purgatory_records(caplog, level: int = logging.DEBUG) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("jobworker.purgatory") and r.levelno >= level
    ]


async def echo_once(served: Served, tls) -> str:
    async with served.connect(tls) as channel:
        reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    return reply.value


# --- a client stream flooded while its handler does not read ----------------------------------


def answered(stream_id: int):
    def done(events: list[object]) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in events
        )

    return done


async def test_a_flooded_client_stream_whose_handler_does_not_read_stays_bounded(certs):
    app = App()
    server = make_server(certs, app)
    async with (
        serve(server) as served,
        served.connect_raw(client_config(certs)) as stream,
    ):
        peer = RawPeer(stream)
        await peer.flush()
        # The server's SETTINGS (its stream window) and its connection window's increase.
        await peer.read_until(
            lambda events: any(
                isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0 for e in events
            )
        )
        flood_id = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(flood_id, request_headers("/t.T/Stall"))
        message = encode_message(BytesValue(value=b"x" * 65536).SerializeToString())
        sent = 0
        # As much as flow control lets a well-behaved client send: one stream window.
        while peer.h2.local_flow_control_window(flood_id) >= len(message):
            peer.h2.send_data(flood_id, message)
            sent += len(message)
        # A bystander call behind the flood: once it is answered, every frame before it has
        # been read, and any window the server gave back for the flood came before the answer.
        echo_id = peer.queue_unary("/t.T/Echo", StringValue(value="hi").SerializeToString())
        await peer.flush()
        events = await peer.read_until(answered(echo_id))
        assert not peer.closed
        assert app.stalled.is_set()
        given_back = [
            e for e in events if isinstance(e, h2.events.WindowUpdated) and e.stream_id == flood_id
        ]
        assert given_back == [], "the server acknowledged messages its handler never read"
        (connection,) = server._connections
        held = connection._calls[flood_id]._inbox.payload_bytes
        assert sent > DEFAULT_STREAM_WINDOW_BYTES // 2  # the attack ran
        assert held <= DEFAULT_STREAM_WINDOW_BYTES
        # Past the window: a connection error (FLOW_CONTROL_ERROR), never a bigger buffer.
        beyond = b"\0" * 65536
        header = len(beyond).to_bytes(3, "big") + b"\x00\x00" + flood_id.to_bytes(4, "big")
        await stream.send_all(header + beyond)
        events = await peer.read_until_closed(answer=False)
        (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
        with trio.fail_after(5):  # a hang guard
            await app.stall_cancelled.wait()
        # Bystanders on other connections are served.
        assert await echo_once(served, client_config(certs)) == "hi"


# --- row 2: a call reset in the read that opened it --------------------------------------------


def ended(events: list[object]) -> bool:
    return any(isinstance(e, h2.events.StreamEnded) for e in events)


async def test_calls_reset_with_their_request_end_quietly(certs, caplog):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    app = App()
    calls = 200
    async with (
        serve(make_server(certs, app)) as served,
        served.connect_raw(client_config(certs)) as stream,
    ):
        peer = RawPeer(stream)
        for _ in range(calls):
            peer.queue_unary("/t.T/Echo", StringValue(value="x").SerializeToString(), reset=True)
        # The attack's last frame, then a well-behaved call on the same connection: its answer
        # proves the server read every frame before it (frames are processed in order).
        last_stream_id = peer.queue_unary(
            "/t.T/Echo", StringValue(value="after").SerializeToString()
        )
        await peer.flush()
        events = await peer.read_until(ended)
        assert not peer.closed, "the server closed the connection"
    answered = [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)]
    # Reset streams got no answer; the connection lived on; the bystander call was answered.
    assert last_stream_id == 2 * calls + 1
    assert answered == [last_stream_id]
    assert app.echoed <= calls + 1
    assert purgatory_records(caplog, logging.INFO) == []


async def test_a_stream_reset_while_its_handler_sends_cancels_it_quietly(certs, caplog):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    app = App()
    async with (
        serve(make_server(certs, app)) as served,
        served.connect_raw(client_config(certs)) as stream,
    ):
        peer = RawPeer(stream)
        for _ in range(50):
            peer.queue_unary("/t.T/Hold", b"", reset=True)
        peer.queue_unary("/t.T/Echo", b"")
        await peer.flush()
        await peer.read_until(ended, answer=False)
        assert not peer.closed, "the server closed the connection"
    assert app.streams_started == 0  # reset before they started: never run
    assert purgatory_records(caplog, logging.INFO) == []


async def test_client_streams_reset_while_their_handlers_wait_end_quietly(certs, caplog):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    app = App()
    streams = 50
    server = make_server(certs, app)
    async with (
        serve(server) as served,
        served.connect_raw(client_config(certs)) as stream,
    ):
        peer = RawPeer(stream)
        opened = []
        for _ in range(streams):  # each sends a message and leaves its request open
            stream_id = peer.h2.get_next_available_stream_id()
            peer.h2.send_headers(stream_id, request_headers("/t.T/Stall"))
            peer.h2.send_data(stream_id, encode_message(b""))
            opened.append(stream_id)
        await peer.flush()
        await settle(lambda: app.stalls_running == streams)
        for stream_id in opened:
            peer.h2.reset_stream(stream_id)
        echo_id = peer.queue_unary("/t.T/Echo", StringValue(value="hi").SerializeToString())
        await peer.flush()
        events = await peer.read_until(answered(echo_id))
        assert not peer.closed, "the server closed the connection"
        await settle(lambda: app.stalls_running == 0)  # every handler was cancelled
        (connection,) = server._connections
        assert connection._calls == {}
    # The reset streams got no answer; only the bystander did.
    assert [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)] == [echo_id]
    assert purgatory_records(caplog, logging.INFO) == []


# --- row 12: request bytes that are not a valid message ------------------------------------------


async def test_a_string_field_that_is_not_utf8_is_invalid_argument(certs):
    app = App()
    async with (
        serve(make_server(certs, app)) as served,
        served.connect(client_config(certs)) as channel,
    ):
        # Field 1, length-delimited, as StringValue expects, but the bytes are not UTF-8.
        with pytest.raises(GrpcError) as caught:
            await channel.unary("/t.T/Echo", BytesValue(value=b"\xff\xfe"), StringValue)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "could not parse the request message" in caught.value.message
    assert app.echoed == 0


# --- row 5: timeouts ---------------------------------------------------------------------------


async def test_connections_that_never_send_the_preface_are_cut(certs, caplog, autojump_clock):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    app = App()
    server = make_server(certs, app, preface_timeout_s=5, first_request_timeout_s=1000)
    holders = 20
    async with serve(server) as served:
        async with trio.open_nursery() as attack:
            closed_at: list[float] = []

            async def hold() -> None:
                async with served.connect_raw(client_config(certs)) as stream:
                    peer = RawPeer(stream)  # our h2 state only; nothing is sent
                    events = await peer.read_until_closed(answer=False)
                    # The server's SETTINGS came, then the end of the connection.
                    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
                    closed_at.append(trio.current_time())

            start = trio.current_time()
            for _ in range(holders):
                attack.start_soon(hold)
        assert len(closed_at) == holders
        assert all(t - start >= 5 for t in closed_at)  # virtual time: not before the timeout
        assert server.admission.connections == 0
        cut = [r for r in purgatory_records(caplog) if "no HTTP/2 preface" in r.getMessage()]
        assert len(cut) == 1  # one line for the burst
        assert await echo_once(served, client_config(certs)) == "hi"


async def test_a_connection_without_a_call_is_cut_after_the_first_request_timeout(
    certs, autojump_clock
):
    server = make_server(certs, App(), first_request_timeout_s=30, idle_timeout_s=1000)
    async with serve(server) as served, served.connect_raw(client_config(certs)) as stream:
        peer = RawPeer(stream)
        await peer.flush()  # the preface and SETTINGS, then nothing
        start = trio.current_time()
        events = await peer.read_until_closed()
    assert trio.current_time() - start >= 30
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == 0  # graceful


async def test_calls_whose_request_never_comes_end_and_the_connection_goes_idle(
    certs, autojump_clock
):
    """Streams of HEADERS alone: each call is answered DEADLINE_EXCEEDED once its request is
    late, no handler runs, and with no call left open the idle timeout closes the connection
    (an open call would have held it forever)."""
    app = App()
    server = make_server(certs, app, request_timeout_s=10, idle_timeout_s=60)
    async with serve(server) as served, served.connect_raw(client_config(certs)) as stream:
        peer = RawPeer(stream)
        calls = []
        for _ in range(50):
            calls.append(peer.h2.get_next_available_stream_id())
            peer.h2.send_headers(calls[-1], request_headers("/t.T/Echo"))
        await peer.flush()
        start = trio.current_time()
        events = await peer.read_until_closed()
    answered = {
        e.stream_id: dict(e.headers)
        for e in events
        if isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived)
    }
    assert sorted(answered) == calls
    assert {headers[b"grpc-status"] for headers in answered.values()} == {b"4"}  # DEADLINE
    assert b"request_timeout_s" in answered[calls[0]][b"grpc-message"]
    assert app.echoed == 0
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == 0  # the graceful close of an idle connection
    assert trio.current_time() - start >= 10 + 60


def goaway(error_code: int) -> bytes:
    """A client's GOAWAY, made by hand: h2's own client would close its state machine on
    sending it and refuse to read the answers still due (python-hyper/h2#1181)."""
    frame = GoAwayFrame(0)
    frame.last_stream_id, frame.error_code = 0, error_code
    return frame.serialize()


async def test_a_client_that_says_goaway_gets_its_answers_then_the_connection_closes(
    certs, autojump_clock
):
    app = App()
    server = make_server(certs, app, idle_timeout_s=300)
    async with serve(server) as served, served.connect_raw(client_config(certs)) as stream:
        peer = RawPeer(stream)
        held = peer.queue_unary("/t.T/Hold", StringValue().SerializeToString())
        await peer.flush()
        await peer.read_until(lambda events: app.streams_started == 1)
        start = trio.current_time()
        await stream.send_all(goaway(0))  # graceful: no more calls from it
        app.release.set()  # the call in flight still gets its answer
        events = await peer.read_until_closed()
    ends = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
    assert [(e.stream_id, dict(e.headers)[b"grpc-status"]) for e in ends] == [(held, b"0")]
    assert trio.current_time() - start < 300  # closed once answered, not at the idle timeout


async def test_a_client_goaway_with_an_error_closes_at_once_and_cancels_its_calls(
    certs, autojump_clock
):
    app = App()
    server = make_server(certs, app, idle_timeout_s=300)
    async with serve(server) as served, served.connect_raw(client_config(certs)) as stream:
        peer = RawPeer(stream)
        peer.queue_unary("/t.T/Hold", StringValue().SerializeToString())
        await peer.flush()
        await peer.read_until(lambda events: app.streams_started == 1)
        start = trio.current_time()
        await stream.send_all(goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR))
        events = await peer.read_until_closed()
        # While the server still serves: it released the connection itself.
        await settle(lambda: server.admission.connections == 0)
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in events)
    assert trio.current_time() - start < 300


async def test_idle_connections_are_closed_gracefully_and_busy_ones_are_not(certs, autojump_clock):
    app = App()
    server = make_server(certs, app, idle_timeout_s=60)
    async with (
        serve(server) as served,
        served.connect(client_config(certs)) as idle,
        served.connect(client_config(certs)) as busy,
    ):
        await idle.unary("/t.T/Echo", StringValue(value="x"), StringValue)
        async with busy.server_stream("/t.T/Hold", StringValue(), BytesValue) as replies:
            await replies.__anext__()
            await idle.going_away.wait()  # the idle one hears GOAWAY...
            # ...and the server closes it (its slot is freed once the stream is closed): only
            # the busy one is left.
            await settle(lambda: server.admission.connections == 1)
            idle_closed = trio.current_time()
            await trio.sleep(600)  # virtual: ten idle timeouts
            assert not busy.going_away.is_set()  # an open call is not idleness
            app.release.set()
            assert [r async for r in replies] == []
        assert idle_closed >= 60
        # Idle again now: the busy one goes the same way.
        await busy.going_away.wait()
        await settle(lambda: server.admission.connections == 0)


async def settle(condition) -> None:
    """Until `condition()` holds: each round lets every task, ours and the server's, run until
    blocked (on loopback, what one side wrote the other can already read)."""
    with trio.fail_after(60):
        while not condition():
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)


# --- row 5: connection caps --------------------------------------------------------------------


async def test_the_per_identity_cap_refuses_that_identity_only(certs, bob, caplog):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    app = App()
    server = make_server(certs, app, max_connections_per_identity=2)
    alice = client_config(certs)
    async with serve(server) as served:
        async with served.connect(alice) as first, served.connect(alice) as second:
            for channel in (first, second):
                await channel.unary("/t.T/Echo", StringValue(value="a"), StringValue)
            for _ in range(3):  # a burst of refusals, one log line
                async with served.connect(alice) as third:
                    with pytest.raises(GrpcError) as refused:
                        await third.unary("/t.T/Echo", StringValue(value="a"), StringValue)
                    assert refused.value.status is Status.RESOURCE_EXHAUSTED
                    assert "max_connections_per_identity" in refused.value.message
                    # And the server closes it while we still hold it: its slot is freed once
                    # the stream is closed, leaving alice's two.
                    await settle(lambda: server.admission.connections == 2)
            assert await echo_once(served, client_config(certs, bob)) == "hi"
        lines = [
            r for r in purgatory_records(caplog) if "max_connections_per_identity" in r.getMessage()
        ]
        assert len(lines) == 1
        # Alice's slots are free again once her connections closed.
        await settle(lambda: server.admission.connections_of(("identity", "alice")) == 0)
        assert await echo_once(served, alice) == "hi"


async def test_surplus_connections_of_one_identity_cannot_pile_up(certs, bob):
    """A client that reconnects in a loop beyond its cap: a few surplus connections stay long
    enough to be told why (they get the server's SETTINGS, then a refusal on their first call,
    or a close within a second without one); the rest are closed right after the handshake,
    before a byte of HTTP/2. So they cannot fill the total cap and lock others out."""
    server = make_server(certs, App(), max_connections_per_identity=1)
    alice = client_config(certs)
    surplus = REFUSALS_PER_IDENTITY + 3
    received: list[bytes] = []

    async def hold(stream) -> None:
        data = b""
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
        received.append(data)

    async with serve(server) as served, served.connect(alice) as admitted:
        await admitted.unary("/t.T/Echo", StringValue(value="a"), StringValue)
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            for _ in range(surplus):
                stream = await stack.enter_async_context(served.connect_raw(alice))
                nursery.start_soon(hold, stream)
        # Every surplus connection was ended by the server, none by us.
        told = [data for data in received if data]
        assert len(received) == surplus
        assert len(told) == REFUSALS_PER_IDENTITY  # SETTINGS first: HTTP/2 was spoken
        assert all(data[3] == 0x4 for data in told)  # the first frame is SETTINGS
        assert server.admission.connections_of(("identity", "alice")) == 1
        assert await echo_once(served, client_config(certs, bob)) == "hi"


async def test_the_total_cap_refuses_at_accept_with_one_line_per_burst(certs, caplog):
    caplog.set_level(logging.DEBUG, logger="jobworker.purgatory")
    server = make_server(certs, App(), max_connections=2)
    async with (
        serve(server) as served,
        served.connect_raw(client_config(certs)),
        served.connect_raw(client_config(certs)),
    ):
        for _ in range(5):
            with pytest.raises(trio.BrokenResourceError):  # closed at accept: no handshake
                async with served.connect_raw(client_config(certs)):
                    pass
        assert server.admission.connections == 2
    lines = [r for r in purgatory_records(caplog) if "max_connections=2" in r.getMessage()]
    assert len(lines) == 1
    assert "(unknown)" not in lines[0].getMessage()  # the refused peer is named


async def test_an_identify_that_raises_ends_that_connection_not_the_server(certs, bob):
    def identify(certificate):
        if common_name(certificate) == "alice":
            raise KeyError("alice")  # a bug in the application's identify
        return common_name(certificate)

    server = Server(
        [RpcMethod("/t.T/Echo", StringValue, StringValue, App().echo)],
        tls=server_config(certs),
        identify=identify,
    )
    async with serve(server) as served:
        with pytest.raises(GrpcError) as caught:
            await echo_once(served, client_config(certs))
        assert caught.value.status is Status.UNAVAILABLE  # alice's connection ended
        assert await echo_once(served, client_config(certs, bob)) == "hi"  # still serving
        await settle(lambda: server.admission.connections == 0)


async def test_the_handshake_cap_per_address_refuses_silent_tcp_connections(certs):
    server = make_server(certs, App(), max_handshakes_per_address=3)
    async with serve(server) as served:
        silent = [await trio.open_tcp_stream(served.host, served.port) for _ in range(3)]
        try:
            await settle(lambda: server.admission.handshakes == 3)
            refused = await trio.open_tcp_stream(served.host, served.port)
            async with refused:
                assert await refused.receive_some(100) == b""  # closed at once, unanswered
        finally:
            for stream in silent:
                await stream.aclose()
        await settle(lambda: server.admission.handshakes == 0)
        assert await echo_once(served, client_config(certs)) == "hi"


def test_the_default_total_cap_leaves_descriptors_in_reserve() -> None:
    assert default_max_connections(1024) == 512
    assert default_max_connections(20000) == 4096  # memory, not descriptors, bounds it
    assert default_max_connections(64) == 32
    assert default_max_connections() < 2**31


async def test_a_rate_limited_log_reports_what_it_held_back(caplog, autojump_clock):
    caplog.set_level(logging.DEBUG, logger="t")
    limited = RateLimitedLog(logging.getLogger("t"), interval_s=10)
    for _ in range(50):
        limited(logging.WARNING, "kind", "event %s", "x")
    limited(logging.WARNING, "other", "another kind")
    await trio.sleep(10)
    limited(logging.WARNING, "kind", "event %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "event x",
        "another kind",
        "event y (and 49 more like it in the last 10 s)",
    ]
