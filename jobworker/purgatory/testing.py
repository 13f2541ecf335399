"""A kit for testing code that uses purgatory: in-memory pairs, loopback servers, certificates.

In memory, plaintext h2 over `trio.testing.memory_stream_pair`, on whatever clock the test runs
(virtual time works)::

    async with memory_channel(Server(methods, tls=None)) as channel:
        reply = await channel.unary("/t.T/Echo", request, Reply)

Over real TLS on loopback (port 0: tests may run side by side)::

    certs = make_cert_set(tmp_path)
    async with serve(Server(methods, tls=server_config(certs))) as served:
        async with served.connect(client_config(certs)) as channel:
            ...

Speaking HTTP/2 by hand (attack tests, regressions): ``memory_stream(server)`` or
``Served.connect_raw(tls)`` give a bare byte stream to the server, and ``RawPeer`` drives h2's own
client connection over it, writing nothing unless told::

    async with serve(server) as served, served.connect_raw(client_config(certs)) as stream:
        peer = RawPeer(stream)
        peer.queue_unary("/t.T/Echo", payload, reset=True)
        await peer.flush()
        events = await peer.read_until_closed()

Certificates: ``make_ca``/``CA.issue`` mint throwaway authorities and leaves (cryptography
only); ``make_cert_set`` builds the standard cast: a CA with a server (localhost, 127.0.0.1,
::1) and a client "alice", plus a second, unrelated CA with its own client "mallory".
Files are PEM: ``<slug>.crt`` and ``<slug>.key`` (PKCS#8, unencrypted, mode 0600). Validity runs
from an hour ago to a day ahead unless told otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .client import Channel, open_channel, open_channel_over
from .server import Server
from .tls import TLSConfig, TLSStream
from .wire import DEFAULT_MAX_MESSAGE_BYTES, encode_message

KeyType = Literal["ecdsa", "rsa", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

__all__ = [
    "CA",
    "CertSet",
    "KeyType",
    "Leaf",
    "RawPeer",
    "Served",
    "client_config",
    "make_ca",
    "make_cert_set",
    "memory_channel",
    "memory_stream",
    "request_headers",
    "serve",
    "server_config",
    "write_pem",
]


# ---------------------------------------------------------------------------------------------
# In memory


@asynccontextmanager
async def memory_channel(
    server: Server,
    *,
    authority: str = "test",
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncIterator[Channel]:
    """`server` serving one in-memory connection (plaintext h2, so `tls=None`), and a channel
    over it. On exit the channel closes, then the connection's task is cancelled."""
    async with memory_stream(server) as client_stream:
        async with open_channel_over(
            client_stream, authority=authority, max_receive_message_bytes=max_receive_message_bytes
        ) as channel:
            yield channel


@asynccontextmanager
async def memory_stream(server: Server) -> AsyncIterator[trio.abc.Stream]:
    """`server` serving one in-memory connection (plaintext h2, so `tls=None`), and the client's
    end of it as bare bytes: nothing is sent until the test sends it (see `RawPeer`). On exit
    the client's end is closed, then the connection's task is cancelled."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with _background(server.serve_stream, server_stream):
        try:
            yield client_stream
        finally:
            await trio.aclose_forcefully(client_stream)


@asynccontextmanager
async def _background(
    run: Callable[..., Awaitable[object]], *args: object, start: bool = False
) -> AsyncIterator[object]:
    """Run `run(*args)` while the block runs (with `start`: through `nursery.start`, yielding
    what it reports); cancel it after. What the block raises comes out bare, not inside the
    nursery's ExceptionGroup, so tests can `pytest.raises` around the kit."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        started = None
        if start:
            started = await nursery.start(run, *args)
        else:
            nursery.start_soon(run, *args)
        try:
            yield started
        except BaseException as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


# ---------------------------------------------------------------------------------------------
# On loopback


