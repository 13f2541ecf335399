"""Small helpers shared by the benchmark scripts in tools/ (not part of the package)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


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


def run_and_report(
    prefix: str,
    run: Callable[[Path], list[str]],
    header: Callable[[], list[str]],
    errors: tuple[type[BaseException], ...],
) -> int:
    """Run a bench in a temporary directory of its own and print its report: `header()`, the
    lines `run` returned, the load before and after, the time taken, and whether it left a
    process or a file behind. 1 if it failed (one of `errors`, or Ctrl-C) or left anything."""
    load_start, started = loadavg(), time.monotonic()
    failed, lines = False, []
    tmp_dir = tempfile.mkdtemp(prefix=prefix)
    try:
        lines = run(Path(tmp_dir))
    except errors as exc:
        failed = True
        print(f"BENCH FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted", file=sys.stderr)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    children = own_children()
    for pid in children:  # never expected: a bench stops what it started on every path
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    print("\n".join(header()))
    print()
    print("\n".join(lines))
    print(
        f"Load average: {load_start} at start, {loadavg()} at end."
        f" Took {time.monotonic() - started:.0f} s."
    )
    left = os.path.exists(tmp_dir)
    print(
        f"Hygiene: processes left: {len(children)}"
        + (f" {children} (killed)" if children else "")
        + f"; temp dirs left: {int(left)}."
    )
    return 1 if failed or children or left else 0
