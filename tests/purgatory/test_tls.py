"""TLSStream: trio's generic stream checks, mutual TLS policy, failures, timeouts, real sockets.

Most tests run over `trio.testing.memory_stream_pair`; timeouts run on virtual time. To play a
foreign peer (no client certificate, TLS 1.2 only, other ALPN), a test builds a raw pyOpenSSL
context and wraps it in a TLSConfig directly: TLSStream drives any context.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from jobworker.purgatory.testing import (
    CertSet,
    KeyType,
    client_config,
    make_ca,
    make_cert_set,
    server_config,
)
from jobworker.purgatory.tls import (
    RECEIVE_BYTES,
    TLSCertificateRejected,
    TLSConfig,
    TLSConfigError,
    TLSError,
    TLSHandshakeTimeout,
    TLSNegotiationFailed,
    TLSStream,
)
from jobworker.purgatory.tls.config import _dns_name_matches

# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def cert_sets(tmp_path_factory: pytest.TempPathFactory) -> Callable[[KeyType], CertSet]:
    made: dict[KeyType, CertSet] = {}

    def get(key_type: KeyType) -> CertSet:
        if key_type not in made:
            made[key_type] = make_cert_set(tmp_path_factory.mktemp(f"tls-{key_type}"), key_type)
        return made[key_type]

    return get


@pytest.fixture(scope="module")
def certs(cert_sets: Callable[[KeyType], CertSet]) -> CertSet:
    return cert_sets("ecdsa")


def raw_client_config(
    certs: CertSet,
    *,
    with_certificate: bool = True,
    alpn: list[bytes] | None = None,
    max_version: int | None = None,
) -> TLSConfig:
    """A client built straight on pyOpenSSL, free of our policy."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if with_certificate:
        context.use_certificate_file(os.fspath(certs.alice.cert_file))
        context.use_privatekey_file(os.fspath(certs.alice.key_file))
    context.load_verify_locations(os.fspath(certs.ca.cert_file))
    context.set_verify(SSL.VERIFY_PEER)
    if alpn:
        context.set_alpn_protos(alpn)
    return TLSConfig(context, False, "localhost", 10.0, certs.alice.certificate)


def tls_pair(
    client: TLSConfig,
    server: TLSConfig,
    transports: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
        trio.testing.memory_stream_pair
    ),
) -> tuple[TLSStream, TLSStream]:
    client_transport, server_transport = transports()
    return TLSStream(client_transport, client), TLSStream(server_transport, server)


async def handshake(*streams: TLSStream) -> list[Exception | None]:
    """Handshake all concurrently; return what each raised (None: it completed)."""
    outcomes: list[Exception | None] = [None] * len(streams)

    async def one(index: int, stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
        except Exception as exc:
            outcomes[index] = exc

    async with trio.open_nursery() as nursery:
        for index, stream in enumerate(streams):
            nursery.start_soon(one, index, stream)
    return outcomes


async def connected_pair(
    certs: CertSet,
    transports: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
        trio.testing.memory_stream_pair
    ),
) -> tuple[TLSStream, TLSStream]:
    client, server = tls_pair(client_config(certs), server_config(certs), transports)
    assert await handshake(client, server) == [None, None]
    return client, server


def common_name(certificate: x509.Certificate | None) -> str:
    assert certificate is not None
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


class ChoppedStream(trio.abc.Stream):
    """A transport whose receive_some hands out at most ``chunk()`` bytes at a time."""

    def __init__(self, inner: trio.abc.Stream, chunk: Callable[[], int]) -> None:
        self._inner = inner
        self._chunk = chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        limit = self._chunk()
        return await self._inner.receive_some(limit if max_bytes is None else min(limit, max_bytes))

    async def aclose(self) -> None:
        await self._inner.aclose()


def chopped_pair(chunk: Callable[[], int]) -> Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]:
    def make() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        return ChoppedStream(a, chunk), ChoppedStream(b, chunk)

    return make


# ---------------------------------------------------------------------------------------------
# trio's generic stream contract


async def test_generic_stream_contract(certs: CertSet) -> None:
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return await connected_pair(certs)

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        # lockstep: send_all blocks until the other side calls receive_some. The server's
        # session tickets are held back, or this very handshake would block.
        return await connected_pair(certs, trio.testing.lockstep_stream_pair)

    await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


