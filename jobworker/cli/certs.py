"""`jobworker certs`: a development CA, the server's certificate and the users' certificates.

The layout of DIR, chosen so that each side's defaults find its files:

    DIR/ca.crt, DIR/ca.key            the CA (ca.key signs new users: keep it away from servers)
    DIR/server.crt, DIR/server.key    the server's (SANs localhost, 127.0.0.1, ::1 and --host)
    DIR/<user>/client.crt, client.key, ca.crt
                                      one user's: exactly what jobctl looks for in
                                      ~/.config/jobctl/, so `cp -r DIR/alice ~/.config/jobctl`

`jobworker serve` looks in /etc/jobworker/ by default, so ``certs init /etc/jobworker`` sets a
server up with no flags. Identity is the subject CN; each role is one OU value.

Private keys are PKCS#8 PEM, created with mode 0600 by the open() that makes them (never
chmod-ed after the fact: there is no moment when another user could open them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ecdsa", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

ROLES = ("admin", "viewer")
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825  # the longest leaf lifetime browsers ever accepted; plenty for development

_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")


class CertsError(Exception):
    """Something in the request or on disk that stops us; the message is one line."""


@dataclass(frozen=True, slots=True)
class UserSpec:
    name: str
    roles: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(self.roles) if self.roles else 'user'})"


def parse_user(text: str) -> UserSpec:
    """``NAME`` or ``NAME:ROLE[,ROLE]`` with roles among admin and viewer."""
    name, _, roles_text = text.partition(":")
    if not _USER_NAME.match(name):
        raise CertsError(
            f"bad user name {name!r}: use letters, digits and . _ @ - (it names a directory too)"
        )
    roles = tuple(r.strip() for r in roles_text.split(",") if r.strip()) if roles_text else ()
    for role in roles:
        if role not in ROLES:
            raise CertsError(
                f"unknown role {role!r} for {name}: roles are {', '.join(ROLES)} "
                "(none at all makes an ordinary user)"
            )
    return UserSpec(name, tuple(dict.fromkeys(roles)))


@dataclass(frozen=True, slots=True)
class Written:
    path: Path
    what: str


@dataclass(frozen=True, slots=True)
class _Authority:
    certificate: x509.Certificate
    key: PrivateKey


def init(
    directory: Path,
    users: Sequence[UserSpec],
    *,
    key_type: KeyType = "ecdsa",
    hosts: Sequence[str] = (),
    force: bool = False,
) -> list[Written]:
    """Create a CA, a server certificate and one client certificate per user in `directory`.

    Refuses (CertsError) if any of the files exists, unless `force`; checks everything before
    writing anything.
    """
    _check_unique(users)
    server_names = _server_names(hosts)
    files = [directory / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    files += [f for user in users for f in _user_files(directory, user.name)]
    _refuse_existing(files, force)
    ca = _new_authority(key_type)
    written = [
        *_write_pair(directory, "ca", ca.certificate, ca.key, "the CA"),
        *_write_pair(
            directory,
            "server",
            *_issue(ca, "jobworker server", (), key_type, server_names=server_names),
            "the server's (" + ", ".join(server_names) + ")",
        ),
    ]
    for user in users:
        written += _write_user(directory, ca, user, key_type)
    return written


def add_users(
    directory: Path,
    users: Sequence[UserSpec],
    *,
    key_type: KeyType = "ecdsa",
    force: bool = False,
    sans: Sequence[str] = (),
) -> list[Written]:
    """Issue more client certificates with the CA already in `directory`. `sans`: subject
    alternative names (``dns:NAME``, ``email:ADDRESS``, ``uri:URI``, ``ip:ADDRESS``) for the
    one user named, what a server's allow-list may name it by besides its CN."""
    _check_unique(users)
    if not users:
        raise CertsError("name at least one --user")
    if sans and len(users) > 1:
        raise CertsError("--san names one user's certificate: give exactly one --user with it")
    names = [parse_san(san) for san in sans]
    ca = _load_authority(directory)
    _refuse_existing([f for user in users for f in _user_files(directory, user.name)], force)
    written: list[Written] = []
    for user in users:
        written += _write_user(directory, ca, user, key_type, names)
    return written


_SAN_KINDS = ("dns", "email", "uri", "ip")


