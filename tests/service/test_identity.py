"""identify(): the subject CN is the name, OU values the roles; anything else is refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobworker.purgatory import GrpcError, Status
from jobworker.service import AllowList, Identity, Role, identify

_KEY = ec.generate_private_key(ec.SECP256R1())


def cert(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Certificate:
    """A certificate with this subject. Not validated: a peer's certificate may break the rules
    (a CN of 0 or 300 characters) that cryptography's builder enforces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # of the out-of-rule names, built on purpose
        subject = x509.Name(
            [x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes]
        )
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )


CN, OU = NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME


@pytest.mark.parametrize(
    ("ous", "roles"),
    [
        ((), set()),
        (("admin",), {Role.ADMIN}),
        (("viewer",), {Role.VIEWER}),
        (("viewer", "admin"), {Role.ADMIN, Role.VIEWER}),
        (("engineering", "viewer"), {Role.VIEWER}),  # other OUs are ignored
        (("Admin", "ADMIN", "admin "), set()),  # exact spelling only
        (("superuser", "root"), set()),
    ],
)
def test_the_cn_is_the_name_and_known_ous_are_the_roles(ous: tuple[str, ...], roles) -> None:
    identity = identify(cert((CN, "alice"), *((OU, ou) for ou in ous)))
    assert identity == Identity("alice", frozenset(roles))


def test_an_identity_is_a_hashable_value() -> None:
    a = identify(cert((CN, "alice"), (OU, "admin")))
    assert a == Identity("alice", frozenset({Role.ADMIN})) and hash(a) == hash(
        Identity("alice", frozenset({Role.ADMIN}))
    )
    with pytest.raises(AttributeError):
        a.name = "mallory"  # type: ignore[misc]


def test_unicode_names_are_names() -> None:
    assert identify(cert((CN, "zoë ünïcode"))).name == "zoë ünïcode"


@pytest.mark.parametrize(
    ("certificate", "words"),
    [
        (None, "no client certificate"),
        (cert((OU, "admin")), "no CN"),
        (cert((CN, "alice"), (CN, "bob")), "several CNs"),
        (cert((CN, "")), "empty"),
        (cert((CN, "   ")), "empty"),
        (cert((CN, "alice\nauthorization failure identity=bob")), "control characters"),
        (cert((CN, "a\x00b")), "control characters"),
        (cert((CN, "x" * 300)), "too long"),
    ],
    ids=["none", "no-cn", "two-cns", "empty-cn", "blank-cn", "newline", "nul", "long"],
)
def test_no_identity_is_unauthenticated_and_logged(
    certificate: x509.Certificate | None, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jobworker.events")
    with pytest.raises(GrpcError) as caught:
        identify(certificate)
    assert caught.value.status is Status.UNAUTHENTICATED
    assert words in caught.value.message
    [record] = [r for r in caplog.records if r.name == "jobworker.events"]
    assert record.getMessage().startswith("authentication failure ")
    assert "\n" not in record.getMessage()


# --- the allow-list --------------------------------------------------------------------------


def cert_with_sans(cn: str, *names: x509.GeneralName) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(CN, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(CN, "CA")]))
        .public_key(_KEY.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


CI = cert_with_sans(
    "build-7",
    x509.DNSName("CI.Example.com"),
    x509.RFC822Name("ci@example.com"),
    x509.UniformResourceIdentifier("spiffe://example.org/ci"),
    x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
)


@pytest.mark.parametrize(
    ("entries", "admitted"),
    [
        (["build-7"], True),  # a bare entry is a CN
        (["cn:build-7"], True),
        (["Build-7"], False),  # a CN compares exactly
        (["build-"], False),  # no prefixes
        (["dns:ci.example.com"], True),  # DNS without case
        (["dns:ci.example.com."], True),  # nor the root's dot
        (["dns:example.com"], False),  # no suffixes either
        (["email:ci@example.com"], True),
        (["email:CI@example.com"], False),
        (["uri:spiffe://example.org/ci"], True),
        (["uri:spiffe://example.org/c"], False),
        (["ip:2001:db8:0::7"], True),  # as an address, whatever the spelling
        (["ip:[2001:db8::7]"], True),
        (["ip:2001:db8::8"], False),
        (["alice", "bob"], False),
        (["alice", "uri:spiffe://example.org/ci"], True),
        (["dns:build-7"], False),  # the CN is not a DNS name, nor the other way round
        (["ci.example.com"], False),
    ],
)
def test_the_allow_list_admits_a_certificate_by_its_cn_or_a_san(
    entries: list[str], admitted: bool
) -> None:
    assert AllowList.parse(entries).admits(CI, identify(CI)) is admitted


def test_a_certificate_without_sans_is_admitted_by_its_cn_only() -> None:
    plain = cert((CN, "alice"))
    assert AllowList.parse(["alice"]).admits(plain, identify(plain))
    assert not AllowList.parse(["dns:alice", "email:alice"]).admits(plain, identify(plain))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "expected a CN or KIND:NAME, got ''"),
        ("dns:", "'dns:' has nothing after 'dns:'"),
        ("ip:10.0.0.300", "'ip:10.0.0.300': '10.0.0.300' is not an IP address"),
        (7, "expected a CN or KIND:NAME, got 7"),
    ],
)
def test_allow_list_mistakes_are_named(entry, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        AllowList.parse([entry])
    assert str(caught.value) == message


def test_an_unknown_kind_is_part_of_a_cn() -> None:
    # "team:alice" is a CN with a colon (CNs may hold one), not a kind we do not know.
    allowed = AllowList.parse(["team:alice"])
    assert allowed.entries == frozenset({("cn", "team:alice")})
    assert str(AllowList.parse(["bob", "DNS:CI.example.com", "ip:::1"])) == (
        "bob, dns:ci.example.com, ip:::1"
    )
