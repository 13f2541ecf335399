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
* The CN must be exactly one non-empty attribute of printable characters: it is the job owner,
  appears in every event line and is compared for equality, so a CN with a newline (a forged
  log line) or two CNs (which one owns the job?) is refused rather than guessed at.
"""

from __future__ import annotations

import enum
import logging
import warnings
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
