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

`ServerLimits` gathers every knob of the server's transport in one value: the caps above, the
connection timeouts, the per-call limits, and the wire's per-connection budgets (header sizes,
control-frame acknowledgements, resets, pings), which each connection's wire object receives.

`RateLimitedLog` is the one way refusals and other peer-triggered events are logged here: the
first of a burst at once, the rest counted and summed up in the next line, so a flood of attempts
costs one line per interval, not one per attempt.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import resource
import socket
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import trio

from .wire import (
    DEFAULT_IDLE_PING_INTERVAL_S,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONTINUATION_FRAMES,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_HEADER_LIST_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_ACKS,
    DEFAULT_MAX_PING_STRIKES,
    DEFAULT_MAX_RESET_BURST,
    DEFAULT_MIN_PING_INTERVAL_S,
    DEFAULT_RESET_REFILL_PER_S,
    header_budgets,
)

__all__ = [
    "Admission",
    "RateLimitedLog",
    "ServerLimits",
    "default_max_connections",
]

# Descriptors kept for everything that is not a connection: running jobs (pipes, log files,
# cgroup and pid handles), the store, listeners, what libraries open. Half the limit, at most
# this many: a large limit needs no larger reserve.
_RESERVED_DESCRIPTORS = 1024
# Connections beyond an identity's cap kept open just long enough to tell their client why
# (RESOURCE_EXHAUSTED on the first call), per identity; any more are closed at once, without a
# word. Otherwise a client reconnecting in a loop would hold one surplus connection per loop
# for as long as the refusal takes, and could fill the total cap that way.
REFUSALS_PER_IDENTITY = 4
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


# The fields of ServerLimits that are the wire's budgets, passed as they are to each
# wire.ServerConnection (the names are the wire's keywords).
_WIRE_BUDGETS = (
    "max_frame_bytes",
    "max_header_list_bytes",
    "max_header_block_bytes",
    "max_header_decode_bytes",
    "max_continuation_frames",
    "max_pending_acks",
    "max_reset_burst",
    "reset_refill_per_s",
    "min_ping_interval_s",
    "idle_ping_interval_s",
    "max_ping_strikes",
)


_TCP_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
_MAY_BE_ZERO = frozenset(
    {"lingering_handler_allowance", "max_continuation_frames", "max_ping_strikes"}
)