@pytest.mark.parametrize("chunk", [1500, 16384 + 5 + 1])
async def test_generic_stream_contract_with_chopped_transport(certs: CertSet, chunk: int) -> None:
    # TLS records arrive in pieces: partial headers, partial bodies, several per read.
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return await connected_pair(certs, chopped_pair(lambda: chunk))

    await trio.testing.check_two_way_stream(stream_maker, None)


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=40))
async def test_any_transport_chunking_preserves_bytes(certs: CertSet, chunks: list[int]) -> None:
    sizes = itertools.cycle(chunks)
    client, server = await connected_pair(certs, chopped_pair(lambda: next(sizes)))
    payload = bytes(range(256)) * 20

    async def receive_exactly(stream: TLSStream, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            got += await stream.receive_some()
        return bytes(got)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        assert await receive_exactly(server, len(payload)) == payload
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, payload[::-1])
        assert await receive_exactly(client, len(payload)) == payload[::-1]
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


# ---------------------------------------------------------------------------------------------
# mutual TLS: the happy path


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa", "ed25519"])
async def test_mutual_tls(cert_sets: Callable[[KeyType], CertSet], key_type: KeyType) -> None:
    certs = cert_sets(key_type)
    client, server = tls_pair(client_config(certs), server_config(certs))
    assert client.peer_certificate is None and client.alpn_protocol is None
    with pytest.raises(RuntimeError, match="after the TLS handshake"):
        _ = client.tls_version

    assert await handshake(client, server) == [None, None]

    assert common_name(server.peer_certificate) == "alice"
    assert common_name(client.peer_certificate) == "localhost"
    assert server.peer_certificate == certs.alice.certificate
    assert client.peer_certificate == certs.server.certificate
    for stream in (client, server):
        assert stream.alpn_protocol == "h2"
        assert stream.tls_version == "TLSv1.3"
        assert stream.cipher == "TLS_AES_128_GCM_SHA256"
    await client.do_handshake()  # idempotent

    await client.send_all(b"ping")
    assert await server.receive_some() == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_handshake_runs_implicitly_on_first_send_and_receive(certs: CertSet) -> None:
    client, server = tls_pair(client_config(certs), server_config(certs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        assert await server.receive_some() == b"hello"
    assert client.alpn_protocol == server.alpn_protocol == "h2"


@pytest.mark.parametrize(("server_name", "sni"), [("localhost", b"localhost"), ("127.0.0.1", None)])
async def test_sni_is_sent_for_dns_names_only(
    certs: CertSet, server_name: str, sni: bytes | None
) -> None:
    seen: list[bytes | None] = []
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_file(os.fspath(certs.server.cert_file))
    context.use_privatekey_file(os.fspath(certs.server.key_file))
    context.set_alpn_select_callback(lambda conn, offered: b"h2")
    context.set_tlsext_servername_callback(lambda conn: seen.append(conn.get_servername()))
    raw_server = TLSConfig(context, True, None, 10.0, certs.server.certificate)
    client, server = tls_pair(client_config(certs, server_name=server_name), raw_server)
    assert await handshake(client, server) == [None, None]
    assert seen == [sni]


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "[::1]"])
async def test_server_ip_address_matches_ip_san(certs: CertSet, address: str) -> None:
    client, server = tls_pair(client_config(certs, server_name=address), server_config(certs))
    assert await handshake(client, server) == [None, None]


async def test_wildcard_dns_name(tmp_path: Path, certs: CertSet) -> None:
    server_leaf = certs.ca.issue(tmp_path, "wild", dns=["*.example.test"], server=True)
    server = TLSConfig.server(
        cert_file=server_leaf.cert_file,
        key_file=server_leaf.key_file,
        ca_files=[certs.ca.cert_file],
    )
    for name, ok in [
        ("api.example.test", True),
        ("a.b.example.test", False),
        ("example.test", False),
    ]:
        client, server_stream = tls_pair(client_config(certs, server_name=name), server)
        client_error, _ = await handshake(client, server_stream)
        assert (client_error is None) == ok, (name, client_error)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("localhost", "localhost", True),
        ("LocalHost.", "localhost", True),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.api.example.com", False),
        ("*.com", "example.com", False),
        ("a*.example.com", "ab.example.com", False),
        ("*.*.example.com", "a.b.example.com", False),
        ("api.*.com", "api.example.com", False),
        ("", "localhost", False),
    ],
)
def test_dns_name_matching_rules(pattern: str, host: str, matches: bool) -> None:
    assert _dns_name_matches(pattern, host) is matches


