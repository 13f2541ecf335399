"""The audit log: one line per call, reads and refusals included, on ``jobworker.audit``.

    call identity=alice roles=user method=/jobworker.v1.JobService/StopJob job=web code=OK
      duration_ms=10012.4 peer=127.0.0.1:53422

Fed by the transport's call observer (``Server(observe=audit_call)``), so it sees every call
the server answered — those refused before any handler ran (UNAUTHENTICATED, an unknown
method, too many connections) as well as PERMISSION_DENIED and NOT_FOUND from the handlers —
and a call that ended unanswered (the client went away) as CANCELLED.

- identity, roles: the caller (its certificate's CN and OU roles); for a connection whose
  certificate named nobody, ``subject`` instead (the certificate's subject, RFC 4514).
- job: the job the request names, as the caller wrote it (an id, a name or a prefix); for
  StartJob, the id of the job it created.
- code: the gRPC status code's name; message: the status message, for codes other than OK.
- duration_ms: from the call's headers to its trailers, on the server's monotonic clock.

Values are written as the event log writes them (events.fields): a value that is not a plain
word is a JSON string, so a method path or a job name a client chose can never break a line
or forge another. The lines go where the server's log goes (the CLI: stderr, so the journal
under systemd); the library configures no handler.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from jobworker.purgatory import Status

from .events import fields
from .identity import Identity

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from jobworker.purgatory import CallEnded

audit = logging.getLogger("jobworker.audit")

# A job reference longer than this (a client may send megabytes) is cut short in the line.
_JOB_CHARS = 128


def audit_call(ended: CallEnded) -> None:
    """Log one call (a `Server(observe=...)` hook)."""
    if not audit.isEnabledFor(logging.INFO):
        return
    info = ended.connection
    identity = info.identity
    subject = None
    if isinstance(identity, Identity):
        name, roles = identity.name, identity.role_names
    else:
        name = roles = None
        if info.peer_certificate is not None:
            subject = info.peer_certificate.subject.rfc4514_string()
    audit.info(
        "call %s",
        fields(
            identity=name,
            roles=roles,
            subject=subject,
            method=ended.path,
            job=_job_of(ended.request) or _job_of(ended.response),
            code=ended.status.name,
            duration_ms=f"{ended.duration_s * 1000:.1f}",
            peer=info.peer_address,
            message=None if ended.status is Status.OK else ended.message,
        ),
    )


def _job_of(message: Message | None) -> str | None:
    """The job_id field of a request (the caller's reference) or of StartJob's response."""
    if message is None or "job_id" not in message.DESCRIPTOR.fields_by_name:
        return None
    reference = getattr(message, "job_id", "")
    if not isinstance(reference, str) or not reference:
        return None
    return reference if len(reference) <= _JOB_CHARS else reference[:_JOB_CHARS] + "..."