@dataclass(frozen=True)
class Served:
    """A server listening on loopback: where, and how to reach it."""

    server: Server
    host: str
    port: int

    def connect(self, tls: TLSConfig) -> AbstractAsyncContextManager[Channel]:
        """A channel to the server (``async with``), over TLS with `tls` (a client config)."""
        return open_channel(self.host, self.port, tls=tls)

    @asynccontextmanager
    async def connect_raw(self, tls: TLSConfig) -> AsyncIterator[TLSStream]:
        """A TLS stream to the server, handshaken, and nothing else: no HTTP/2 preface (see
        `RawPeer`). Raises what the handshake raised, e.g. when the server refused the
        connection at accept. Closed forcefully on exit."""
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream = TLSStream(tcp, tls)
        try:
            await stream.do_handshake()
            yield stream
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serve(server: Server, *, host: str = "127.0.0.1") -> AsyncIterator[Served]:
    """Run `server` on `host`, port 0 (a free port), until the block ends; then cancel it."""
    async with _background(server.serve, host, 0, start=True) as addresses:
        ((bound_host, port), *_) = addresses
        yield Served(server, bound_host, port)


# ---------------------------------------------------------------------------------------------
# Speaking HTTP/2 by hand


def request_headers(path: str, *, authority: str = "localhost") -> list[tuple[bytes, bytes]]:
    """The headers of a well-formed gRPC request to `path`."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


class RawPeer:
    """A client that speaks HTTP/2 by hand over a connected byte stream: h2's own client
    connection (`h2`), which writes nothing unless told, so a test can send what no well-behaved
    client would (frames h2 makes, or bytes made by hand on `stream`) and read the server's
    answer as h2 events. `closed` is set once the server ended the connection."""

    def __init__(self, stream: trio.abc.Stream, *, initial_window_bytes: int | None = None) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()  # queued, not sent: the first flush() sends the preface
        if initial_window_bytes is not None:
            self.h2.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window_bytes}
            )
        self.closed = False
        self._goaway_seen = False
        self._buffer = bytearray()

    async def flush(self) -> None:
        """Send what h2 has queued."""
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    def queue_unary(self, path: str, payload: bytes, *, reset: bool = False) -> int:
        """Queue one unary call (HEADERS, then DATA with END_STREAM holding one message) and,
        with `reset`, its RST_STREAM right behind, so the server reads all three at once.
        Returns the call's stream id; nothing is sent until `flush()`."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, request_headers(path))
        self.h2.send_data(stream_id, encode_message(payload), end_stream=True)
        if reset:
            self.h2.reset_stream(stream_id)
        return stream_id

    def receive(self, data: bytes) -> list[object]:
        """h2's events for `data`, fed frame by frame. After a GOAWAY, h2 refuses every further
        frame (python-hyper/h2#1181), such as the PING of our server's graceful close: such a
        frame becomes ("refused", frame type) and the events before it are kept. Before one,
        h2's ProtocolError is raised: the server sent something wrong."""
        self._buffer += data
        events: list[object] = []
        while len(self._buffer) >= 9:
            end = 9 + int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < end:
                break
            frame, self._buffer = bytes(self._buffer[:end]), self._buffer[end:]
            try:
                new = self.h2.receive_data(frame)
            except h2.exceptions.ProtocolError:
                if not self._goaway_seen:
                    raise
                events.append(("refused", frame[3]))
                continue
            self._goaway_seen |= any(isinstance(e, h2.events.ConnectionTerminated) for e in new)
            events += new
        return events

    async def read_until(
        self, done: Callable[[list[object]], bool], *, answer: bool = True
    ) -> list[object]:
        """Read the server's frames until `done(events so far)` holds or the server ends the
        connection (then `closed` is set); the events. With `answer`, send what h2 queues
        meanwhile (SETTINGS and PING acknowledgements, window updates) as a real client would;
        without, stay silent."""
        events: list[object] = []
        while not done(events):
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.closed = True
                break
            events += self.receive(data)
            if answer:
                await self.flush()
        return events

    async def read_until_closed(self, *, answer: bool = True) -> list[object]:
        """Every h2 event until the server ends the connection (see `read_until`)."""
        return await self.read_until(lambda events: False, answer=answer)


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Leaf:
    cert_file: Path
    key_file: Path
    certificate: x509.Certificate


