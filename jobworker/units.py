"""Byte sizes as people write them (``512M``, ``1GiB``) and as jobworker prints them.

Neutral ground: the supervisor's limits, the server's flags and jobctl all speak these units, and
this module imports nothing, so a client can use them without loading the server's modules.
"""

from __future__ import annotations

import re

__all__ = ["GiB", "KiB", "MiB", "TiB", "format_bytes", "parse_bytes"]

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_bytes(text: str) -> int:
    """Parse a size such as ``512M``, ``1GiB``, ``100m`` or ``4096`` (binary units, like docker).

    Raises ValueError with the offending text.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512K, 100M, 1G)")
    number, unit, _ = match.groups()
    value = float(number) * _SCALE[unit.lower()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_bytes(value: int) -> str:
    """The shortest exact binary-unit spelling: 1073741824 → ``1G``, 1536 → ``1.5K``."""
    for unit in ("T", "G", "M", "K"):
        scale = _SCALE[unit.lower()]
        if value >= scale and (value * 100) % scale == 0:
            # At most two decimals, and never an exponent (24731400K, not 2.47314e+07K).
            return f"{value / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(value)
