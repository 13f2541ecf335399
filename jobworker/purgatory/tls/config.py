"""What a TLS connection is allowed to be: the configuration, the OpenSSL context, the checks
run during the handshake, and the typed errors a failure becomes. No I/O.

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
is off.

Callbacks: the verify and ALPN callbacks belong to the shared ``SSL.Context``; what they find about
one connection goes to that connection's app data (`Findings`). pyOpenSSL keeps an exception
raised in a callback on the Context until the next call returns, so a TLSConfig is meant for one
thread (one Trio run).

Errors: every failure is raised as a `TLSError` subclass naming its kind (`failure_of`), so
callers branch on the type, never on the message's words.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

__all__ = [
    "ALPN_PROTOCOL",
    "TLSCertificateRejected",
    "TLSConfig",
    "TLSConfigError",
    "TLSError",
    "TLSHandshakeTimeout",
    "TLSNegotiationFailed",
    "TLSPeerClosed",
]

ALPN_PROTOCOL = b"h2"

_TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


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
    if parse_ip(name) is not None:
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
        raise TLSConfigError(f"OpenSSL refused the configuration: {reasons_of(exc)}") from exc
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


class Findings:
    """What the callbacks learned about one connection, for a readable error."""

    __slots__ = ("alpn_offered", "presented", "verify_error")

    def __init__(self) -> None:
        self.verify_error: str | None = None
        self.alpn_offered: list[bytes] | None = None
        # The leaf certificate the peer presented, accepted or not: after a failed handshake
        # OpenSSL keeps no peer certificate, and the log should name it. Kept as it is (pyOpenSSL
        # holds a reference): its subject is formatted only if a failure is logged, not on every
        # handshake.
        self.presented: crypto.X509 | None = None


class NoH2Offered(Exception):
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
    expected_ip = parse_ip(server_name) if server_name is not None else None

    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        findings = conn.get_app_data()
        if depth == 0 and isinstance(findings, Findings) and findings.presented is None:
            findings.presented = cert
        if not ok:
            if isinstance(findings, Findings) and findings.verify_error is None:
                reason = _X509_ERRORS.get(errno, f"X.509 verify error {errno}")
                # Unverified, so a stranger's words: escaped and bounded (it reaches logs).
                subject = printable(subject_of(cert), SUBJECT_CHARS)
                findings.verify_error = (
                    f"{reason} (unverified certificate {subject or '<empty subject>'})"
                )
            return False
        if depth == 0 and server_name is not None:
            try:
                leaf = cert.to_cryptography()
            except ValueError:  # verified, yet unreadable to cryptography: never trusted
                if isinstance(findings, Findings) and findings.verify_error is None:
                    findings.verify_error = "the certificate cannot be parsed"
                return False
            problem = _name_problem(leaf, server_name, expected_ip)
            if problem is not None:
                if isinstance(findings, Findings) and findings.verify_error is None:
                    findings.verify_error = problem
                return False
        return True

    return verify


# What a log line shows for a certificate whose subject cryptography cannot read.
UNREADABLE_SUBJECT = "<unreadable subject>"
# How much of a peer's words an error message shows: a subject, each ALPN name, and how many.
SUBJECT_CHARS = 256
_ALPN_NAME_CHARS = 32
_ALPN_NAMES = 8


def printable(text: str, limit: int) -> str:
    """`text` safe to put in a log line or an error message: every character that is not
    printable (newlines, escape sequences, bidi controls) as a Python escape, so a peer's
    words can never start a forged line; cut to `limit` characters, marked with "..."."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def alpn_names(offered: Sequence[bytes]) -> str:
    """The ALPN names a peer offered, for an error message: escaped, each bounded, at most
    _ALPN_NAMES of them (the list itself is up to 64 KiB of the peer's choosing)."""
    names = [
        printable(name.decode("ascii", "backslashreplace"), _ALPN_NAME_CHARS)
        for name in offered[:_ALPN_NAMES]
    ]
    more = len(offered) - _ALPN_NAMES
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def subject_of(cert: crypto.X509) -> str:
    """The certificate's subject, RFC 4514 ("" when empty), or UNREADABLE_SUBJECT.

    OpenSSL accepts encodings that cryptography refuses with ValueError (a CN as a
    PrintableString holding "@"), and this runs on a stranger's certificate inside the verify
    callback: an exception there would come out of do_handshake as no SSL.Error, past every
    handler that expects one."""
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except ValueError:
        return UNREADABLE_SUBJECT


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if ALPN_PROTOCOL in offered:
        return ALPN_PROTOCOL
    findings = conn.get_app_data()
    if isinstance(findings, Findings):
        findings.alpn_offered = offered
    # Returning NO_OVERLAPPING_PROTOCOLS would let the handshake go on without ALPN (OpenSSL's
    # NOACK); raising makes pyOpenSSL return SSL_TLSEXT_ERR_ALERT_FATAL: the client is told.
    raise NoH2Offered


def parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
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
# Errors


def failure_of(
    exc: BaseException, findings: Findings, *, server_side: bool, handshake_done: bool
) -> TLSError:
    """The TLSError for an OpenSSL failure: its kind as the type, its story as the text."""
    if isinstance(exc, NoH2Offered):
        offered = alpn_names(findings.alpn_offered or [])
        return TLSNegotiationFailed(
            f"no ALPN protocol h2 negotiated: the client offered {offered or 'none'}"
        )
    if isinstance(exc, SSL.ZeroReturnError | SSL.SysCallError):
        during = "" if handshake_done else " during the TLS handshake"
        return TLSPeerClosed(f"the peer closed the connection{during}")
    reasons = reasons_of(exc)
    peer = "client" if server_side else "server"
    if "certificate verify failed" in reasons:
        detail = f": {findings.verify_error}" if findings.verify_error else ""
        message = f"{peer} certificate not accepted: certificate verify failed{detail}"
        return TLSCertificateRejected(message, by_peer=False)
    if "peer did not return a certificate" in reasons:
        return TLSCertificateRejected(
            "client certificate not accepted: the client sent none", by_peer=False
        )
    if "unsupported protocol" in reasons:
        return TLSNegotiationFailed(
            "no TLS version in common: jobworker speaks TLS 1.3 only (unsupported protocol)"
        )
    stage = "TLS error" if handshake_done else "TLS handshake failed"
    if "no suitable signature algorithm" in reasons:
        return TLSNegotiationFailed(
            f"{stage}: no suitable signature algorithm: the peer cannot use this key type "
            "(grpcio/BoringSSL cannot do Ed25519; ECDSA P-256 works everywhere)"
        )
    alert = next((r for r in reasons if " alert " in r), None)
    if alert is not None:
        alert = alert.split(" alert ", 1)[1]  # "tlsv1 alert unknown ca" -> "unknown ca"
        if alert in _CERTIFICATE_ALERTS:
            return TLSCertificateRejected(
                f"certificate not accepted by {peer}: {alert}", by_peer=True
            )
        if alert == "no application protocol":
            return TLSNegotiationFailed("no ALPN protocol h2 negotiated: the peer refused h2")
        if alert == "protocol version":
            return TLSNegotiationFailed(
                "no TLS version in common: jobworker speaks TLS 1.3 only (protocol version)"
            )
        return TLSError(f"{stage}: the peer sent the fatal alert {alert!r}")
    return TLSError(f"{stage}: {'; '.join(reasons) or type(exc).__name__}")


def check_negotiated(conn: SSL.Connection, *, server_side: bool) -> None:
    """After the handshake: ALPN settled on h2, or TLSNegotiationFailed."""
    alpn = conn.get_alpn_proto_negotiated()
    if alpn != ALPN_PROTOCOL:
        if server_side:
            raise TLSNegotiationFailed("no ALPN protocol h2 negotiated: the client offered no ALPN")
        got = f"the server chose {alpn.decode('ascii', 'replace')!r}" if alpn else "none"
        raise TLSNegotiationFailed(f"no ALPN protocol h2 negotiated ({got})")


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


def reasons_of(exc: BaseException) -> list[str]:
    """The reason strings of an OpenSSL error: its args are [(library, function, reason), ...]."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        return [str(entry[2]) for entry in args if isinstance(entry, tuple) and len(entry) == 3]
    return [str(arg) for arg in exc.args]
