"""`jobworker serve`'s settings: built-in defaults, then a TOML file, then flags.

Every flag is also a config key, spelled like the flag without its dashes::

    listen = "0.0.0.0:50051"
    cert = "/etc/jobworker/server.crt"
    data-dir = "/var/lib/jobworker"
    grace-period = "10s"        # durations: "500ms", "5s", "1m30s", or a number of seconds
    max-jobs = 100              # running jobs: in all, and per identity (default: half)
    max-jobs-per-user = 50
    max-log-streams = 1000      # open GetJobLogs streams: in all, and per identity (half)
    max-log-streams-per-user = 500
    cpu = "50%"                 # cores (0.5, 2) or a percentage of one core ("50%" = 0.5)
    memory = "512M"             # sizes: "512M", "1G", or a number of bytes
    max-memory = "4G"
    keep = "7d"                 # ended jobs: how long, how many, and all output's budget
    keep-jobs = 10000
    output-budget = "10G"
    output-retention = "256M"   # each job's output: the newest this much is kept
    isolation = "auto"          # auto (on as root), on, off
    transient-uids = "70000-79999"
    network = "host"            # jobs' default: host or none
    allow-host-network = true   # false: only network none
    max-connections = 512       # connections: in all (default: from the descriptor limit),
    max-connections-per-user = 64   # per identity (an eighth), and idle ones close after
    idle-timeout = "5m"         # "off" keeps them
    audit = true                # one line per call on the jobworker.audit logger
    metrics = "127.0.0.1:9464"  # Prometheus metrics over plain HTTP; a bare port: loopback
    allow = ["alice", "dns:ci.example.com"]   # who may call: CNs or SANs (default: everyone
                                # whose certificate the CA signed); see service.AllowList
    log-format = "text"         # or "json": one object per line
    log-level = "info"          # debug, info, warning, error
    [run-as]                    # identity = local account; others run as transient users
    alice = "alice"
    [transport]                 # the rest of the transport's budgets (see TRANSPORT_KEYS)
    max-header-list = "16K"
    max-reset-burst = 1000

Every field of the transport's `ServerLimits` is a key: the three above at the top level (they
are flags too), the others in the `[transport]` table, named as in `TRANSPORT_KEYS`.

A key the server does not know is an error (a typo must not silently leave a default in place).
Everything here is pure but for reading what the host has (`HostCapacity.probe`, the default
maximums; tests pass their own): the caller reads the file and reports `ConfigError` in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobworker.purgatory import ServerLimits
from jobworker.service.identity import AllowList
from jobworker.service.policy import (
    DEFAULT_MAX_LOG_STREAMS,
    JobPolicy,
    Retention,
    per_user_share,
)
from jobworker.supervisor import (
    HostCapacity,
    InvalidJobSpec,
    LimitOutOfRange,
    LimitOverrides,
    LimitPolicy,
    Limits,
)
from jobworker.supervisor.sandbox import DEFAULT_TRANSIENT_UIDS, NETWORKS
from jobworker.supervisor.supervisor import DEFAULT_GRACE_PERIOD_S, DEFAULT_RETENTION_BYTES
from jobworker.units import format_bytes

from .parsing import (
    DEFAULT_PORT,
    Address,
    parse_address,
    parse_cpu,
    parse_duration,
    parse_size,
)

DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
# Where a server keeps its state when not told: the FHS place as root, else the user's own.
DEFAULT_DATA_DIR = Path("/var/lib/jobworker")
DEFAULT_TLS_DIR = Path("/etc/jobworker")
DEFAULT_MAX_JOBS = 100
# A job's output log keeps at least 7/8 of its cap from here on (see supervisor/output.py).
MIN_OUTPUT_RETENTION_BYTES = 512 * 2**10
METRICS_HOST = "127.0.0.1"  # where --metrics PORT listens
CGROUP_MODES = ("auto", "v2", "v1", "off")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
ISOLATION_MODES = ("auto", "on", "off")


class ConfigError(Exception):
    """A setting cannot be used. The message names the setting and says what is wrong."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    listen: Address
    cert_file: Path
    key_file: Path
    ca_file: Path
    data_dir: Path | None  # None: the default (see default_data_dir)
    limits: LimitPolicy
    grace_period_s: float
    max_jobs: int
    max_jobs_per_user: int
    max_log_streams: int
    max_log_streams_per_user: int
    cgroups: str
    isolation: str  # auto (on as root), on, off
    transient_uids: range
    policy: JobPolicy
    retention: Retention
    transport: ServerLimits
    output_retention_bytes: int = DEFAULT_RETENTION_BYTES  # per job
    # Observing the server: the audit log, and where metrics are served (None: nowhere).
    audit: bool = False
    metrics: Address | None = None
    allowed: AllowList | None = None  # None: every certificate the CA signed
    log_format: str = "text"
    log_level: str = "info"


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"not a size: {value!r}")
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise ValueError(f'not a size: {value!r} (examples: "512M", "1G", 4096)')


