"""What a peer controls in a TLS handshake — its certificate's subject, the ALPN names it offers —
never takes the server down and never forges a log line. Real certificates, a real server on
loopback, clients that are not ours (stdlib ssl through `trio.SSLStream`, raw pyOpenSSL).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.wrappers_pb2 import StringValue
from OpenSSL import crypto

from jobworker.purgatory import RpcMethod, Server
from jobworker.purgatory.testing import (
    CertSet,
    client_config,
    make_cert_set,
    serve,
    server_config,
)
from jobworker.purgatory.tls import config as tls_config
from jobworker.purgatory.tls import stream as stream_module


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


async def _echo(request: StringValue, call) -> StringValue:
    return StringValue(value=request.value)


ECHO = RpcMethod("/t.T/Echo", StringValue, StringValue, _echo)


def _self_signed(directory: Path, name: x509.Name) -> tuple[Path, Path, bytes]:
    """A self-signed client certificate for `name`: its PEM file, key file, and DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_file = directory / "peer.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    cert_file = directory / "peer.crt"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file, der


def _unreadable_subject_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate whose subject CN is a PrintableString "@@@@": OpenSSL parses it, but
    cryptography refuses to read the subject (ValueError). Made by rewriting a real
    certificate's DER (its signature no longer matches: it is rejected, as an attacker's is)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ZZZZ")])
    _, key_file, der = _self_signed(directory, name)
    at = der.index(b"ZZZZ")
    assert der[at - 2 : at] == b"\x0c\x04"  # UTF8String, 4 bytes
    bad = der[: at - 2] + b"\x13\x04@@@@" + der[at + 4 :]  # PrintableString "@@@@"
    loaded = crypto.load_certificate(crypto.FILETYPE_ASN1, bad)
    with pytest.raises(ValueError):  # what used to escape the verify callback
        loaded.to_cryptography().subject.rfc4514_string()
    cert_file = directory / "bad.crt"
    cert_file.write_bytes(crypto.dump_certificate(crypto.FILETYPE_PEM, loaded))
    return cert_file, key_file


class _Lines(logging.Handler):
    """The records logged by purgatory, and an event set when one containing `text` arrives."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.records: list[logging.LogRecord] = []
        self.arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.arrived.set()

    def matching(self) -> list[str]:
        return [r.getMessage() for r in self.records if self.text in r.getMessage()]


@pytest.fixture
def handshake_lines():
    lines = _Lines("TLS handshake with")
    logger = logging.getLogger("jobworker.purgatory")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


async def _foreign_client(host: str, port: int, context: ssl.SSLContext) -> None:
    """Connect with a stdlib TLS client, then read until the server says no."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
            await stream.receive_some()  # TLS 1.3: the rejection arrives on the first read
    finally:
        await trio.aclose_forcefully(stream)