# ---------------------------------------------------------------------------------------------
# refusals


async def test_client_certificate_from_another_ca_is_refused(certs: CertSet) -> None:
    client, server = tls_pair(client_config(certs, leaf=certs.mallory), server_config(certs))
    client_error, server_error = await handshake(client, server)
    # TLS 1.3: the client's handshake is over before the server has judged its certificate ...
    assert client_error is None
    assert isinstance(server_error, TLSCertificateRejected) and not server_error.by_peer
    assert "client certificate not accepted: certificate verify failed" in str(server_error)
    assert "unable to get local issuer certificate" in str(server_error)
    assert "CN=mallory" in str(server_error)
    # ... so the verdict reaches the client on its first read.
    with pytest.raises(
        TLSCertificateRejected, match="certificate not accepted by server: unknown ca"
    ) as caught:
        await client.receive_some()
    assert caught.value.by_peer  # the type and the attribute, for a CLI to branch on
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")


async def test_client_without_certificate_is_refused(certs: CertSet) -> None:
    client, server = tls_pair(
        raw_client_config(certs, with_certificate=False, alpn=[b"h2"]), server_config(certs)
    )
    client_error, server_error = await handshake(client, server)
    assert client_error is None
    assert isinstance(server_error, TLSError)
    assert "client certificate not accepted: the client sent none" in str(server_error)
    with pytest.raises(TLSError, match="certificate not accepted by server: certificate required"):
        await client.receive_some()


async def test_expired_client_certificate_is_refused(tmp_path: Path, certs: CertSet) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = certs.ca.issue(
        tmp_path,
        "old-alice",
        client=True,
        not_valid_before=now - dt.timedelta(days=2),
        not_valid_after=now - dt.timedelta(days=1),
    )
    client, server = tls_pair(client_config(certs, leaf=expired), server_config(certs))
    _, server_error = await handshake(client, server)
    assert isinstance(server_error, TLSError)
    assert "certificate has expired" in str(server_error)
    with pytest.raises(TLSError, match="certificate not accepted by server: certificate expired"):
        await client.receive_some()


async def test_server_certificate_is_no_client_certificate(certs: CertSet) -> None:
    # The server's leaf has only the serverAuth purpose: not good for a client.
    client, server = tls_pair(client_config(certs, leaf=certs.server), server_config(certs))
    _, server_error = await handshake(client, server)
    assert isinstance(server_error, TLSError)
    assert "unsupported certificate purpose" in str(server_error)


async def test_server_name_mismatch_is_refused_by_client(certs: CertSet) -> None:
    client, server = tls_pair(
        client_config(certs, server_name="other.example"), server_config(certs)
    )
    client_error, server_error = await handshake(client, server)
    assert isinstance(client_error, TLSError)
    assert "server certificate not accepted" in str(client_error)
    assert "it is not valid for 'other.example'" in str(client_error)
    assert "DNS:localhost, IP:127.0.0.1, IP:::1" in str(client_error)
    # The server hears about it as an alert: the client stopped in the middle of the handshake.
    assert isinstance(server_error, TLSError)


async def test_server_from_another_ca_is_refused_by_client(tmp_path: Path, certs: CertSet) -> None:
    impostor = certs.other_ca.issue(tmp_path, "localhost", dns=["localhost"], server=True)
    server = TLSConfig.server(
        cert_file=impostor.cert_file, key_file=impostor.key_file, ca_files=[certs.ca.cert_file]
    )
    client, server_stream = tls_pair(client_config(certs), server)
    client_error, server_error = await handshake(client, server_stream)
    assert isinstance(client_error, TLSError)
    assert "unable to get local issuer certificate" in str(client_error)
    assert isinstance(server_error, TLSError)
    assert "certificate not accepted by client: unknown ca" in str(server_error)


