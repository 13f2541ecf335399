"""identify(): the subject CN is the name, OU values the roles; anything else is refused."""

from __future__ import annotations

import datetime as dt
import logging
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobworker.purgatory import GrpcError, Status
from jobworker.service import Identity, Role, identify

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
