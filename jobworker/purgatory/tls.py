"""Mutual TLS 1.3 as a `trio.abc.Stream`, over any trio stream or straight on a socket.

Two engines
-----------
Over a `trio.SocketStream` (production), OpenSSL reads and writes the socket's descriptor itself:
``SSL_write`` encrypts into its own buffer and writes the records out, with no ciphertext copied
through Python and no second send call. The socket is non-blocking, so an operation raises
``WantReadError``/``WantWriteError`` and we wait for the descriptor with trio (each direction under
its side's lock, since trio allows one waiter per direction), then retry. A send larger than one
record is corked (TCP_CORK) so that its records leave as full segments, not one packet per 16 KiB
record. On the streaming benchmark this engine cost less server CPU per byte than the memory BIO
one (0.85-0.92 vs 1.0-1.07 s/GB in alternating runs): no bio_read allocation and copy, no
transport send. Corking: median 0.84 against 0.93 s/GB over six alternating runs each.

The socket engine can also write without waiting (`send_nowait`): it encrypts and writes what
the socket takes at once, synchronously, so a task that must not be torn by a cancellation (a
call task writing its own answer, see driver.py) can write, and leave the rest to a task that
may wait. The rest must be the next thing written: OpenSSL may have started on it.

Over any other stream (memory streams in tests, or a proxy's stream) the memory BIO engine runs,
described next. Both share the handshake, the checks and the error reporting below.

Theory of operation (memory BIOs)
---------------------------------
An ``OpenSSL.SSL.Connection`` made without a socket reads ciphertext from one memory buffer (the
incoming BIO, which we fill with ``bio_write``) and writes ciphertext to another (the outgoing BIO,
which we empty with ``bio_read``). Its operations never block: when one needs bytes from the peer it
raises ``WantReadError``. Every public method reduces to ``_retry(operation)``, a loop of:

1. call the non-blocking OpenSSL operation (``do_handshake``, ``send``, ``recv``);
2. drain the outgoing BIO, with no ``await`` between 1 and 2, so no other task ever sees the
   Connection with ciphertext produced but not yet claimed;
3. await exactly one thing: if there are bytes to send, send them; otherwise, if OpenSSL wants
   input, receive once from the transport into the incoming BIO;
4. retry until the operation succeeds (sending is never retried: a write completes at step 1).

The transport has two sides and each has its lock. HTTP/2 runs a reader task and a writer task, and
in TLS 1.3 reading can produce output (a KeyUpdate answer), so a reader may need to send. The send
lock is strictly FIFO: drained bytes go out in the order OpenSSL produced them. A task that wants to
receive while another one already is just waits for it and retries the operation: the bytes it
needed may have arrived. Any failure while sending leaves an unknown amount of ciphertext on the
wire, so the stream is marked broken and later calls raise `trio.BrokenResourceError`. Cancelling a
receive is harmless; cancelling a send breaks the stream.

The handshake runs in whichever task first calls `do_handshake` (or sends, or receives): the
connection's own task, never ``accept()``. It runs under ``trio.fail_after(handshake_timeout_s)``,
so a peer that says nothing, or stalls halfway, costs bounded time. In TLS 1.3 the client's
handshake ends when it sends its Finished; the server checks the client certificate after that, so a
rejected certificate reaches the client as an alert on its first *read*. We name it there
("certificate not accepted by server: unknown ca"). When a handshake fails we flush OpenSSL's alert
(best effort, bounded) before raising, so the peer learns why.

Policy: TLS 1.3 only; AES-128-GCM preferred (the cheapest AEAD with AES-NI and what gRPC clients
pick). The server requires a client certificate chaining to its CAs, with the clientAuth purpose;
the client requires a server certificate chaining to its CAs, with serverAuth and naming the
server. ALPN must settle on "h2": the server answers an offer without it with the fatal alert
no_application_protocol, and both sides check the result after the handshake (a client that
offered no ALPN at all gets no callback, so the server's check catches it).

Name checks: pyOpenSSL 26 has no public API for OpenSSL's own host and IP checks
(``X509_VERIFY_PARAM_set1_host``/``_ip``; see pyca/pyopenssl#1020), so the client checks the name
itself in its verify callback, on the leaf, during the handshake: a subjectAltName DNS name (case
folded; a wildcard only as the whole leftmost label, never matching an IP or a bare suffix such as
``*.com``) or a subjectAltName IP address, compared exactly. The subject CN is never used. Failing
in the callback fails the handshake like any verification error, so the server hears of it at once
(as an "internal error" alert: pyOpenSSL's callback cannot set the verify error code). SNI is sent
for DNS names only.

Session tickets: we never resume sessions, so tickets are small stateful ones and the session cache
is off. OpenSSL's server still writes them the moment its handshake completes; we hold them back
and send them with the server's next write (trio's fix for python-trio/trio#819), otherwise a
server's handshake over an unbuffered transport would wait for the client to read.

End of stream: `receive_some` returns b"" on the peer's close_notify and also on a transport EOF
without one (trio's ``https_compatible=True``): HTTP/2 and gRPC mark their own ends (END_STREAM,
trailers, GOAWAY), so a truncation is caught a layer up. `aclose` sends close_notify without waiting
for the peer's, bounded by CLOSE_NOTIFY_TIMEOUT_S and skipped if another task is mid-send, then
closes the transport.

Callbacks: the verify and ALPN callbacks belong to the shared ``SSL.Context``; what they find about
one connection goes to that connection's app data. pyOpenSSL keeps an exception raised in a callback
on the Context until the next call returns, so a TLSConfig is meant for one thread (one Trio run).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import operator
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NoReturn, TypeVar

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

__all__ = [
    "ALPN_PROTOCOL",
    "CLOSE_NOTIFY_TIMEOUT_S",
    "RECEIVE_BYTES",
    "TLSConfig",
    "TLSCertificateRejected",
    "TLSConfigError",
    "TLSError",
    "TLSHandshakeTimeout",
    "TLSNegotiationFailed",
    "TLSPeerClosed",
    "TLSStream",
]

ALPN_PROTOCOL = b"h2"
# receive_some() without max_bytes returns up to this much plaintext, and each transport read asks
# for this much ciphertext: a 64 KiB gRPC message is one read, not four or more.
RECEIVE_BYTES = 128 * 1024
# send_all() encrypts and sends at most this much at a time, bounding the ciphertext held in memory.
SEND_CHUNK_BYTES = 96 * 1024
# Why not larger: measured over loopback, 256 KiB reads or send chunks make every buffer cross
# glibc's mmap/trim thresholds: up to 200k page faults per GB, up to 2.5x the CPU per byte.
CLOSE_NOTIFY_TIMEOUT_S = 1.0

_TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_TCP_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
_MAX_RECORD_PLAINTEXT = 16384  # one SSL_read returns at most one record's plaintext
# A full send chunk's ciphertext (records add 22 bytes per 16 KiB) fits in one bio_read, and the
# buffer bio_read allocates stays under 128 KiB, glibc's initial mmap threshold.
_DRAIN_BYTES = SEND_CHUNK_BYTES + 16 * 1024
_PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_T = TypeVar("_T")


class TLSError(trio.BrokenResourceError):
    """The TLS layer failed: handshake refused, peer certificate rejected, a fatal alert.

    A `trio.BrokenResourceError`: the stream is unusable afterwards, and code that already treats a
    broken stream as "connection lost" needs no extra clause. The subclass says what kind of
    failure it was, so callers branch on the type, not on the message's words.
    """


class TLSHandshakeTimeout(TLSError):
    """The handshake did not complete within the configured ``handshake_timeout_s``."""


class TLSCertificateRejected(TLSError):
    """A certificate was not accepted: the peer's by us (`by_peer` False), or ours by the peer
    (`by_peer` True, learned from its alert)."""

    def __init__(self, message: str, *, by_peer: bool) -> None:
        super().__init__(message)
        self.by_peer = by_peer


class TLSNegotiationFailed(TLSError):
    """Nothing in common with the peer: no TLS 1.3, no ALPN "h2", no usable signature
    algorithm."""


class TLSPeerClosed(TLSError):
    """The peer closed the connection (during the handshake, or without close_notify)."""


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TLSConfig:
    """One side's TLS settings. Build it with `TLSConfig.server` or `TLSConfig.client`."""

    context: SSL.Context = field(repr=False)
    server_side: bool
    server_name: str | None  # what the client expects the server's certificate to name
    handshake_timeout_s: float
    certificate: x509.Certificate = field(repr=False)  # our own leaf

    @classmethod
    def server(
        cls,
        *,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        ca_files: Sequence[str | os.PathLike[str]],
        handshake_timeout_s: float = 10.0,
    ) -> TLSConfig:
        """Serve with ``cert_file``/``key_file``; accept clients whose certificates chain to
        ``ca_files``."""
        _check_timeout(handshake_timeout_s)
        context, leaf = _make_context(
            server_side=True,
            cert_file=cert_file,
            key_file=key_file,
            ca_files=ca_files,
            server_name=None,
        )
        return cls(context, True, None, handshake_timeout_s, leaf)

    @classmethod
    def client(
        cls,
        *,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        ca_files: Sequence[str | os.PathLike[str]],
        server_name: str,
        handshake_timeout_s: float = 10.0,
    ) -> TLSConfig:
        """Present ``cert_file``/``key_file``; accept a server whose certificate chains to
        ``ca_files`` and names ``server_name`` (a DNS name or an IP address)."""
        _check_timeout(handshake_timeout_s)
        name = _normalize_server_name(server_name)
        context, leaf = _make_context(
            server_side=False,
            cert_file=cert_file,
            key_file=key_file,
            ca_files=ca_files,
            server_name=name,
        )
        return cls(context, False, name, handshake_timeout_s, leaf)