def _stdlib_client(cert_file: Path, key_file: Path, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_an_unreadable_certificate_subject_ends_only_its_connection(
    certs, tmp_path, handshake_lines
):
    cert_file, key_file = _unreadable_subject_certificate(tmp_path)
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        await _foreign_client(served.host, served.port, _stdlib_client(cert_file, key_file, ["h2"]))
        with trio.fail_after(5):
            await handshake_lines.arrived.wait()
        async with served.connect(client_config(certs)) as channel:
            reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "hi"
    [line] = handshake_lines.matching()
    assert "certificate verify failed" in line, line
    assert "unreadable" in line, line


async def test_any_exception_in_a_handshake_ends_only_that_connection(
    certs, monkeypatch, handshake_lines
):
    # Whatever the next edge is: here the verify callback itself raises (pyOpenSSL re-raises
    # it from do_handshake, as no SSL.Error). The server logs it and serves on.
    real = tls_config.subject_of

    def broken(cert):
        if "CN=mallory" in real(cert):  # the server's callback, on the client's leaf
            raise RuntimeError("a callback bug")
        return real(cert)

    monkeypatch.setattr(tls_config, "subject_of", broken)
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        with pytest.raises(trio.BrokenResourceError):
            async with served.connect_raw(client_config(certs, certs.mallory)) as stream:
                await stream.receive_some()
        with trio.fail_after(5):
            await handshake_lines.arrived.wait()
        monkeypatch.undo()
        async with served.connect(client_config(certs)) as channel:
            reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "hi"
    [record] = [r for r in handshake_lines.records if handshake_lines.text in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


FORGED = 'INFO jobworker.purgatory TLS handshake ok: client certificate "CN=alice"'


def _assert_one_safe_line(lines: _Lines) -> str:
    [line] = lines.matching()
    assert line.isprintable(), repr(line)  # no newline, no escape sequence: one line
    assert len(line) < 3000
    return line


async def test_a_subject_with_a_newline_cannot_forge_a_log_line(certs, tmp_path, handshake_lines):
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mallory\n" + FORGED)])
    cert_file, key_file, _ = _self_signed(tmp_path, name)
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        await _foreign_client(served.host, served.port, _stdlib_client(cert_file, key_file, ["h2"]))
        with trio.fail_after(5):
            await handshake_lines.arrived.wait()
    line = _assert_one_safe_line(handshake_lines)
    assert "unverified client certificate" in line, line
    assert "mallory\\nINFO" in line, line  # shown, escaped


async def test_offered_alpn_names_cannot_forge_a_log_line(certs, handshake_lines):
    offered = ["x\n" + FORGED, "\x1b[2J", *[f"p{i}" for i in range(50)]]
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        client = _stdlib_client(certs.alice.cert_file, certs.alice.key_file, offered)
        await _foreign_client(served.host, served.port, client)
        with trio.fail_after(5):
            await handshake_lines.arrived.wait()
    line = _assert_one_safe_line(handshake_lines)
    assert "no ALPN protocol h2 negotiated" in line, line
    assert "x\\nINFO" in line and "\\x1b[2J" in line, line
    assert "and 44 more" in line, line  # the list is bounded


async def test_a_successful_handshake_does_not_format_the_subject(certs, monkeypatch):
    formatted = []
    real = tls_config.subject_of

    def counting(cert):
        formatted.append(cert)
        return real(cert)

    monkeypatch.setattr(tls_config, "subject_of", counting)
    monkeypatch.setattr(stream_module, "subject_of", counting, raising=False)
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        async with served.connect(client_config(certs)) as channel:
            reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "hi"
    assert formatted == []


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def _trusted_unreadable_certificate(certs: CertSet, directory: Path) -> tuple[Path, Path]:
    """A client certificate our CA really signed whose subject cryptography cannot read (a CN
    as a PrintableString "@@@@"): it passes OpenSSL's verification, and fails only when the
    verified certificate is read afterwards. Re-signed by hand over the rewritten TBS."""
    leaf = certs.ca.issue(directory, "ZZZZ", client=True)
    der = leaf.certificate.public_bytes(serialization.Encoding.DER)
    tbs = leaf.certificate.tbs_certificate_bytes
    assert tbs.count(b"\x0c\x04ZZZZ") == 1
    bad_tbs = tbs.replace(b"\x0c\x04ZZZZ", b"\x13\x04@@@@")
    after_tbs = der.index(tbs) + len(tbs)
    algorithm = der[after_tbs : after_tbs + 2 + der[after_tbs + 1]]  # a short SEQUENCE
    signature = certs.ca.key.sign(bad_tbs, ec.ECDSA(hashes.SHA256()))
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = bad_tbs + algorithm + bit_string
    loaded = crypto.load_certificate(crypto.FILETYPE_ASN1, b"\x30" + _der_length(len(body)) + body)
    with pytest.raises(ValueError):
        loaded.to_cryptography()
    cert_file = directory / "trusted-bad.crt"
    cert_file.write_bytes(crypto.dump_certificate(crypto.FILETYPE_PEM, loaded))
    return cert_file, leaf.key_file


async def test_a_verified_certificate_that_cannot_be_read_is_refused_as_such(
    certs, tmp_path, handshake_lines
):
    cert_file, key_file = _trusted_unreadable_certificate(certs, tmp_path)
    server = Server([ECHO], tls=server_config(certs))
    async with serve(server) as served:
        await _foreign_client(served.host, served.port, _stdlib_client(cert_file, key_file, ["h2"]))
        with trio.fail_after(5):
            await handshake_lines.arrived.wait()
        async with served.connect(client_config(certs)) as channel:
            reply = await channel.unary("/t.T/Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "hi"
    [record] = [r for r in handshake_lines.records if handshake_lines.text in r.getMessage()]
    assert record.levelno == logging.INFO, record.getMessage()  # a refusal, not a bug
    assert "cannot be parsed" in record.getMessage()