async def test_tls12_client_is_refused(certs: CertSet) -> None:
    client, server = tls_pair(
        raw_client_config(certs, alpn=[b"h2"], max_version=SSL.TLS1_2_VERSION), server_config(certs)
    )
    client_error, server_error = await handshake(client, server)
    assert isinstance(server_error, TLSError)
    assert "TLS 1.3 only" in str(server_error)
    assert isinstance(client_error, TLSError)
    assert "protocol version" in str(client_error)


@pytest.mark.parametrize(
    ("alpn", "server_says"),
    [
        (None, "the client offered no ALPN"),
        ([b"http/1.1"], "the client offered http/1.1"),
    ],
)
async def test_client_without_h2_is_refused(
    certs: CertSet, alpn: list[bytes] | None, server_says: str
) -> None:
    client, server = tls_pair(raw_client_config(certs, alpn=alpn), server_config(certs))
    client_error, server_error = await handshake(client, server)
    assert isinstance(server_error, TLSNegotiationFailed)
    assert f"no ALPN protocol h2 negotiated: {server_says}" in str(server_error)
    # With an offer, the server refuses inside the handshake (alert no_application_protocol);
    # without one there is nothing to refuse, so the server hangs up after its check (and the
    # TLSStream driving this raw client notices the missing h2 by itself).
    assert isinstance(client_error, TLSError)


async def test_client_refuses_server_without_h2(certs: CertSet) -> None:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_file(os.fspath(certs.server.cert_file))
    context.use_privatekey_file(os.fspath(certs.server.key_file))
    raw_server = TLSConfig(context, True, None, 10.0, certs.server.certificate)
    client, server = tls_pair(client_config(certs), raw_server)
    client_error, _ = await handshake(client, server)
    assert isinstance(client_error, TLSError)
    assert "no ALPN protocol h2 negotiated" in str(client_error)


async def test_peer_hanging_up_during_handshake(certs: CertSet) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = TLSStream(server_transport, server_config(certs))
    await client_transport.send_all(b"\x16\x03\x01")  # the start of a record, then goodbye
    await client_transport.aclose()
    with pytest.raises(TLSError, match="closed the connection during the TLS handshake"):
        await server.do_handshake()
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()


# ---------------------------------------------------------------------------------------------
# handshake timeouts, on virtual time


@pytest.mark.parametrize("side", ["server", "client"])
async def test_handshake_timeout_with_a_silent_peer(
    certs: CertSet, autojump_clock: trio.testing.MockClock, side: str
) -> None:
    ours, _silent = trio.testing.memory_stream_pair()
    config = (
        server_config(certs, handshake_timeout_s=7.5)
        if side == "server"
        else client_config(certs, handshake_timeout_s=7.5)
    )
    stream = TLSStream(ours, config)
    start = trio.current_time()
    with pytest.raises(TLSHandshakeTimeout, match=r"within 7\.5 s"):
        await stream.do_handshake()
    assert trio.current_time() - start == pytest.approx(7.5)
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")
    await stream.aclose()


async def test_handshake_timeout_with_half_a_client_hello(
    certs: CertSet, autojump_clock: trio.testing.MockClock
) -> None:
    hello_maker = SSL.Connection(client_config(certs).context, None)
    hello_maker.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        hello_maker.do_handshake()
    client_hello = hello_maker.bio_read(65536)
    assert len(client_hello) > 100

    peer, ours = trio.testing.memory_stream_pair()
    server = TLSStream(ours, server_config(certs))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send_all, client_hello[: len(client_hello) // 2])
        with pytest.raises(TLSHandshakeTimeout):
            await server.do_handshake()
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_concurrent_handshake_callers_share_the_outcome(
    certs: CertSet, autojump_clock: trio.testing.MockClock
) -> None:
    ours, _silent = trio.testing.memory_stream_pair()
    stream = TLSStream(ours, server_config(certs, handshake_timeout_s=1.0))

    async def receiver() -> None:  # first: its receive_some runs the handshake
        with pytest.raises(TLSHandshakeTimeout):
            await stream.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError) as caught:
            await stream.do_handshake()  # waits for the receiver's handshake, shares its fate
        assert caught.type is trio.BrokenResourceError


