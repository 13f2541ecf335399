"""Small helpers shared by the benchmark scripts in tools/ (not part of the package)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 2nd largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def own_children() -> list[int]:
    """Pids whose parent is this process (to check a benchmark left none behind)."""
    me, children = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                    for line in f:
                        if line.startswith("PPid:"):
                            if line.split()[1] == me:
                                children.append(int(entry))
                            break
            except OSError:
                pass
    return children


def rotated(items: Sequence, k: int) -> list:
    """`items` started at position k (mod its length): round k of an alternating run begins
    with a different peer each time, so no peer always runs first (or right after another)."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])