_MAX_MESSAGE_BYTES_CEILING = 2**31 - 1
# Linux's ceilings for TCP_KEEPIDLE / TCP_KEEPINTVL (MAX_TCP_KEEPIDLE) and TCP_KEEPCNT.
_MAX_KEEPALIVE_S = 32767
_MAX_KEEPALIVE_PROBES = 127


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every knob of the server's transport, with defaults a 2-core machine survives.

    Per call: `max_concurrent_streams` (SETTINGS_MAX_CONCURRENT_STREAMS; a stream beyond it is
    refused alone, REFUSED_STREAM), `max_receive_message_bytes`, and
    `lingering_handler_allowance`: handlers still running for streams the client has already
    reset count against `max_concurrent_streams`, plus this many, and while they fill it new
    streams are refused (the other half of rapid reset: golang/net http2's handler gate,
    ``curHandlers`` against ``advMaxStreams``).

    Connection timeouts (seconds; `math.inf` turns one off), counted once the TLS handshake is
    done: `preface_timeout_s` for the client's HTTP/2 preface, `first_request_timeout_s` for
    its first call, `request_timeout_s` for a call's request message to arrive in full after its
    headers (unary and server-streaming calls; a streaming request lasts as long as its call),
    `idle_timeout_s` without any open call before a graceful close.

    Connection caps (see `Admission`): `max_connections` in all (None: from the descriptor
    limit, `default_max_connections`), `max_connections_per_identity` (None: an eighth of that,
    at least 4), connections still in their TLS handshake in all (`max_handshakes`, None: a
    quarter of `max_connections`, at least 8) and per peer address.

    Dead peers: a peer that vanished without a FIN (a cable pulled, a host powered off) never
    reads or writes again, and a streaming call without a deadline would hold its slots
    forever. So accepted sockets have TCP keepalive: after `tcp_keepalive_idle_s` of silence,
    `tcp_keepalive_probes` probes `tcp_keepalive_interval_s` apart, then the kernel resets the
    connection (2 minutes by default); TCP_USER_TIMEOUT, the same total, bounds a peer that
    stops acknowledging data we sent (keepalive does not probe while data is unacknowledged,
    and retransmissions alone take ~15 minutes). `tcp_keepalive_idle_s=math.inf` turns this
    off. Above TCP, as grpc-go's server keepalive (Time, Timeout): while calls are open and the
    client has sent nothing for `keepalive_time_s`, the server PINGs it, and closes the
    connection (cancelling its calls) if nothing arrives within `keepalive_timeout_s`; this
    also covers a peer behind a proxy, where TCP keepalive reaches only the proxy.
    `keepalive_time_s=math.inf` turns it off.

    The wire's budgets, per connection (see wire/scanner.py for what each bounds): frame and
    header sizes, CONTINUATION frames per header block, control-frame acknowledgements owed,
    the reset/refusal token bucket, and the PING policy.
    """

    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    lingering_handler_allowance: int = 10

    preface_timeout_s: float = 10.0
    first_request_timeout_s: float = 30.0
    request_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0

    tcp_keepalive_idle_s: float = 60.0
    tcp_keepalive_interval_s: float = 15.0
    tcp_keepalive_probes: int = 4
    keepalive_time_s: float = 120.0
    keepalive_timeout_s: float = 20.0

    max_connections: int | None = None
    max_connections_per_identity: int | None = None
    max_handshakes: int | None = None
    max_handshakes_per_address: int = 32

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES
    # None: they follow max_header_list_bytes (twice and four times it: wire.header_budgets).
    max_header_block_bytes: int | None = None
    max_header_decode_bytes: int | None = None
    max_continuation_frames: int = DEFAULT_MAX_CONTINUATION_FRAMES
    max_pending_acks: int = DEFAULT_MAX_PENDING_ACKS
    max_reset_burst: int = DEFAULT_MAX_RESET_BURST
    reset_refill_per_s: float = DEFAULT_RESET_REFILL_PER_S
    min_ping_interval_s: float = DEFAULT_MIN_PING_INTERVAL_S
    idle_ping_interval_s: float = DEFAULT_IDLE_PING_INTERVAL_S
    max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            if spec.name.endswith("_s"):
                if not value > 0:  # also refuses NaN
                    raise ValueError(f"{spec.name} must be positive, got {value!r}")
            elif spec.name in _MAY_BE_ZERO:
                if not (isinstance(value, int) and value >= 0):
                    raise ValueError(f"{spec.name} must be an integer >= 0, got {value!r}")
            elif not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{spec.name} must be an integer >= 1, got {value!r}")
        for name in ("tcp_keepalive_idle_s", "tcp_keepalive_interval_s"):
            value = getattr(self, name)
            if value != math.inf and value > _MAX_KEEPALIVE_S:  # the kernel's own ceiling
                raise ValueError(f"{name} must be at most {_MAX_KEEPALIVE_S} (or inf for idle)")
        if self.tcp_keepalive_interval_s == math.inf:
            raise ValueError("tcp_keepalive_interval_s must be finite")
        if self.tcp_keepalive_probes > _MAX_KEEPALIVE_PROBES:
            raise ValueError(f"tcp_keepalive_probes must be at most {_MAX_KEEPALIVE_PROBES}")
        # A message's window share must fit the 32-bit arrays unread messages are packed in
        # (server._Inbox); no gRPC peer sends messages of 2 GiB anyway.
        if self.max_receive_message_bytes > _MAX_MESSAGE_BYTES_CEILING:
            raise ValueError(
                f"max_receive_message_bytes must be at most {_MAX_MESSAGE_BYTES_CEILING}, "
                f"got {self.max_receive_message_bytes}"
            )
        # HTTP/2's own range for SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2): refused here, at
        # startup, rather than by every connection's wire.
        if not 2**14 <= self.max_frame_bytes < 2**24:
            raise ValueError(
                f"max_frame_bytes must be from 16384 to 16777215, got {self.max_frame_bytes}"
            )
        # Refused here, once, rather than by every connection's wire.
        header_budgets(
            self.max_header_list_bytes, self.max_header_block_bytes, self.max_header_decode_bytes
        )

    def replace(self, **changes: Any) -> ServerLimits:
        """A copy with `changes` (field names, as keywords), validated like a new one."""
        unknown = set(changes) - {spec.name for spec in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown server limits: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def keep_alive(self, sock: Any) -> None:
        """Set TCP keepalive and TCP_USER_TIMEOUT on an accepted TCP socket (see the class
        docstring). A socket that cannot take them (closed meanwhile) is left as it is."""
        if self.tcp_keepalive_idle_s == math.inf or sock.family not in _TCP_FAMILIES:
            return
        idle = max(1, math.ceil(self.tcp_keepalive_idle_s))
        interval = max(1, math.ceil(self.tcp_keepalive_interval_s))
        probes = self.tcp_keepalive_probes
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + interval * probes) * 1000
            )
        except OSError:
            pass  # the peer left already: the connection ends on its own

    def wire_budgets(self) -> dict[str, Any]:
        """The wire's keywords for a wire.ServerConnection."""
        return {name: getattr(self, name) for name in _WIRE_BUDGETS}

    def admission(self) -> Admission:
        max_connections = self.max_connections
        if max_connections is None:
            max_connections = default_max_connections()
        return Admission(
            max_connections=max_connections,
            max_handshakes=(
                self.max_handshakes
                if self.max_handshakes is not None
                else max(8, max_connections // 4)
            ),
            max_handshakes_per_address=self.max_handshakes_per_address,
            max_connections_per_identity=(
                self.max_connections_per_identity
                if self.max_connections_per_identity is not None
                else max(4, max_connections // 8)
            ),
        )


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
        self._refusing: collections.Counter[Hashable] = collections.Counter()

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

    def claim_refusal(self, identity: Hashable) -> bool:
        """A connection of `identity` beyond its cap: may it stay to be told why? False once
        REFUSALS_PER_IDENTITY of them are being told already (then it is closed at once)."""
        if self._refusing[identity] >= REFUSALS_PER_IDENTITY:
            return False
        self._refusing[identity] += 1
        return True

    def release_refusal(self, identity: Hashable) -> None:
        left = self._refusing[identity] - 1
        if left:
            self._refusing[identity] = left
        else:
            del self._refusing[identity]

    def connections_of(self, identity: Hashable) -> int:
        return self._by_identity[identity]