# ---------------------------------------------------------------------------------------------
# configuration errors


def test_config_errors(tmp_path: Path, certs: CertSet) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_encrypted_key_pem(certs.server.key_file))
    good = {
        "cert_file": certs.server.cert_file,
        "key_file": certs.server.key_file,
        "ca_files": [certs.ca.cert_file],
    }
    cases: list[tuple[dict[str, object], str]] = [
        ({"cert_file": tmp_path / "missing.crt"}, "cannot read certificate file .*missing.crt"),
        ({"key_file": tmp_path / "missing.key"}, "cannot read private key file"),
        ({"ca_files": [tmp_path / "missing-ca.crt"]}, "cannot read CA file"),
        ({"cert_file": garbage}, "holds no PEM certificate"),
        ({"key_file": garbage}, "holds no usable PEM private key"),
        ({"key_file": encrypted}, "is encrypted"),
        ({"key_file": certs.alice.key_file}, "private key does not match the certificate"),
        ({"ca_files": [certs.ca.key_file]}, "CA file .* holds no PEM certificate"),
        ({"ca_files": []}, "at least one CA file"),
        ({"handshake_timeout_s": 0}, "handshake_timeout_s must be positive"),
    ]
    for change, message in cases:
        with pytest.raises(TLSConfigError, match=message):
            TLSConfig.server(**{**good, **change})  # type: ignore[arg-type]
    with pytest.raises(TLSConfigError, match="server_name must not be empty"):
        TLSConfig.client(**good, server_name="")  # type: ignore[arg-type]
    assert issubclass(TLSConfigError, ValueError)


def _encrypted_key_pem(key_file: Path) -> bytes:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def test_config_accepts_chains_and_several_ca_files(tmp_path: Path, certs: CertSet) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(certs.server.cert_file.read_bytes() + certs.ca.cert_file.read_bytes())
    config = TLSConfig.server(
        cert_file=chain,
        key_file=certs.server.key_file,
        ca_files=[certs.ca.cert_file, certs.other_ca.cert_file],
    )
    assert config.server_side and config.certificate == certs.server.certificate
    client = TLSConfig.client(
        cert_file=certs.alice.cert_file,
        key_file=certs.alice.key_file,
        ca_files=certs.ca.cert_file,  # type: ignore[arg-type]  # one path is taken as [path]
        server_name="LOCALHOST.",
    )
    assert client.server_name == "localhost"


def socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Real sockets: TLSStream runs its socket engine (OpenSSL on the descriptor)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_generic_stream_contract_on_the_socket_engine(certs: CertSet) -> None:
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return await connected_pair(certs, socket_pair)

    await trio.testing.check_two_way_stream(stream_maker, None)


async def test_socket_engine_cancelled_send_breaks_the_stream(certs: CertSet) -> None:
    client, server = await connected_pair(certs, socket_pair)
    async with trio.open_nursery() as nursery:

        async def flood() -> None:
            while True:  # nobody reads: the socket buffers fill, then send_all waits
                await client.send_all(b"x" * 65536)

        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    await client.aclose()
    await server.aclose()


async def _receive_exactly(stream: TLSStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(received)} of {size} bytes"
        received += chunk
    return bytes(received)


async def test_send_nowait_writes_what_the_socket_takes_and_send_all_the_rest(
    certs: CertSet,
) -> None:
    client, server = await connected_pair(certs, socket_pair)
    small = b"hello"
    assert client.send_nowait(small) == len(small)  # room in the socket: all of it, at once
    assert await _receive_exactly(server, len(small)) == small
    # Nobody reads: the socket buffers fill and send_nowait stops short, without waiting.
    # (OpenSSL 4 reports nothing taken until the whole buffer is out, having written part of
    # it: whatever it reports, the rest must be the next write.)
    data = bytes(range(256)) * (64 * 2**10)  # 16 MiB, more than any socket buffer
    taken = client.send_nowait(data)
    assert taken < len(data)
    # The rest, the same bytes, through send_all (which waits), completes what OpenSSL has
    # started: the peer gets every byte once, in order.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, memoryview(data)[taken:])
        assert await _receive_exactly(server, len(data)) == data
    await client.aclose()
    await server.aclose()