def _check_timeout(handshake_timeout_s: float) -> None:
    if not handshake_timeout_s > 0 or math.isnan(handshake_timeout_s):
        raise TLSConfigError(f"handshake_timeout_s must be positive, not {handshake_timeout_s!r}")


def _normalize_server_name(server_name: str) -> str:
    name = server_name.strip().removeprefix("[").removesuffix("]").rstrip(".")
    if not name:
        raise TLSConfigError("server_name must not be empty")
    if _parse_ip(name) is not None:
        return name
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise TLSConfigError(f"server_name {server_name!r} is not a valid host name") from exc


_SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1  # OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (not exported)


def _make_context(
    *,
    server_side: bool,
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    ca_files: Sequence[str | os.PathLike[str]],
    server_name: str | None,
) -> tuple[SSL.Context, x509.Certificate]:
    if isinstance(ca_files, str | bytes | os.PathLike):
        ca_files = [ca_files]  # one path given where a list was meant: fine, it's unambiguous
    chain = _load_certificates(cert_file, "certificate file")
    key = _load_private_key(key_file)
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise TLSConfigError(
            f"private key does not match the certificate: {os.fspath(key_file)} is not the key "
            f"of {os.fspath(cert_file)}"
        )
    if not ca_files:
        raise TLSConfigError("at least one CA file is needed to verify peers")
    authorities = [cert for path in ca_files for cert in _load_certificates(path, "CA file")]

    context = SSL.Context(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
    try:
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_tls13_ciphersuites(_TLS13_CIPHERSUITES)
        context.set_options(SSL.OP_NO_TICKET)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        # Free OpenSSL's 16 KiB+ record buffers whenever they are empty: an idle connection
        # shrinks by about a third (measured: 72 -> 49 KiB per stream); bulk speed is unchanged.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # One SSL_write per send, however many records it takes: pyOpenSSL turns on partial
        # writes, which costs a trip through the wrapper per 16 KiB record (measured 27 -> 7
        # calls per 64 KiB). A memory BIO never blocks, so whole writes are always possible.
        context.clear_mode(_SSL_MODE_ENABLE_PARTIAL_WRITE)
        context.use_certificate(chain[0])
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(key)
        context.check_privatekey()
        store = context.get_cert_store()
        assert store is not None
        for authority in authorities:
            store.add_cert(crypto.X509.from_cryptography(authority))
    except SSL.Error as exc:  # pragma: no cover - what cryptography accepts, OpenSSL does too
        raise TLSConfigError(f"OpenSSL refused the configuration: {_reasons(exc)}") from exc
    if server_side:
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _make_verify_callback(None)
        )
        context.set_alpn_select_callback(_select_alpn)
    else:
        context.set_verify(SSL.VERIFY_PEER, _make_verify_callback(server_name))
        context.set_alpn_protos([ALPN_PROTOCOL])
    return context, chain[0]


