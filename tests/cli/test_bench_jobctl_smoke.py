"""tools/bench_jobctl.py keeps working: one tiny run, end to end.

The real figures take minutes and are read by people; this runs every figure once, on a 1 MB
history, so that a change to the server, jobctl or the launchers that breaks the bench (or the
stream it checks byte for byte) fails here. No timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_jobctl.py"


def test_a_tiny_bench_runs_every_figure_and_leaves_nothing() -> None:
    argv = [sys.executable, str(TOOL), "--runs", "1", "--warmup", "0", "--log-mb", "1"]
    argv += ["--log-runs", "1", "--log-warmup", "0", "--no-raw"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for row in (
        "| python -c pass |",
        "| grpcio client: GetJobStatus |",
        "| jobctl --version |",
        "| jobctl status ID |",
        "| jobctl list |",
        "| cat FILE, piped to cat > /dev/null |",
        "| grpcio client > /dev/null |",
        "| jobctl logs > /dev/null (tree) |",
    ):
        assert row in done.stdout, done.stdout
    assert "Hygiene: processes left: 0; temp dirs left: 0." in done.stdout
