"""What both commands accept on their command lines and in config files: durations, sizes,
addresses, ``KEY=VALUE`` pairs. Pure functions; each raises ValueError with a message fit to
print after the option's name."""

from __future__ import annotations

import ipaddress
import math
import re
import signal
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from jobworker.units import parse_bytes

DEFAULT_PORT = 50051  # the seeds' address; `jobworker serve` and `jobctl` agree on it

__all__ = [
    "Address",
    "end_options_at_command",
    "format_duration",
    "parse_address",
    "parse_cpu",
    "parse_duration",
    "parse_env",
    "parse_signal",
    "parse_size",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``5s``, ``500ms``, ``1m``, ``1m30s``, ``2h``, ``7d`` or a bare number."""
    spelled = text.strip().lower()
    try:
        seconds = float(spelled)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"not a duration: {text!r} (examples: 5s, 500ms, 1m30s)")
        return seconds
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(spelled):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]
        position = match.end()
    if not spelled or position != len(spelled):
        raise ValueError(f"not a duration: {text!r} (examples: 5s, 500ms, 1m30s)")
    return total


def format_duration(seconds: float) -> str:
    """The short human spelling: 0.25 → ``250ms``, 2.5 → ``2.5s``, 95 → ``1m35s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{seconds:.0f}s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def parse_cpu(text: str | float) -> float:
    """Cores from ``0.5``, ``2`` or a percentage of one core: ``50%`` is 0.5, ``250%`` 2.5
    (top's and docker stats' spelling). Above zero and finite: nan and inf are refused here,
    since a comparison with nan is always false and would slip past every range check."""
    shown = text if isinstance(text, str) else f"{text:g}"
    spelled = text.strip() if isinstance(text, str) else text
    percent = isinstance(spelled, str) and spelled.endswith("%")
    try:
        value = float(spelled[:-1] if percent else spelled)  # type: ignore[index]
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"must be a positive number of cores or a percentage of one core, got {shown!r}"
            " (examples: 0.5, 2, 50%)"
        )
    return value / 100 if percent else value


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``1G``, ``100MiB`` or ``4096`` (binary units, like docker)."""
    return parse_bytes(text)


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen or connect. host None: every interface (listening only)."""

    host: str | None
    port: int

    def __str__(self) -> str:
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_address(text: str, *, default_port: int | None = None) -> Address:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` (every interface) or, with a default port,
    a bare ``HOST``."""
    spelled = text.strip()
    host: str | None
    if spelled.startswith("["):
        end = spelled.find("]")
        if end < 0:
            raise ValueError(f"not an address: {text!r} (missing ']')")
        host, rest = spelled[1:end], spelled[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"not an address: {text!r} ({host!r} is not an IPv6 address)"
            ) from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"not an address: {text!r} (expected ':PORT' after ']')")
        port_text = rest[1:] if rest else None
    elif spelled.count(":") > 1:
        raise ValueError(f"not an address: {text!r} (write an IPv6 address as [ADDRESS]:PORT)")
    elif ":" in spelled:
        host, port_text = spelled.split(":")
    else:
        host, port_text = spelled, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"not an address: {text!r} (expected HOST:PORT)")
        port = default_port
    else:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"not an address: {text!r} ({port_text!r} is not a port number)")
        port = int(port_text)
    if host is not None and any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"not an address: {text!r} (bad host {host!r})")
    return Address(host or None, port)


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs into a dict; the value may be empty or contain ``=``."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def parse_signal(text: str) -> int:
    """A signal number from ``TERM``, ``SIGTERM``, ``term``, ``15``, ``RTMIN+2`` (Linux's)."""
    spelled = text.strip().upper().removeprefix("SIG")
    if spelled.isdigit():
        number = int(spelled)
        if 1 <= number <= signal.SIGRTMAX:
            return number
        raise ValueError(f"no signal {number} (signals are 1 to {int(signal.SIGRTMAX)})")
    base, plus, offset = spelled.partition("+")
    if base in ("RTMIN", "RTMAX") and (not plus or offset.isdigit()):
        number = signal.SIGRTMIN + int(offset or 0) if base == "RTMIN" else signal.SIGRTMAX
        if number <= signal.SIGRTMAX:
            return int(number)
    elif spelled.isidentifier() and not spelled.startswith("_"):
        try:
            return int(signal.Signals[f"SIG{spelled}"])
        except KeyError:
            pass
    raise ValueError(f"not a signal: {text!r} (examples: TERM, SIGKILL, hup, 9)")


def end_options_at_command(
    argv: Sequence[str],
    *,
    commands: Collection[str],
    value_options: Collection[str],
) -> list[str]:
    """`argv` with ``--`` put before the job's command, so the job keeps its own flags.

    For one of `commands` (``start``, ``run``), jobctl's options end at the first positional
    argument, as docker's do: ``jobctl run echo train.py --cpu 2`` runs ``echo train.py --cpu
    2``. Options before the command name are skipped the same way. `value_options` are those
    that take the next token as their value (``--cpu 2``); ``--cpu=2`` is one token; any other
    option stands alone. An explicit ``--`` is left as it is. Other commands are untouched.
    """
    tokens = list(argv)
    command_seen = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            return tokens
        if token.startswith("-") and token != "-":
            i += 2 if token in value_options else 1
            continue
        if command_seen:
            return [*tokens[:i], "--", *tokens[i:]]
        if token not in commands:
            return tokens
        command_seen = True
        i += 1
    return tokens