def _read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read {what} {os.fspath(path)}: {exc.strerror or exc}"
        ) from exc


def _load_certificates(path: str | os.PathLike[str], what: str) -> list[x509.Certificate]:
    data = _read_file(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSConfigError(f"{what} {os.fspath(path)} holds no PEM certificate")
    return certificates


def _load_private_key(path: str | os.PathLike[str]) -> _PrivateKey:
    data = _read_file(path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "encrypted, and no password given"
        raise TLSConfigError(
            f"private key {os.fspath(path)} is encrypted; give an unencrypted key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"{os.fspath(path)} holds no usable PEM private key") from exc
    if not isinstance(key, _PrivateKey):
        raise TLSConfigError(
            f"private key {os.fspath(path)} is a {type(key).__name__}; "
            "use ECDSA, RSA or Ed25519/Ed448"
        )
    return key


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------------------------------
# Callbacks (run inside OpenSSL calls; per-connection findings go to the connection's app data)


class _Findings:
    """What the callbacks learned about one connection, for a readable error."""

    __slots__ = ("alpn_offered", "verify_error")

    def __init__(self) -> None:
        self.verify_error: str | None = None
        self.alpn_offered: list[bytes] | None = None


class _NoH2Offered(Exception):
    """Raised by the ALPN callback: pyOpenSSL then answers with no_application_protocol."""


# The common X509_V_ERR_* codes (openssl/x509_vfy.h). pyOpenSSL exposes no error-string lookup.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}

_VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


def _make_verify_callback(server_name: str | None) -> _VerifyCallback:
    expected_ip = _parse_ip(server_name) if server_name is not None else None

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        findings = conn.get_app_data()
        if not ok:
            if isinstance(findings, _Findings) and findings.verify_error is None:
                reason = _X509_ERRORS.get(errno, f"X.509 verify error {errno}")
                subject = cert.to_cryptography().subject.rfc4514_string()
                findings.verify_error = f"{reason} (certificate {subject or '<empty subject>'})"
            return False
        if depth == 0 and server_name is not None:
            problem = _name_problem(cert.to_cryptography(), server_name, expected_ip)
            if problem is not None:
                if isinstance(findings, _Findings) and findings.verify_error is None:
                    findings.verify_error = problem
                return False
        return True

    return verify


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if ALPN_PROTOCOL in offered:
        return ALPN_PROTOCOL
    findings = conn.get_app_data()
    if isinstance(findings, _Findings):
        findings.alpn_offered = offered
    # Returning NO_OVERLAPPING_PROTOCOLS would let the handshake go on without ALPN (OpenSSL's
    # NOACK); raising makes pyOpenSSL return SSL_TLSEXT_ERR_ALERT_FATAL: the client is told.
    raise _NoH2Offered


def _parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.partition("%")[0])  # drop an IPv6 zone: SANs have none
    except ValueError:
        return None


def _name_problem(
    cert: x509.Certificate,
    server_name: str,
    expected_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
) -> str | None:
    """Why ``cert`` does not name ``server_name``, or None if it does."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"it has no subjectAltName, so it cannot be valid for {server_name!r}"
    except ValueError as exc:  # a malformed extension
        return f"its subjectAltName is unreadable: {exc}"
    dns_names = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    if expected_ip is not None:
        if expected_ip in ips:
            return None
    elif any(_dns_name_matches(pattern, server_name) for pattern in dns_names):
        return None
    named = [f"DNS:{name}" for name in dns_names] + [f"IP:{ip}" for ip in ips]
    listed = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
    return f"it is not valid for {server_name!r} (it names {listed or 'nothing'})"


def _dns_name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 section 6.4 basics: exact match, or ``*`` as the whole leftmost label."""
    pattern = pattern.rstrip(".").lower()
    if not pattern or not pattern.isascii():
        return False
    if "*" not in pattern:
        return pattern == host
    wildcard, _, rest = pattern.partition(".")
    head, _, host_rest = host.partition(".")
    # "*" alone, at least two labels after it (no "*.com"), no other "*" anywhere.
    return (
        wildcard == "*"
        and rest.count(".") >= 1
        and "*" not in rest
        and bool(head)
        and (host_rest == rest)
    )


# ---------------------------------------------------------------------------------------------
# The stream


class _State(Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use one side of the stream at once (the check
    trio does with its private ``trio._util.ConflictDetector``)."""

    __slots__ = ("held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise trio.BusyResourceError(self._message)
        self.held = True

    def __exit__(self, *exc_info: object) -> None:
        self.held = False


async def _acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take `lock`; uncontended (the common case), without the scheduling point that
    `async with` costs: the I/O that follows is the caller's checkpoint."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class TLSStream(trio.abc.Stream):
    """TLS over ``transport``, as the server or the client according to ``config``.

    Call `do_handshake` first, in the connection's own task; sending or receiving before that
    runs the handshake implicitly. One task may send while another receives.
    """

    def __init__(self, transport: trio.abc.Stream, config: TLSConfig) -> None:
        self._transport = transport
        self._config = config
        self._findings = _Findings()
        # On a real socket, OpenSSL reads and writes the descriptor itself (see "Two engines").
        self._socket = transport.socket if isinstance(transport, trio.SocketStream) else None
        # TCP_CORK exists for TCP only (a Unix socket has no segments to coalesce).
        self._corks = self._socket is not None and self._socket.family in _TCP_FAMILIES
        conn = SSL.Connection(config.context, self._socket)
        conn.set_app_data(self._findings)
        if config.server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            assert config.server_name is not None
            if _parse_ip(config.server_name) is None:
                conn.set_tlsext_host_name(config.server_name.encode("ascii"))
        self._conn = conn
        self._state = _State.OK
        self._handshake_started = False
        self._handshake_done = False
        self._handshake_finished = trio.Event()
        self._delayed_outgoing = b""  # the server's session tickets, until its first write
        self._send_lock = trio.StrictFIFOLock()  # the transport's send side
        self._receive_lock = trio.Lock()  # the transport's receive side
        self._receive_count = 0
        self._read_eof = False
        # Socket engine: the last read stopped because the socket had nothing more (EAGAIN).
        # The next one then waits for the descriptor first instead of asking the socket again:
        # one read syscall and one WantReadError fewer per wakeup of a reader.
        self._socket_drained = False
        self._read_error: SSL.Error | None = None  # met after returning data; raised next time
        self._peer_certificate: x509.Certificate | None = None
        self._sending = _ConflictDetector("another task is sending on this TLSStream")
        self._receiving = _ConflictDetector("another task is receiving on this TLSStream")

    # -- what the handshake settled

    @property
    def transport(self) -> trio.abc.Stream:
        return self._transport

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's verified leaf certificate; None before the handshake completes."""
        return self._peer_certificate

    @property
    def alpn_protocol(self) -> str | None:
        if not self._handshake_done:
            return None
        return self._conn.get_alpn_proto_negotiated().decode("ascii") or None

    @property
    def tls_version(self) -> str:
        """E.g. "TLSv1.3". Raises RuntimeError before the handshake completes."""
        self._require_handshake("tls_version")
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        """E.g. "TLS_AES_128_GCM_SHA256". Raises RuntimeError before the handshake completes."""
        self._require_handshake("cipher")
        return self._conn.get_cipher_name() or ""

    def _require_handshake(self, what: str) -> None:
        if not self._handshake_done:
            raise RuntimeError(f"{what} is known only after the TLS handshake")

    # -- the handshake

    async def do_handshake(self) -> None:
        """Run the handshake (once; later calls return at once, concurrent ones wait for it).

        Raises TLSHandshakeTimeout after ``handshake_timeout_s``, TLSError if it fails. Either
        way the stream is broken afterwards: close it.
        """
        self._check_status()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        if self._handshake_started:
            await self._handshake_finished.wait()
            if not self._handshake_done:
                self._check_status()
                raise trio.BrokenResourceError("the TLS handshake failed")
            return
        self._handshake_started = True
        timeout_s = self._config.handshake_timeout_s
        try:
            with trio.fail_after(timeout_s):
                # The server's last handshake step writes only session tickets: hold them back.
                await self._retry(self._conn.do_handshake, hold_back=self._config.server_side)
            self._check_negotiated()
        except trio.TooSlowError:
            self._mark_broken()
            raise TLSHandshakeTimeout(
                f"TLS handshake did not complete within {timeout_s:g} s"
            ) from None
        except BaseException:
            self._mark_broken()
            raise
        else:
            self._handshake_done = True
            self._peer_certificate = self._conn.get_peer_certificate(as_cryptography=True)
        finally:
            self._handshake_finished.set()

    def _check_negotiated(self) -> None:
        alpn = self._conn.get_alpn_proto_negotiated()
        if alpn != ALPN_PROTOCOL:
            if self._config.server_side:
                raise TLSNegotiationFailed(
                    "no ALPN protocol h2 negotiated: the client offered no ALPN"
                )
            got = f"the server chose {alpn.decode('ascii', 'replace')!r}" if alpn else "none"
            raise TLSNegotiationFailed(f"no ALPN protocol h2 negotiated ({got})")

    # -- Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            self._check_status()
            if not self._handshake_done:
                await self._ensure_handshake()
            view = memoryview(data)
            if view.ndim != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
            if not view.nbytes:
                await trio.lowlevel.checkpoint()
                return
            if self._socket is not None:
                cork = self._corks and view.nbytes > _MAX_RECORD_PLAINTEXT
                if cork:
                    self._cork(True)
                try:
                    await self._retry(self._encrypter(view))
                except BaseException:
                    # Some unknown part of `data` may be on the wire: nothing can follow it.
                    self._mark_broken()
                    raise
                finally:
                    if cork:
                        self._cork(False)
                return
            for start in range(0, view.nbytes, SEND_CHUNK_BYTES):
                await self._retry(self._encrypter(view[start : start + SEND_CHUNK_BYTES]))

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Encrypt and write as much of `data` as the socket takes right now, never waiting;
        return how many bytes were taken. Returns 0 whenever this stream cannot write without
        waiting: on the memory BIO engine, before the handshake, and while another task is in
        `send_all` or waiting to write.

        Whatever was not taken must be the next thing sent, as ``send_all(data[taken:])``, even
        when nothing was taken: OpenSSL may have written part of it already (OpenSSL 4 reports
        a large write as taken only once all of it is out), and only a write of the same bytes
        completes that. Being synchronous, this cannot be cancelled halfway, which is its point: a
        task that must not break the stream by being cancelled can write with it and leave the
        rest to a task that can wait. Raises like `send_all` when the stream is broken.
        """
        self._check_status()
        if (
            self._socket is None
            or not self._handshake_done
            or self._sending.held
            or self._send_lock.locked()
        ):
            return 0
        view = memoryview(data)
        written = 0
        cork = self._corks and view.nbytes > _MAX_RECORD_PLAINTEXT
        if cork:
            self._cork(True)
        try:
            while written < view.nbytes:
                written += self._conn.send(view[written:])
        except (SSL.WantWriteError, SSL.WantReadError):
            pass  # the socket is full (or OpenSSL must read first): the rest waits
        except SSL.Error as exc:
            self._mark_broken()
            raise self._error(exc) from exc
        finally:
            if cork:
                self._cork(False)
        return written

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_status()
            # Waiting on the transport is a send-side operation: a receive_some that must send
            # (a KeyUpdate answer) cannot overlap it.
            async with self._send_lock:
                await self._transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receiving:
            if max_bytes is None:
                max_bytes = RECEIVE_BYTES
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            if not self._handshake_done:
                await self._ensure_handshake()
            waited = self._socket_drained
            if waited:
                self._socket_drained = False
                await self._wait_socket(self._receive_lock, trio.lowlevel.wait_readable)
            return await self._retry(lambda: self._decrypt(max_bytes), yielded=waited)

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        say_goodbye = self._state is _State.OK and self._handshake_done
        self._state = _State.CLOSED
        try:
            if say_goodbye:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT_S):
                    await self._send_close_notify()
        finally:
            await self._transport.aclose()

    async def _send_close_notify(self) -> None:
        # Another task mid-send would interleave its ciphertext with ours: skip, close uncleanly.
        if self._send_lock.locked():
            return
        try:
            self._conn.shutdown()  # queue close_notify; we don't wait for the peer's
        except SSL.Error:
            return
        data = self._drain()
        if self._delayed_outgoing:
            data, self._delayed_outgoing = self._delayed_outgoing + data, b""
        if data:
            try:
                async with self._send_lock:
                    await self._transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went first; that's allowed

    # -- the engine

    def _check_status(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLSStream is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream is closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    def _cork(self, on: bool) -> None:
        with contextlib.suppress(OSError):  # the socket is closing: nothing left to coalesce
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)

    def _encrypter(self, view: memoryview) -> Callable[[], None]:
        written = 0

        def encrypt() -> None:
            # A memory BIO takes everything, so SSL_write normally consumes all of `view` in one
            # call. Keep count anyway: a retry after WantReadError must resume, not repeat.
            nonlocal written
            while written < len(view):
                written += self._conn.send(view[written:])

        return encrypt

    def _decrypt(self, max_bytes: int) -> bytes:
        if self._read_eof:
            return b""
        if self._read_error is not None:
            error, self._read_error = self._read_error, None
            raise error
        recv = self._conn.recv
        chunks: list[bytes] = []
        total = 0
        while total < max_bytes:
            try:
                chunk = recv(min(max_bytes - total, _MAX_RECORD_PLAINTEXT))
            except SSL.WantReadError:
                if chunks:
                    self._socket_drained = self._socket is not None
                    break
                raise
            except SSL.ZeroReturnError:  # close_notify
                self._read_eof = True
                break
            except SSL.SysCallError as exc:
                if exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0:
                    # The socket engine met a socket error (ECONNRESET...): not an EOF.
                    self._mark_broken()
                    raise TLSError(f"connection lost: {os.strerror(exc.args[0])}") from None
                # The transport ended without close_notify: EOF too (see "End of stream").
                # OpenSSL queues an alert about it; the peer is gone, so drop it.
                self._read_eof = True
                self._drain()
                break
            except SSL.Error as exc:
                if not chunks:
                    raise
                self._read_error = exc  # hand over what we have; fail on the next call
                break
            chunks.append(chunk)
            total += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _drain(self) -> bytes:
        if self._socket is not None:
            return b""  # OpenSSL has written it to the socket already
        try:
            data = self._conn.bio_read(_DRAIN_BYTES)
        except SSL.WantReadError:
            return b""
        if len(data) < _DRAIN_BYTES:
            return data
        parts = [data]
        while True:
            try:
                parts.append(self._conn.bio_read(_DRAIN_BYTES))
            except SSL.WantReadError:
                return b"".join(parts)

    async def _retry(
        self, operation: Callable[[], _T], *, hold_back: bool = False, yielded: bool = False
    ) -> _T:
        """Run ``operation`` until it stops asking for I/O; see the module docstring. Pass
        ``yielded`` when the caller has already been through a checkpoint for this operation."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            want_read = want_write = False
            failure: BaseException | None = None
            try:
                result = operation()
            except SSL.WantReadError:
                want_read = True
            except SSL.WantWriteError:  # the socket engine only: the send buffer is full
                want_write = True
            except (SSL.Error, _NoH2Offered) as exc:
                failure = exc
            if failure is not None:
                await self._fail(failure)
            if self._socket is not None:
                if want_read:
                    await self._wait_socket(self._receive_lock, trio.lowlevel.wait_readable)
                elif want_write:
                    await self._wait_socket(self._send_lock, trio.lowlevel.wait_writable)
                else:
                    break
                yielded = True
                continue
            to_send = self._drain()
            if hold_back and not want_read:
                self._delayed_outgoing += to_send
                to_send = b""
            if to_send:
                yielded = True
                await self._send_raw(to_send)
            elif want_read:
                yielded = True
                await self._receive_raw()
            if not want_read:
                break
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def _wait_socket(
        self, lock: trio.Lock | trio.StrictFIFOLock, wait: Callable[[object], Awaitable[None]]
    ) -> None:
        """Socket engine: wait until the socket can take or give bytes. The side's lock keeps
        two tasks from waiting on one direction at once (trio allows one waiter), e.g. a
        receiver whose read must write a KeyUpdate answer while the sender waits to write."""
        await _acquire(lock)
        try:
            await wait(self._socket)
        finally:
            lock.release()

    async def _send_raw(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            await _acquire(lock)  # the transport's send is our checkpoint
            try:
                if self._delayed_outgoing:
                    data, self._delayed_outgoing = self._delayed_outgoing + data, b""
                await self._transport.send_all(data)
            finally:
                lock.release()
        except BaseException:
            # Some unknown part of `data` may be on the wire: nothing can follow it safely.
            self._mark_broken()
            raise

    async def _receive_raw(self) -> None:
        seen = self._receive_count
        lock = self._receive_lock
        await _acquire(lock)
        try:
            if seen != self._receive_count:
                return  # another task received meanwhile: retry the operation first
            try:
                data = await self._transport.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, OSError):
                self._mark_broken()
                raise
            if data:
                self._conn.bio_write(data)
            else:
                self._conn.bio_shutdown()  # transport EOF: OpenSSL reads EOF from now on
            self._receive_count += 1
        finally:
            lock.release()

    async def _fail(self, exc: BaseException) -> NoReturn:
        """Mark broken, flush any alert OpenSSL queued (bounded, best effort), raise TLSError."""
        self._mark_broken()
        error = self._error(exc)
        alert = self._drain()
        if alert and not self._send_lock.locked():
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT_S):
                try:
                    async with self._send_lock:
                        await self._transport.send_all(self._delayed_outgoing + alert)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        raise error from exc

    def _error(self, exc: BaseException) -> TLSError:
        """The TLSError for an OpenSSL failure: its kind as the type, its story as the text."""
        kind, message = self._describe(exc)
        if kind is TLSCertificateRejected:
            return TLSCertificateRejected(message, by_peer=" by " in message.split(":", 1)[0])
        return kind(message)

    def _describe(self, exc: BaseException) -> tuple[type[TLSError], str]:
        findings = self._findings
        if isinstance(exc, _NoH2Offered):
            offered = ", ".join(p.decode("ascii", "replace") for p in findings.alpn_offered or [])
            return TLSNegotiationFailed, (
                f"no ALPN protocol h2 negotiated: the client offered {offered or 'none'}"
            )
        if isinstance(exc, SSL.ZeroReturnError | SSL.SysCallError):
            during = "" if self._handshake_done else " during the TLS handshake"
            return TLSPeerClosed, f"the peer closed the connection{during}"
        reasons = _reasons(exc)
        peer = "client" if self._config.server_side else "server"
        if "certificate verify failed" in reasons:
            detail = f": {findings.verify_error}" if findings.verify_error else ""
            message = f"{peer} certificate not accepted: certificate verify failed{detail}"
            return TLSCertificateRejected, message
        if "peer did not return a certificate" in reasons:
            return TLSCertificateRejected, "client certificate not accepted: the client sent none"
        if "unsupported protocol" in reasons:
            return TLSNegotiationFailed, (
                "no TLS version in common: jobworker speaks TLS 1.3 only (unsupported protocol)"
            )
        stage = "TLS error" if self._handshake_done else "TLS handshake failed"
        if "no suitable signature algorithm" in reasons:
            return TLSNegotiationFailed, (
                f"{stage}: no suitable signature algorithm: the peer cannot use this key type "
                "(grpcio/BoringSSL cannot do Ed25519; ECDSA P-256 works everywhere)"
            )
        alert = next((r for r in reasons if " alert " in r), None)
        if alert is not None:
            alert = alert.split(" alert ", 1)[1]  # "tlsv1 alert unknown ca" -> "unknown ca"
            if alert in _CERTIFICATE_ALERTS:
                return TLSCertificateRejected, f"certificate not accepted by {peer}: {alert}"
            if alert == "no application protocol":
                return TLSNegotiationFailed, "no ALPN protocol h2 negotiated: the peer refused h2"
            if alert == "protocol version":
                return TLSNegotiationFailed, (
                    "no TLS version in common: jobworker speaks TLS 1.3 only (protocol version)"
                )
            return TLSError, f"{stage}: the peer sent the fatal alert {alert!r}"
        return TLSError, f"{stage}: {'; '.join(reasons) or type(exc).__name__}"


_CERTIFICATE_ALERTS = frozenset(
    {
        "bad certificate",
        "unsupported certificate",
        "certificate revoked",
        "certificate expired",
        "certificate unknown",
        "unknown ca",
        "certificate required",
        "access denied",
    }
)


def _reasons(exc: BaseException) -> list[str]:
    """The reason strings of an OpenSSL error: its args are [(library, function, reason), ...]."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        return [str(entry[2]) for entry in args if isinstance(entry, tuple) and len(entry) == 3]
    return [str(arg) for arg in exc.args]
