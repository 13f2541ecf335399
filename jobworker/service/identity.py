"""Who is calling: the identity taken from a verified client certificate.

The name is the subject's CN (seed 000); the roles are the subject's OU values (issue 4): none
is a plain user, ``admin`` and ``viewer`` are the two roles. Built once per connection by the
transport (``Server(identify=identify)``) and handed to every call on it.

Decisions:

* OU values match exactly (``admin``, ``viewer``, lower case). Any other OU value is ignored:
  a certificate never gains rights from a value we do not know (least privilege), and an
  organisation's usual OUs (``engineering``) must not lock anyone out. Ignored values are
  logged, so a typo such as ``Admin`` is visible to the operator.
* A certificate with both ``admin`` and ``viewer`` has both roles; authz grants the union.
* The allow-list (`AllowList`, optional) is a gate before all this, not a role: a certificate
  it does not name is refused PERMISSION_DENIED (the CA vouched for it; this server does not
  want it), checked on every call by the service so a reloaded list holds on open connections.
* The CN must be exactly one non-empty attribute of printable characters: it is the job owner,
  appears in every event line and is compared for equality, so a CN with a newline (a forged
  log line) or two CNs (which one owns the job?) is refused rather than guessed at.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from jobworker.purgatory import GrpcError, Status

from .events import events, fields

log = logging.getLogger("jobworker.service")

MAX_NAME_CHARS = 256  # a CN is at most 64 characters (RFC 5280 ub-common-name); be lenient


class Role(enum.Enum):
    """A role granted by a subject OU value (the value is the OU spelling)."""

    ADMIN = "admin"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller: its name (the subject CN) and its roles (empty for a plain user)."""

    name: str
    roles: frozenset[Role] = frozenset()

    @property
    def role_names(self) -> str:
        """For logs: "user" or the roles, comma-separated."""
        return ",".join(sorted(role.value for role in self.roles)) or "user"


_ROLE_BY_OU = {role.value: role for role in Role}


def identify(cert: x509.Certificate | None) -> Identity:
    """The identity of a verified client certificate, or GrpcError(UNAUTHENTICATED)."""
    if cert is None:
        raise _refuse("no client certificate was presented", None)
    with warnings.catch_warnings():
        # cryptography warns of a CN outside 1..64 characters; we judge the CN ourselves below
        warnings.simplefilter("ignore", UserWarning)
        subject = cert.subject
    common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not common_names:
        raise _refuse("the client certificate's subject has no CN", subject)
    if len(common_names) > 1:
        raise _refuse("the client certificate's subject has several CNs", subject)
    name = common_names[0].value
    if not isinstance(name, str) or not name.strip():
        raise _refuse("the client certificate's subject CN is empty", subject)
    if not name.isprintable() or len(name) > MAX_NAME_CHARS:
        raise _refuse(
            "the client certificate's subject CN has control characters or is too long", subject
        )
    roles = set()
    for attribute in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        role = _ROLE_BY_OU.get(attribute.value)  # type: ignore[call-overload]
        if role is None:
            log.info("certificate of %r: OU %r grants no role (ignored)", name, attribute.value)
        else:
            roles.add(role)
    return Identity(name, frozenset(roles))


def _refuse(reason: str, subject: x509.Name | None) -> GrpcError:
    shown = subject.rfc4514_string() if subject is not None else None
    events.warning("authentication failure %s", fields(reason=reason, subject=shown))
    return GrpcError(Status.UNAUTHENTICATED, f"cannot identify the caller: {reason}")


# --- the allow-list -----------------------------------------------------------------------------

# How an allow-list entry names a certificate: by its subject CN (a bare name, or "cn:NAME"), or
# by one of its subject alternative names, the kinds named as OpenSSL does, in lower case.
ALLOW_KINDS = ("cn", "dns", "email", "uri", "ip")
_SAN_TYPES: dict[str, type[x509.GeneralName]] = {
    "dns": x509.DNSName,
    "email": x509.RFC822Name,
    "uri": x509.UniformResourceIdentifier,
    "ip": x509.IPAddress,
}


@dataclass(frozen=True, slots=True)
class AllowList:
    """Which verified certificates may call at all, by CN or by a SAN (one design's request).

    A certificate is admitted when its CN or any of its SANs is an entry. DNS names compare
    without case (DNS has none), IP addresses as addresses (``::1`` is ``0:0::1``); a CN, an
    email address and a URI compare exactly: a near miss admits nobody. An entry never widens
    what a certificate may do: roles still come from the OUs, and authz decides the rest.
    """

    entries: frozenset[tuple[str, str]]

    @classmethod
    def parse(cls, items: Iterable[str]) -> AllowList:
        """From ``alice``, ``cn:alice``, ``dns:ci.example.com``, ``email:bob@example.com``,
        ``uri:spiffe://example.org/ci``, ``ip:10.0.0.7``; ValueError names a bad one."""
        entries = set()
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"expected a CN or KIND:NAME, got {item!r}")
            kind, sep, name = item.strip().partition(":")
            if not sep or kind.lower() not in ALLOW_KINDS:
                kind, name = "cn", item.strip()  # a CN may hold a colon; only known kinds split
            kind, name = kind.lower(), name.strip()
            if not name:
                raise ValueError(f"{item!r} has nothing after '{kind}:'")
            entries.add((kind, _canonical(kind, name, item)))
        return cls(frozenset(entries))

    def admits(self, cert: x509.Certificate | None, identity: Identity) -> bool:
        return any(entry in self.entries for entry in names_of(cert, identity))

    def __str__(self) -> str:
        return ", ".join(
            sorted(name if kind == "cn" else f"{kind}:{name}" for kind, name in self.entries)
        )


def names_of(cert: x509.Certificate | None, identity: Identity) -> list[tuple[str, str]]:
    """Every name a certificate answers to, as allow-list entries: its CN, then its SANs."""
    names = [("cn", identity.name)]
    if cert is None:
        return names
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    for kind, san_type in _SAN_TYPES.items():
        for value in sans.get_values_for_type(san_type):  # type: ignore[type-var]
            try:
                names.append((kind, _canonical(kind, str(value), str(value))))
            except ValueError:
                continue  # a SAN we cannot read never matches, nor stops the others
    return names


def _canonical(kind: str, name: str, item: str) -> str:
    if kind == "dns":
        return name.lower().rstrip(".")
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
        except ValueError:
            raise ValueError(f"{item!r}: {name!r} is not an IP address") from None
    return name


def refuse_unlisted(identity: Identity, cert: x509.Certificate | None, peer: str) -> GrpcError:
    """The answer to a verified certificate that is not on the allow-list, and its log line."""
    subject = cert.subject.rfc4514_string() if cert is not None else None
    sans = ",".join(f"{k}:{v}" for k, v in names_of(cert, identity)[1:]) or None
    events.warning(
        "access refused %s",
        fields(
            identity=identity.name,
            peer=peer,
            subject=subject,
            sans=sans,
            reason="not on the allow-list",
        ),
    )
    return GrpcError(
        Status.PERMISSION_DENIED,
        f"{identity.name} may not use this server: neither its certificate's CN nor any of its"
        " alternative names is on the server's allow-list",
    )