@dataclass(frozen=True)
class CA:
    cert_file: Path
    key_file: Path
    certificate: x509.Certificate
    key: PrivateKey

    def issue(
        self,
        directory: Path,
        common_name: str,
        *,
        organizational_units: Iterable[str] = (),
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        server: bool = False,
        client: bool = False,
        key_type: KeyType = "ecdsa",
        not_valid_before: dt.datetime | None = None,
        not_valid_after: dt.datetime | None = None,
    ) -> Leaf:
        """Issue a leaf certificate signed by this CA; ``server``/``client`` pick the EKUs."""
        if not (server or client):
            raise ValueError("a leaf needs server=True, client=True or both")
        key = _generate_key(key_type)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ] * client
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            _base_builder(
                _name(common_name, organizational_units),
                self.certificate.subject,
                key,
                not_valid_before,
                not_valid_after,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, _hash_for(self.key))
        cert_file, key_file = write_pem(directory, common_name, certificate, key)
        return Leaf(cert_file, key_file, certificate)


@dataclass(frozen=True)
class CertSet:
    ca: CA
    server: Leaf  # localhost, 127.0.0.1, ::1
    alice: Leaf  # client of `ca`, OU "admin"
    other_ca: CA
    mallory: Leaf  # client of `other_ca`: trusted by nobody here


def make_ca(directory: Path, name: str = "Test CA", key_type: KeyType = "ecdsa") -> CA:
    """A self-signed CA that may sign leaves only (path length 0)."""
    key = _generate_key(key_type)
    subject = _name(name, ())
    certificate = (
        _base_builder(subject, subject, key, None, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, _hash_for(key))
    )
    cert_file, key_file = write_pem(directory, name, certificate, key)
    return CA(cert_file, key_file, certificate, key)


def make_cert_set(directory: Path, key_type: KeyType = "ecdsa") -> CertSet:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "Test CA", key_type)
    other_ca = make_ca(directory, "Other CA", key_type)
    return CertSet(
        ca=ca,
        server=ca.issue(
            directory,
            "localhost",
            dns=["localhost"],
            ips=["127.0.0.1", "::1"],
            server=True,
            key_type=key_type,
        ),
        alice=ca.issue(
            directory, "alice", organizational_units=["admin"], client=True, key_type=key_type
        ),
        other_ca=other_ca,
        mallory=other_ca.issue(
            directory, "mallory", organizational_units=["admin"], client=True, key_type=key_type
        ),
    )


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; X.509 says "no separate digest".
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str, organizational_units: Iterable[str]) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attributes += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in organizational_units
    ]
    return x509.Name(attributes)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    not_valid_before: dt.datetime | None,
    not_valid_after: dt.datetime | None,
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_valid_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_valid_after or now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def write_pem(
    directory: Path, name: str, certificate: x509.Certificate, key: PrivateKey
) -> tuple[Path, Path]:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cert"
    cert_file = directory / f"{slug}.crt"
    key_file = directory / f"{slug}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: never world-readable, not even for an instant.
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # in case the file existed with looser permissions
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return cert_file, key_file


def server_config(certs: CertSet, **kwargs: float) -> TLSConfig:
    """Our server's TLS: the set's server certificate, trusting clients of the set's CA."""
    return TLSConfig.server(
        cert_file=certs.server.cert_file,
        key_file=certs.server.key_file,
        ca_files=[certs.ca.cert_file],
        **kwargs,
    )


def client_config(
    certs: CertSet, leaf: Leaf | None = None, server_name: str = "localhost", **kwargs: float
) -> TLSConfig:
    """Our client's TLS: `leaf` (alice by default), trusting servers of the set's CA."""
    leaf = leaf or certs.alice
    return TLSConfig.client(
        cert_file=leaf.cert_file,
        key_file=leaf.key_file,
        ca_files=[certs.ca.cert_file],
        server_name=server_name,
        **kwargs,
    )