async def test_send_nowait_takes_nothing_where_it_would_have_to_wait(certs: CertSet) -> None:
    # The memory BIO engine: every write goes through the transport's send_all.
    client, server = await connected_pair(certs)
    assert client.send_nowait(b"x") == 0
    # Before the handshake, on the socket engine.
    client, server = tls_pair(client_config(certs), server_config(certs), socket_pair)
    assert client.send_nowait(b"x") == 0
    assert await handshake(client, server) == [None, None]
    assert client.send_nowait(b"x") == 1
    assert await _receive_exactly(server, 1) == b"x"
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        client.send_nowait(b"x")
    await server.aclose()


async def test_socket_engine_reports_a_reset_connection(certs: CertSet) -> None:
    client, server = await connected_pair(certs, socket_pair)
    await client.send_all(b"never read")
    # Closing a socket with unread data makes the kernel answer with a reset, not an EOF.
    await server.transport.aclose()
    with pytest.raises(TLSError, match="connection lost: Connection reset by peer"):
        while await client.receive_some():
            pass
    await client.aclose()


# ---------------------------------------------------------------------------------------------
# broken and closed streams


async def test_broken_transport_breaks_the_stream(certs: CertSet) -> None:
    client, server = await connected_pair(certs)
    await server.transport.aclose()  # the peer vanishes without a word
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await client.send_all(b"x" * 1000)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await client.wait_send_all_might_not_block()
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_closed_stream_refuses_everything(certs: CertSet) -> None:
    client, server = await connected_pair(certs)
    await client.aclose()
    await client.aclose()  # again: fine
    for call in (
        lambda: client.send_all(b"x"),
        lambda: client.receive_some(),
        lambda: client.wait_send_all_might_not_block(),
        lambda: client.do_handshake(),
    ):
        with pytest.raises(trio.ClosedResourceError):
            await call()
    assert await server.receive_some() == b""  # close_notify arrived
    await server.aclose()


async def test_transport_eof_without_close_notify_reads_as_eof(certs: CertSet) -> None:
    client, server = await connected_pair(certs)
    await client.send_all(b"last words")
    await client.transport.aclose()  # no close_notify
    assert await server.receive_some() == b"last words"
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""


async def test_tampered_record_is_detected_after_the_good_ones(certs: CertSet) -> None:
    client, server = await connected_pair(certs)
    await client.send_all(b"first")
    await client.send_all(b"second")
    transport = server.transport
    assert isinstance(transport, trio.StapledStream)
    ciphertext = bytearray(await transport.receive_some())  # steal both records
    ciphertext[-1] ^= 1  # flip a bit in the second record's tag
    transport.receive_stream.put_data(bytes(ciphertext))
    assert await server.receive_some() == b"first"
    with pytest.raises(TLSError, match=r"TLS error: .*(bad record mac|decryption failed)"):
        await server.receive_some()
    with pytest.raises(TLSError, match="bad record mac"):  # the server told the client why
        await client.receive_some()


