"""What the server decides about every job, whoever asks: the account it runs as, its network.

Pure values, set from `jobworker serve`'s configuration. A caller never picks its own account:
the server maps identities to local accounts (`alice` → the local user `alice`, so her jobs get
her file permissions), root included only for the identities named so; everyone else's jobs run
as transient users of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from jobworker.supervisor.sandbox import NETWORKS, Network


@dataclass(frozen=True, slots=True)
class JobPolicy:
    """- run_as: identity (certificate CN) → local account name; unlisted identities' jobs run
      as transient users. An account only runs jobs when named here, root included.
    - network: what a job gets when it asks for nothing ("host" or "none").
    - allow_host_network: False refuses NETWORK_HOST (PERMISSION_DENIED)."""

    run_as: Mapping[str, str] = field(default_factory=dict)
    network: Network = "host"
    allow_host_network: bool = True

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {self.network!r}")
        if self.network == "host" and not self.allow_host_network:
            raise ValueError("the default network cannot be host when host networking is refused")
        for identity, account in self.run_as.items():
            if not identity or not account:
                raise ValueError(f"run-as: empty identity or account in {identity!r} = {account!r}")
        object.__setattr__(self, "run_as", MappingProxyType(dict(self.run_as)))

    @property
    def needs_isolation(self) -> bool:
        """Whether jobs can be run this way without isolation: only as the server's own user,
        on the host's network."""
        return bool(self.run_as) or self.network != "host"

    def account_for(self, identity: str) -> str | None:
        """The local account `identity`'s jobs run as; None: a transient user of their own."""
        return self.run_as.get(identity)


# Open GetJobLogs streams, in all: each holds a task, an open log file and a stream of a
# connection; a thousand is far beyond what people follow at once, far below what a server
# can hold. Connection limits (purgatory) bound the streams of each connection, not of a user.
DEFAULT_MAX_LOG_STREAMS = 1000


def per_user_share(cap: int | None) -> int | None:
    """The default per-identity cap under a server-wide `cap`: half of it (at least 1), so
    one identity can never take every slot and a second one always finds room."""
    return None if cap is None else max(1, cap // 2)


def check_caps(**caps: int | None) -> None:
    """ValueError unless each cap is None (no cap) or a whole number of at least 1."""
    for name, cap in caps.items():
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{name} must be at least 1, got {cap!r}")


DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a server keeps ended jobs, and how much output it keeps on disk.

    - keep_s, keep_jobs: an ended job's record and output go once it ended more than `keep_s`
      ago, or once `keep_jobs` newer ended jobs exist (oldest first).
    - output_budget_bytes: the output of every job together; above it, the oldest ended jobs'
      output goes first (their records stay, saying so), then running jobs' oldest output
      (readers are told, as with a job's own retention).
    """

    keep_s: float = 7 * DAY_S
    keep_jobs: int = 10_000
    output_budget_bytes: int = 10 * 2**30

    def __post_init__(self) -> None:
        if not self.keep_s > 0 or self.keep_jobs < 1 or self.output_budget_bytes < 1:
            raise ValueError(f"retention values must be positive: {self}")
