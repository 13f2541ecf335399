"""How many connections the server holds, from whom, and how it says no without flooding its log.

Admission happens in three places, each as early as what it counts is known:

- at accept: the total number of connections (`max_connections`), and the connections still in
  their TLS handshake, in total and per peer address. Nobody is authenticated yet, so holding
  handshakes open is the cheapest flood there is; capping them keeps room for the clients that
  do authenticate. Beyond a cap the socket is closed at once: a refusal costs a descriptor for
  microseconds, never a task.
- after the handshake: connections per identity (`max_connections_per_identity`), so that one
  certificate holder cannot take every slot from the others.

The default total derives from the process's descriptor limit (`default_max_connections`): every
connection is a descriptor, and so are the jobs' pipes, log files and cgroup handles, the store
and the listening sockets. A server that runs out of descriptors cannot even refuse politely
(accept fails with EMFILE, the listen queue fills), so the cap leaves a reserve below the limit.

`RateLimitedLog` is the one way refusals and other peer-triggered events are logged here: the
first of a burst at once, the rest counted and summed up in the next line, so a flood of attempts
costs one line per interval, not one per attempt.
"""

from __future__ import annotations

import collections
import logging
import resource
from collections.abc import Hashable

import trio

__all__ = [
    "Admission",
    "RateLimitedLog",
    "default_max_connections",
]

# Descriptors kept for everything that is not a connection: running jobs (pipes, log files,
# cgroup and pid handles), the store, listeners, what libraries open. Half the limit, at most
# this many: a large limit needs no larger reserve.
_RESERVED_DESCRIPTORS = 1024
# Above this many connections a 2-core server spends its memory on idle TLS and HTTP/2 state
# rather than on work, whatever the descriptor limit allows.
_MAX_DEFAULT_CONNECTIONS = 4096
_MIN_DEFAULT_CONNECTIONS = 16


def default_max_connections(descriptor_limit: int | None = None) -> int:
    """The default cap on connections for a process allowed `descriptor_limit` open files (by
    default, RLIMIT_NOFILE's soft limit now): the limit less a reserve for everything else."""
    if descriptor_limit is None:
        descriptor_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if descriptor_limit == resource.RLIM_INFINITY:
            return _MAX_DEFAULT_CONNECTIONS
    reserve = min(descriptor_limit // 2, _RESERVED_DESCRIPTORS)
    return max(_MIN_DEFAULT_CONNECTIONS, min(descriptor_limit - reserve, _MAX_DEFAULT_CONNECTIONS))


class RateLimitedLog:
    """Log an event once per `interval_s` per kind; count the rest and report them with the next
    line logged for that kind. Times are the Trio clock's (virtual in tests)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        # kind -> (when the next line may go out, events not logged since the last line)
        self._state: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, kind: str, message: str, *args: object) -> None:
        """`kind` groups events (a burst of one kind does not silence another); `message` and
        `args` are the logging call's, formatted only when the line is logged."""
        now = trio.current_time()
        next_at, suppressed = self._state.get(kind, (-float("inf"), 0))
        if now < next_at:
            self._state[kind] = (next_at, suppressed + 1)
            return
        if len(self._state) > 256:  # kinds are few and fixed; bound the table all the same
            self._state.clear()
        self._state[kind] = (now + self._interval_s, 0)
        if suppressed:
            message += " (and %d more like it in the last %g s)"
            args = (*args, suppressed, self._interval_s)
        self._logger.log(level, message, *args)


class Admission:
    """Counts of connections held, and the decisions on new ones (see the module docstring).

    Every grant is paired with exactly one release, by the caller, in a `finally`."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_handshakes: int,
        max_handshakes_per_address: int,
        max_connections_per_identity: int,
    ) -> None:
        for name, value in (
            ("max_connections", max_connections),
            ("max_handshakes", max_handshakes),
            ("max_handshakes_per_address", max_handshakes_per_address),
            ("max_connections_per_identity", max_connections_per_identity),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_connections_per_identity = max_connections_per_identity
        self.connections = 0
        self.handshakes = 0
        self._handshakes_by_address: collections.Counter[str] = collections.Counter()
        self._by_identity: collections.Counter[Hashable] = collections.Counter()

    # -- at accept

    def admit(self, address: str) -> str | None:
        """Take a connection slot and a handshake slot for `address`; or the name of the cap
        that refuses it (nothing taken)."""
        if self.connections >= self.max_connections:
            return "max_connections"
        if self.handshakes >= self.max_handshakes:
            return "max_handshakes"
        if self._handshakes_by_address[address] >= self.max_handshakes_per_address:
            return "max_handshakes_per_address"
        self.connections += 1
        self.handshakes += 1
        self._handshakes_by_address[address] += 1
        return None

    def handshake_ended(self, address: str) -> None:
        self.handshakes -= 1
        left = self._handshakes_by_address[address] - 1
        if left:
            self._handshakes_by_address[address] = left
        else:
            del self._handshakes_by_address[address]

    def release(self) -> None:
        self.connections -= 1

    # -- after the handshake

    def claim_identity(self, identity: Hashable) -> bool:
        """Count one more connection of `identity`; False (nothing counted) beyond the cap."""
        held = self._by_identity[identity]
        if held >= self.max_connections_per_identity:
            if not held:
                del self._by_identity[identity]  # Counter lookups insert nothing, but be sure
            return False
        self._by_identity[identity] = held + 1
        return True

    def release_identity(self, identity: Hashable) -> None:
        left = self._by_identity[identity] - 1
        if left:
            self._by_identity[identity] = left
        else:
            del self._by_identity[identity]

    def connections_of(self, identity: Hashable) -> int:
        return self._by_identity[identity]