async def test_cancelled_receive_leaves_the_stream_usable(certs: CertSet) -> None:
    client, server = await connected_pair(certs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await client.send_all(b"still here")
    assert await server.receive_some() == b"still here"


async def test_cancelled_send_breaks_the_stream(certs: CertSet) -> None:
    client, _server = await connected_pair(certs, trio.testing.lockstep_stream_pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"stuck")  # lockstep: nobody reads, so it blocks
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")


async def test_aclose_is_bounded_when_the_peer_never_reads(
    certs: CertSet, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = await connected_pair(certs, trio.testing.lockstep_stream_pair)
    start = trio.current_time()
    await client.aclose()  # close_notify can't go out: lockstep, and the server never reads
    assert trio.current_time() - start == pytest.approx(1.0)
    await server.aclose()


async def test_one_task_sends_while_another_receives(certs: CertSet) -> None:
    # HTTP/2's shape: a reader task and a writer task on each end, all at once.
    client, server = await connected_pair(certs)
    data = os.urandom(3 * RECEIVE_BYTES + 12345)

    async def write(stream: TLSStream, payload: bytes) -> None:
        for start in range(0, len(payload), 65536):
            await stream.send_all(payload[start : start + 65536])

    async def read(stream: TLSStream, expected: bytes) -> None:
        got = bytearray()
        while len(got) < len(expected):
            got += await stream.receive_some()
        assert got == expected

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, client, data)
        nursery.start_soon(write, server, data[::-1])
        nursery.start_soon(read, server, data)
        nursery.start_soon(read, client, data[::-1])


# ---------------------------------------------------------------------------------------------
# real sockets


async def test_loopback_tcp_transfer(certs: CertSet) -> None:
    size = 4 * 1024 * 1024 + 17
    upstream, downstream = os.urandom(size), os.urandom(size)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def exchange(stream: TLSStream, send: bytes, expect: bytes) -> None:
        async def write() -> None:
            view = memoryview(send)
            for start in range(0, size, 65536):
                await stream.send_all(view[start : start + 65536])

        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            while len(got) < size:
                chunk = await stream.receive_some()
                assert chunk
                got += chunk
        assert got == expect

    async def serve() -> None:
        transport = await listeners[0].accept()
        async with TLSStream(transport, server_config(certs)) as server:
            await server.do_handshake()
            await exchange(server, downstream, upstream)
            assert await server.receive_some() == b""

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        async with TLSStream(transport, client_config(certs, server_name="127.0.0.1")) as client:
            await client.do_handshake()
            await exchange(client, upstream, downstream)
    await listeners[0].aclose()


def test_cert_helper_writes_private_keys_0600(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "Mode CA", "ed25519")
    leaf = ca.issue(tmp_path, "someone", client=True, key_type="rsa")
    for key_file in (ca.key_file, leaf.key_file):
        assert key_file.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------------------------
# what tls/openssl_internals.py assumes about pyOpenSSL


def _bio_pair(certs: CertSet) -> tuple[SSL.Connection, SSL.Connection]:
    """A client and a server pyOpenSSL connection over memory BIOs, handshake done."""
    client = SSL.Connection(client_config(certs).context, None)
    client.set_connect_state()
    server = SSL.Connection(server_config(certs).context, None)
    server.set_accept_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(2**20))
            except SSL.WantReadError:
                pass
    return client, server


def _deliver(a: SSL.Connection, b: SSL.Connection) -> None:
    b.bio_write(a.bio_read(2**20))


def test_read_plaintext_reads_what_recv_reads_and_raises_what_it_raises(certs: CertSet) -> None:
    from jobworker.purgatory.tls import openssl_internals as internals

    assert internals.FAST_READ
    client, server = _bio_pair(certs)
    buffer, address = internals.scratch(64 * 1024)
    for reader in ("ours", "recv"):
        payload = os.urandom(40_000)  # three records
        server.sendall(payload)
        _deliver(server, client)
        got = b""
        while len(got) < len(payload):
            if reader == "ours":
                n = internals.read_plaintext(client, address, 64 * 1024)
                got += bytes(buffer[:n])
            else:
                got += client.recv(64 * 1024)
        assert got == payload
        # Nothing left to read: the same exception either way.
        with pytest.raises(SSL.WantReadError):
            internals.read_plaintext(client, address, 1024)
        with pytest.raises(SSL.WantReadError):
            client.recv(1024)
    server.shutdown()  # close_notify
    _deliver(server, client)
    with pytest.raises(SSL.ZeroReturnError):
        internals.read_plaintext(client, address, 1024)
    with pytest.raises(SSL.ZeroReturnError):
        client.recv(1024)


def test_scratch_is_one_buffer_per_thread_grown_when_needed() -> None:
    import threading

    from jobworker.purgatory.tls.openssl_internals import scratch

    small, _ = scratch(1024)
    again, _ = scratch(512)
    assert again is small and len(small) >= 1024
    large, _ = scratch(len(small) + 1)
    assert large is not small and len(large) > len(small)
    other: list[bytearray] = []
    thread = threading.Thread(target=lambda: other.append(scratch(1024)[0]))
    thread.start()
    thread.join()
    assert other[0] is not large