def _duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"not a duration: {value!r}")
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f'not a duration: {value!r} (examples: "5s", "500ms", 10)')


def _number(value: Any, what: str) -> float:
    """A number, or a string of one, as TOML or a flag gives it."""
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"not {what}: {value!r}")


def _cpu(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'not a number of cores or a percentage: {value!r} (0.5, 2, "50%")')
    return parse_cpu(value if isinstance(value, str) else float(value))


def _rate(value: Any) -> float:
    rate = _number(value, "a rate per second")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"expected a rate per second above zero, got {value!r}")
    return rate


def _count(value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not a whole number: {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"not a whole number of at least {minimum}: {value!r}")
    return value


_count_or_zero = functools.partial(_count, minimum=0)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _timeout(value: Any) -> float:
    """A duration of more than nothing, or "off" (never)."""
    return math.inf if value == "off" else _positive_duration(value)


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _listen(value: Any) -> Address:
    return parse_address(_text(value), default_port=DEFAULT_PORT)


def _metrics_address(value: Any) -> Address:
    """HOST:PORT, or a bare PORT for loopback: the metrics are plain HTTP without
    authentication, so they reach beyond this machine only when an address says so
    (":PORT" is every interface, as for listen)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _text(value).strip()
    if text.isdigit():
        text = f"{METRICS_HOST}:{text}"
    return parse_address(text)


def _cgroup_mode(value: Any) -> str:
    if value not in CGROUP_MODES:
        raise ValueError(f"expected one of {', '.join(CGROUP_MODES)}, got {value!r}")
    return value


def _isolation_mode(value: Any) -> str:
    if value not in ISOLATION_MODES:
        raise ValueError(f"expected one of {', '.join(ISOLATION_MODES)}, got {value!r}")
    return value


def _network(value: Any) -> str:
    if value not in NETWORKS:
        raise ValueError(f"expected one of {', '.join(NETWORKS)}, got {value!r}")
    return value


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _allow(value: Any) -> AllowList:
    """From the file: a list of CNs or KIND:NAMEs; from flags: the same, one per --allow."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f'expected a list such as ["alice", "dns:ci.example.com"], got {value!r}')
    if not value:
        # Refusing everyone is never what an empty list means to say; no list allows everyone.
        raise ValueError("an empty list would refuse every client: leave the key out instead")
    return AllowList.parse(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _uid_range(value: Any) -> range:
    text = _text(value)
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise ValueError(f'expected FIRST-LAST, e.g. "70000-79999", got {value!r}')
    start, stop = int(first), int(last) + 1
    if not 1 <= start < stop <= 2**31:
        raise ValueError(f"expected a range of ids between 1 and 2147483647, got {value!r}")
    return range(start, stop)


def _accounts(value: Any) -> dict[str, str]:
    """From the config file: a table ``identity = "account"``; from flags: ``ID=ACCOUNT``s."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = []
        for item in value:
            identity, sep, name = str(item).partition("=")
            if not sep:
                raise ValueError(f"expected IDENTITY=ACCOUNT, got {item!r}")
            pairs.append((identity, name))
    else:
        raise ValueError(f'expected a table such as alice = "alice", got {value!r}')
    accounts: dict[str, str] = {}
    for identity, name in pairs:
        if not isinstance(name, str) or not identity.strip() or not name.strip():
            raise ValueError(f"expected an identity and an account name, got {identity!r}")
        accounts[identity.strip()] = name.strip()
    return accounts


# The transport's knobs (purgatory.ServerLimits): key → (field, parser). The first three are
# flags and top-level keys; the others live in the [transport] table.
TRANSPORT_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max-connections": ("max_connections", _count),
    "max-connections-per-user": ("max_connections_per_identity", _count),
    "idle-timeout": ("idle_timeout_s", _timeout),
    "max-streams": ("max_concurrent_streams", _count),
    "max-message": ("max_receive_message_bytes", _size),
    "lingering-handlers": ("lingering_handler_allowance", _count_or_zero),
    "preface-timeout": ("preface_timeout_s", _timeout),
    "first-request-timeout": ("first_request_timeout_s", _timeout),
    "request-timeout": ("request_timeout_s", _timeout),
    "max-handshakes": ("max_handshakes", _count),
    "max-handshakes-per-address": ("max_handshakes_per_address", _count),
    "max-frame": ("max_frame_bytes", _size),
    "max-header-list": ("max_header_list_bytes", _size),
    "max-header-block": ("max_header_block_bytes", _size),
    "max-header-decode": ("max_header_decode_bytes", _size),
    "max-continuation-frames": ("max_continuation_frames", _count_or_zero),
    "max-pending-acks": ("max_pending_acks", _count),
    "max-reset-burst": ("max_reset_burst", _count),
    "reset-refill": ("reset_refill_per_s", _rate),
    # Not timeouts: "off" (infinity) would make every ping too soon, the opposite of off.
    "min-ping-interval": ("min_ping_interval_s", _positive_duration),
    "idle-ping-interval": ("idle_ping_interval_s", _positive_duration),
    "max-ping-strikes": ("max_ping_strikes", _count_or_zero),
    # Dead peers: TCP keepalive ("off" turns it off), and HTTP/2 PINGs while calls are open.
    "tcp-keepalive-idle": ("tcp_keepalive_idle_s", _timeout),
    "tcp-keepalive-interval": ("tcp_keepalive_interval_s", _positive_duration),
    "tcp-keepalive-probes": ("tcp_keepalive_probes", _count),
    "keepalive-time": ("keepalive_time_s", _timeout),
    "keepalive-timeout": ("keepalive_timeout_s", _positive_duration),
}
_TOP_LEVEL_TRANSPORT_KEYS = ("max-connections", "max-connections-per-user", "idle-timeout")
_TABLE_TRANSPORT_KEYS = tuple(k for k in TRANSPORT_KEYS if k not in _TOP_LEVEL_TRANSPORT_KEYS)
# key → parser; the keys are the flags' names. Limits map to supervisor field names below.
_LIMIT_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "cpu": ("cpu", _cpu),
    "memory": ("memory_bytes", _size),
    "io-read": ("io_read_bps", _size),
    "io-write": ("io_write_bps", _size),
    "pids": ("pids", _count),
    "io-read-iops": ("io_read_iops", _count),  # unset: no IOPS limit (a maximum needs one)
    "io-write-iops": ("io_write_iops", _count),
}
_KEYS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen,
    "cert": _text,
    "key": _text,
    "ca": _text,
    "data-dir": _text,
    "grace-period": _duration,
    "max-jobs": _count,
    "max-jobs-per-user": _count,
    "max-log-streams": _count,
    "max-log-streams-per-user": _count,
    "cgroups": _cgroup_mode,
    "isolation": _isolation_mode,
    "transient-uids": _uid_range,
    "run-as": _accounts,
    "network": _network,
    "allow-host-network": _flag,
    "keep": _duration,
    "keep-jobs": _count,
    "output-budget": _size,
    "output-retention": _size,
    # Observing the server
    "audit": _flag,
    "metrics": _metrics_address,
    "allow": _allow,
    "log-format": _one_of(*LOG_FORMATS),
    "log-level": _one_of(*LOG_LEVELS),
    **{key: parser for key, (_, parser) in _LIMIT_KEYS.items()},
    **{f"max-{key}": parser for key, (_, parser) in _LIMIT_KEYS.items()},
    **{key: TRANSPORT_KEYS[key][1] for key in _TOP_LEVEL_TRANSPORT_KEYS},
    "transport": _table,  # its keys are checked in _transport
}
KEYS = tuple(_KEYS)
LIMIT_KEY_OF = {name: key for key, (name, _) in _LIMIT_KEYS.items()}


def load_config_file(path: Path) -> dict[str, Any]:
    """The raw table from a TOML file; ConfigError if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the decoder's error out
        raise ConfigError(
            f"config file {path}: not UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None


def resolve(
    flags: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    source: str = "config",
    host: HostCapacity | None = None,
) -> ServeSettings:
    """Settings from flags (None: not given) over the config table over the defaults.

    `flags` and `config` are keyed by the flag names in `KEYS`. Flag values are strings as
    typed; config values are whatever TOML made of them. `host`: what this machine has, the
    default maximums and the most any maximum may be (None: probed from the kernel).
    """
    values: dict[str, Any] = {}
    for key, raw in (config or {}).items():
        if key not in _KEYS:
            close = difflib.get_close_matches(key.replace("_", "-"), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        values[key] = _parse(key, raw, f"{source}: {key}")
    for key, raw in flags.items():
        if key not in _KEYS:
            raise ValueError(f"no such setting: {key}")  # a bug in the caller, not user input
        if raw is None or raw == ():
            continue
        parsed = _parse(key, raw, f"--{key}")
        if key == "run-as":  # the flags add to the file's table, one identity at a time
            parsed = {**values.get(key, {}), **parsed}
        elif key == "allow" and key in values:  # and to the file's allow-list
            parsed = AllowList(values[key].entries | parsed.entries)
        values[key] = parsed

    tls_dir = DEFAULT_TLS_DIR
    try:
        defaults = Limits(
            **{name: values[key] for key, (name, _) in _LIMIT_KEYS.items() if key in values}
        )
        maximums = LimitOverrides(
            **{
                name: values[f"max-{key}"]
                for key, (name, _) in _LIMIT_KEYS.items()
                if f"max-{key}" in values
            }
        )
        policy = LimitPolicy(
            defaults=defaults, maximums=maximums, host=host or HostCapacity.probe()
        )
    except LimitOutOfRange as exc:
        key = LIMIT_KEY_OF[exc.name]
        if exc.what == "maximum":
            key = f"max-{key}"
        raise ConfigError(f"limits: {key} {exc.detail}") from None
    except InvalidJobSpec as exc:
        raise ConfigError(f"limits: {exc}") from None
    data_dir = values.get("data-dir")
    isolation = values.get("isolation", "auto")
    try:
        job_policy = JobPolicy(
            run_as=values.get("run-as", {}),
            network=values.get("network", "host"),
            allow_host_network=values.get("allow-host-network", True),
        )
    except ValueError as exc:
        raise ConfigError(f"network: {exc}") from None
    try:
        defaults = Retention()
        retention = Retention(
            keep_s=values.get("keep", defaults.keep_s),
            keep_jobs=values.get("keep-jobs", defaults.keep_jobs),
            output_budget_bytes=values.get("output-budget", defaults.output_budget_bytes),
        )
    except ValueError as exc:
        raise ConfigError(f"retention: {exc}") from None
    output_retention = values.get("output-retention", DEFAULT_RETENTION_BYTES)
    if output_retention < MIN_OUTPUT_RETENTION_BYTES:
        raise ConfigError(
            f"output-retention: at least {MIN_OUTPUT_RETENTION_BYTES // 1024}K, not"
            f" {output_retention} bytes"
        )
    if isolation == "off" and job_policy.needs_isolation:
        raise ConfigError(
            "run-as accounts and network none need isolation, which is off (isolation = off)"
        )
    transport = _transport(values, source)
    # The per-user caps default to half of the caps in all, as set: --max-jobs 10 gives 5.
    max_jobs = values.get("max-jobs", DEFAULT_MAX_JOBS)
    max_log_streams = values.get("max-log-streams", DEFAULT_MAX_LOG_STREAMS)
    return ServeSettings(
        listen=values.get("listen") or parse_address(DEFAULT_LISTEN),
        cert_file=Path(values.get("cert") or tls_dir / "server.crt"),
        key_file=Path(values.get("key") or tls_dir / "server.key"),
        ca_file=Path(values.get("ca") or tls_dir / "ca.crt"),
        data_dir=Path(data_dir) if data_dir else None,
        limits=policy,
        grace_period_s=values.get("grace-period", DEFAULT_GRACE_PERIOD_S),
        max_jobs=max_jobs,
        max_jobs_per_user=values.get("max-jobs-per-user") or per_user_share(max_jobs),
        max_log_streams=max_log_streams,
        max_log_streams_per_user=(
            values.get("max-log-streams-per-user") or per_user_share(max_log_streams)
        ),
        cgroups=values.get("cgroups", "auto"),
        isolation=isolation,
        transient_uids=values.get("transient-uids", DEFAULT_TRANSIENT_UIDS),
        policy=job_policy,
        retention=retention,
        transport=transport,
        output_retention_bytes=output_retention,
        audit=values.get("audit", False),
        metrics=values.get("metrics"),
        allowed=values.get("allow"),
        log_format=values.get("log-format", "text"),
        log_level=values.get("log-level", "info"),
    )


def _transport(values: Mapping[str, Any], source: str) -> ServerLimits:
    table = values.get("transport", {})
    fields: dict[str, Any] = {}
    for key, raw in table.items():
        if key in _TOP_LEVEL_TRANSPORT_KEYS:
            raise ConfigError(f"{source}: transport: {key} is set at the top level (it is a flag)")
        if key not in TRANSPORT_KEYS:
            close = difflib.get_close_matches(key.replace("_", "-"), _TABLE_TRANSPORT_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: transport: unknown key {key!r}{hint}")
        name, parser = TRANSPORT_KEYS[key]
        fields[name] = _parse_with(parser, raw, f"{source}: transport: {key}")
    for key in _TOP_LEVEL_TRANSPORT_KEYS:
        if key in values:
            fields[TRANSPORT_KEYS[key][0]] = values[key]
    try:
        return ServerLimits(**fields)
    except ValueError as exc:
        raise ConfigError(f"transport: {exc}") from None


def _parse(key: str, raw: Any, where: str) -> Any:
    return _parse_with(_KEYS[key], raw, where)


def _parse_with(parser: Callable[[Any], Any], raw: Any, where: str) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def default_data_dir(euid: int, environ: Mapping[str, str]) -> Path:
    """/var/lib/jobworker as root; else $XDG_STATE_HOME/jobworker (~/.local/state/jobworker)."""
    if euid == 0:
        return DEFAULT_DATA_DIR
    state = environ.get("XDG_STATE_HOME") or os.path.join(environ.get("HOME", "/"), ".local/state")
    return Path(state) / "jobworker"


# --- reloading (SIGHUP) -------------------------------------------------------------------------

# What each setting is called in the file, for the reload's log lines. The first group needs a
# restart: the listener and TLS context are built once, the data directory is locked and holds
# the store, cgroups and isolation are the Supervisor's from its start, and the transport's
# budgets are the admission it counts every open connection against.
_RESTART_ONLY = {
    "listen": "listen",
    "cert_file": "cert",
    "key_file": "key",
    "ca_file": "ca",
    "data_dir": "data-dir",
    "cgroups": "cgroups",
    "isolation": "isolation",
    "transient_uids": "transient-uids",
    "transport": "transport",
    # The observers are wired into the transport and the metrics listener bound at start.
    "audit": "audit",
    "metrics": "metrics",
}
_RELOADABLE = {
    "limits": "limits",
    "grace_period_s": "grace-period",
    "max_jobs": "max-jobs",
    "max_jobs_per_user": "max-jobs-per-user",
    "max_log_streams": "max-log-streams",
    "max_log_streams_per_user": "max-log-streams-per-user",
    "policy": "run-as/network",
    "retention": "retention",
    "output_retention_bytes": "output-retention",
    "allowed": "allow",
    "log_format": "log-format",
    "log_level": "log-level",
}


def changed_settings(
    old: ServeSettings, new: ServeSettings, *, restart_only: bool = False
) -> list[str]:
    """The names of what differs (only those that need a restart, if so asked)."""
    names = dict(_RESTART_ONLY) if restart_only else {**_RESTART_ONLY, **_RELOADABLE}
    changed = []
    for field, key in names.items():
        before, after = getattr(old, field), getattr(new, field)
        if field == "limits":
            for part, spelled in (("defaults", "defaults"), ("maximums", "maximums")):
                if getattr(before, part) != getattr(after, part):
                    changed.append(f"{spelled} ({_limits_diff(before, after, part)})")
        elif field == "transport" and before != after:
            changed += [
                key
                for key, (name, _) in TRANSPORT_KEYS.items()
                if getattr(before, name) != getattr(after, name)
            ]
        elif before != after:
            changed.append(key)
    return changed


def _limits_diff(before: LimitPolicy, after: LimitPolicy, part: str) -> str:
    old, new = getattr(before, part), getattr(after, part)
    prefix = "" if part == "defaults" else "max-"
    # An unset default is no limit (the IOPS); an unset maximum is what the host has.
    unset = "none" if part == "defaults" else "the host's"
    return " ".join(
        f"{prefix}{key}={show_limit(name, getattr(new, name), unset=unset)}"
        for key, (name, _) in _LIMIT_KEYS.items()
        if getattr(old, name) != getattr(new, name)
    )


def show_limit(name: str, value: float | None, *, unset: str = "none") -> str:
    """A limit as a config file spells it: a count as a number (cpu, pids, IOPS), a size or a
    rate in binary units; `unset` for None (no limit, or no maximum of the server's own)."""
    if value is None:
        return unset
    return f"{value:g}" if name in _COUNTED_LIMITS else format_bytes(int(value))


_COUNTED_LIMITS = frozenset({"cpu", "pids", "io_read_iops", "io_write_iops"})


def keep_restart_settings(old: ServeSettings, new: ServeSettings) -> ServeSettings:
    """`new` with what only a restart can change taken from `old`."""
    return dataclasses.replace(new, **{field: getattr(old, field) for field in _RESTART_ONLY})
