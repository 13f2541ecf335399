"""`jobworker certs`: what it writes, with which names, roles, usages and permissions."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import JOBWORKER, run


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_names_roles_usages_and_modes(certs_dir: Path) -> None:
    # certs_dir: `jobworker certs init DIR --user alice --user bob --user carol:admin ...`
    ca = cert(certs_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = cert(certs_dir / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)

    for user, roles in (("alice", []), ("carol", ["admin"]), ("vic", ["viewer"])):
        leaf = cert(certs_dir / user / "client.crt")
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user
        ous = [
            a.value for a in leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        ]
        assert ous == roles
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        leaf.verify_directly_issued_by(ca)
        assert (certs_dir / user / "ca.crt").read_bytes() == (certs_dir / "ca.crt").read_bytes()

    for key in ("ca.key", "server.key", "alice/client.key", "carol/client.key"):
        assert mode(certs_dir / key) == 0o600, key
    assert mode(certs_dir / "alice") == 0o700


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    assert run([*JOBWORKER, "certs", "init", str(directory), "--user", "al"]).returncode == 0
    before = (directory / "ca.crt").read_bytes()
    again = run([*JOBWORKER, "certs", "init", str(directory), "--user", "al"])
    assert again.returncode == 2
    assert again.stderr.startswith(f"jobworker: refusing to overwrite {directory}/ca.crt".encode())
    assert (directory / "ca.crt").read_bytes() == before
    # A forced rewrite replaces even a key someone had widened: new file, mode 0600 again.
    (directory / "server.key").chmod(0o644)
    forced = run([*JOBWORKER, "certs", "init", str(directory), "--user", "al", "--force"])
    assert forced.returncode == 0, forced.stderr
    assert (directory / "ca.crt").read_bytes() != before
    assert mode(directory / "server.key") == 0o600


def test_ed25519_extra_hosts_and_added_users(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    done = run([*JOBWORKER, "certs", "init", str(directory), "--key-type", "ed25519",
                "--host", "build01.example", "--host", "10.0.0.5"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"jobworker serve --cert" in done.stdout and b"certs add" in done.stdout
    server = cert(directory / "server.crt")
    assert isinstance(server.public_key(), ed25519.Ed25519PublicKey)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "build01.example" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.0.0.5") in sans.get_values_for_type(x509.IPAddress)

    added = run([*JOBWORKER, "certs", "add", str(directory), "--user", "dave:admin,viewer"])
    assert added.returncode == 0, added.stderr
    dave = cert(directory / "dave" / "client.crt")
    dave.verify_directly_issued_by(cert(directory / "ca.crt"))
    assert [a.value for a in dave.subject] == ["dave", "admin", "viewer"]
    assert mode(directory / "dave" / "client.key") == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "eve:boss"], b"jobworker: unknown role 'boss' for eve"),
        (["--user", "../etc"], b"jobworker: bad user name '../etc'"),
        (["--user", "al", "--user", "al"], b"jobworker: user 'al' is named twice"),
        (["--key-type", "rsa"], b"jobworker: Invalid value"),
    ],
)
def test_bad_requests_write_nothing(tmp_path: Path, args: list[str], message: bytes) -> None:
    directory = tmp_path / "tls"
    done = run([*JOBWORKER, "certs", "init", str(directory), *args])
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert not directory.exists()


def test_add_needs_the_ca(tmp_path: Path) -> None:
    done = run([*JOBWORKER, "certs", "add", str(tmp_path), "--user", "x"])
    assert done.returncode == 2
    assert b"cannot read the CA in" in done.stderr and b"certs init" in done.stderr


def test_add_with_subject_alternative_names(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    assert run([*JOBWORKER, "certs", "init", str(directory)]).returncode == 0
    done = run([*JOBWORKER, "certs", "add", str(directory), "--user", "ci",
                "--san", "dns:ci.example.com", "--san", "email:ci@example.com",
                "--san", "uri:spiffe://example.org/ci", "--san", "ip:10.0.0.7"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = cert(directory / "ci" / "client.crt")
    assert client.subject.rfc4514_string() == "CN=ci"
    sans = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ci.example.com"]
    assert sans.get_values_for_type(x509.RFC822Name) == ["ci@example.com"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/ci"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # still a client's, not a server's


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "x", "--san", "host:x"], b"jobworker: bad --san 'host:x': expected KIND:VALUE"),
        (["--user", "x", "--san", "dns:"], b"jobworker: bad --san 'dns:': expected KIND:VALUE"),
        (["--user", "x", "--san", "ip:1.2.3"], b"jobworker: bad --san 'ip:1.2.3': '1.2.3' does"),
        (["--user", "x", "--user", "y", "--san", "dns:a"],
         b"jobworker: --san names one user's certificate: give exactly one --user with it"),
    ],
)  # fmt: skip
def test_bad_sans_write_nothing(tmp_path: Path, args: list[str], message: bytes) -> None:
    directory = tmp_path / "tls"
    assert run([*JOBWORKER, "certs", "init", str(directory)]).returncode == 0
    done = run([*JOBWORKER, "certs", "add", str(directory), *args])
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count(b"\n") == 1, done.stderr
    assert not (directory / "x").exists()
