"""TLS policy against foreign and unusual peers over loopback: a TLS 1.2-only client (Python's
`ssl`, through `trio.SSLStream`) is refused by our server; Ed25519 certificates work between our
own client and server (grpcio cannot do Ed25519, so only our side is tested with them)."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import ModuleType

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ed25519

from jobworker.purgatory import Server
from jobworker.purgatory.testing import CertSet, make_cert_set, serve

from .harness import (
    GUARD_S,
    STREAM,
    UNARY,
    Served,
    StreamCheck,
    TrioSpy,
    expected_digest,
    purgatory_client_tls,
    purgatory_methods,
    purgatory_server_tls,
)


async def stdlib_handshake(
    port: int, certs: CertSet, maximum_version: ssl.TLSVersion
) -> tuple[str | None, str | None]:
    """Handshake with Python's ssl as alice, offering h2; the negotiated (ALPN, version)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = maximum_version
    context.load_verify_locations(certs.ca.cert_file)
    context.load_cert_chain(certs.alice.cert_file, certs.alice.key_file)
    context.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await stream.do_handshake()
        return stream.selected_alpn_protocol(), stream.version()
    finally:
        await trio.aclose_forcefully(stream)


async def test_a_tls12_only_client_is_refused(purgatory_server: Served, certs: CertSet) -> None:
    port = purgatory_server.port
    with trio.fail_after(GUARD_S):
        # The control: the same client allowed TLS 1.3 gets in.
        assert await stdlib_handshake(port, certs, ssl.TLSVersion.TLSv1_3) == ("h2", "TLSv1.3")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await stdlib_handshake(port, certs, ssl.TLSVersion.TLSv1_2)
    error = caught.value.__cause__
    assert isinstance(error, ssl.SSLError)
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # our server said why


async def test_ed25519_certificates_work_between_purgatory_peers(
    pb: ModuleType, tmp_path: Path
) -> None:
    certs = make_cert_set(tmp_path, "ed25519")
    assert isinstance(certs.server.certificate.public_key(), ed25519.Ed25519PublicKey)
    assert isinstance(certs.alice.certificate.public_key(), ed25519.Ed25519PublicKey)
    server = Server(purgatory_methods(pb, TrioSpy()), tls=purgatory_server_tls(certs))
    request = pb.StreamRequest(chunks=16, chunk_bytes=4096, seed=3)
    check = StreamCheck()
    with trio.fail_after(GUARD_S):
        async with (
            serve(server) as on_loopback,
            on_loopback.connect(purgatory_client_tls(certs)) as channel,
        ):
            reply = await channel.unary(UNARY, pb.EchoRequest(text="ed25519"), pb.EchoReply)
            async with channel.server_stream(STREAM, request, pb.Chunk) as chunks:
                async for chunk in chunks:
                    check.add(chunk)
            await server.shutdown(1.0)  # while our client is still there to answer the PING
    assert reply.text == "ed25519"
    assert (check.count, check.digest()) == (16, expected_digest(3, 16, 4096))