def parse_san(text: str) -> x509.GeneralName:
    """``dns:ci.example.com``, ``email:bob@example.com``, ``uri:spiffe://example.org/ci``,
    ``ip:10.0.0.7``: the spelling of a server's allow-list entries."""
    kind, sep, value = text.partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in _SAN_KINDS or not value:
        raise CertsError(
            f"bad --san {text!r}: expected KIND:VALUE with KIND one of {', '.join(_SAN_KINDS)}"
            " (dns:ci.example.com, email:bob@example.com, uri:spiffe://example.org/ci)"
        )
    try:
        if kind == "ip":
            return x509.IPAddress(ipaddress.ip_address(value))
        if kind == "dns":
            return x509.DNSName(value)
        if kind == "email":
            return x509.RFC822Name(value)
        return x509.UniformResourceIdentifier(value)
    except ValueError as exc:  # an address that is no address; a non-ASCII name
        raise CertsError(f"bad --san {text!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------


def _check_unique(users: Sequence[UserSpec]) -> None:
    seen: set[str] = set()
    for user in users:
        if user.name in seen:
            raise CertsError(f"user {user.name!r} is named twice")
        seen.add(user.name)


def _server_names(hosts: Iterable[str]) -> tuple[str, ...]:
    names = list(SERVER_NAMES)
    for host in hosts:
        host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
        if not host or (any(c.isspace() or c in "/:@" for c in host) and not _is_ip(host)):
            raise CertsError(f"bad --host {host!r}: give a DNS name or an IP address")
        if host not in names:
            names.append(host)
    return tuple(names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _user_files(directory: Path, name: str) -> list[Path]:
    return [directory / name / n for n in ("client.crt", "client.key", "ca.crt")]


def _refuse_existing(files: Iterable[Path], force: bool) -> None:
    if force:
        return
    existing = [str(f) for f in files if os.path.lexists(f)]
    if existing:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise CertsError(
            f"refusing to overwrite {', '.join(existing[:3])}{more} (use --force to replace)"
        )


def _write_user(
    directory: Path,
    ca: _Authority,
    user: UserSpec,
    key_type: KeyType,
    sans: Sequence[x509.GeneralName] = (),
) -> list[Written]:
    certificate, key = _issue(ca, user.name, user.roles, key_type, client_names=sans)
    user_dir = _make_dir(directory / user.name)
    roles = ", ".join(user.roles) or "user"
    return [
        _write(
            user_dir / "client.crt",
            _pem(certificate),
            0o644,
            f"{user.name}'s certificate ({roles})",
        ),
        _write(user_dir / "client.key", _key_pem(key), 0o600, f"{user.name}'s private key"),
        _write(user_dir / "ca.crt", _pem(ca.certificate), 0o644, f"the CA, for {user.name}"),
    ]


def _write_pair(
    directory: Path, stem: str, certificate: x509.Certificate, key: PrivateKey, what: str
) -> list[Written]:
    _make_dir(directory)
    return [
        _write(directory / f"{stem}.crt", _pem(certificate), 0o644, f"{what} certificate"),
        _write(directory / f"{stem}.key", _key_pem(key), 0o600, f"{what} private key"),
    ]


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertsError(f"cannot create directory {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise CertsError(f"{path} exists and is not a directory")
    return path


def _write(path: Path, data: bytes, mode: int, what: str) -> Written:
    # A file being replaced (--force) is removed first: opening it with O_TRUNC would keep its
    # old, possibly wider, mode. O_EXCL then guarantees the file we write is the one we made.
    try:
        if os.path.lexists(path):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise CertsError(f"cannot write {path}: {exc.strerror}") from None
    return Written(path, what)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise CertsError(f"unknown key type {key_type!r}: use ecdsa or ed25519")


def _digest(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself: X.509 wants no separate digest for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    # Backdated a little: a client whose clock runs behind still accepts a fresh certificate.
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _new_authority(key_type: KeyType) -> _Authority:
    key = _generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobworker development CA")])
    not_before, not_after = _validity(CA_VALID_DAYS)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _digest(key))
    )
    return _Authority(certificate, key)


def _load_authority(directory: Path) -> _Authority:
    cert_file, key_file = directory / "ca.crt", directory / "ca.key"
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise CertsError(
            f"cannot read the CA in {directory}: {exc.filename}: {exc.strerror} "
            "(run `jobworker certs init` first)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise CertsError(f"cannot use the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CertsError(f"cannot use the CA in {directory}: only ECDSA and Ed25519 keys")
    if certificate.public_key() != key.public_key():
        raise CertsError(f"{key_file} is not the key of {cert_file}")
    return _Authority(certificate, key)


def _issue(
    ca: _Authority,
    common_name: str,
    organizational_units: Sequence[str],
    key_type: KeyType,
    *,
    server_names: Sequence[str] = (),
    client_names: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, PrivateKey]:
    key = _generate_key(key_type)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attributes += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in organizational_units
    ]
    not_before, not_after = _validity(LEAF_VALID_DAYS)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH
                    if server_names
                    else ExtendedKeyUsageOID.CLIENT_AUTH
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )
    if server_names:
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
            for n in server_names
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    elif client_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(client_names)), critical=False
        )
    return builder.sign(ca.key, _digest(ca.key)), key
