"""tools/bench_stdin.py keeps working: one tiny run, end to end.

The real figures take a minute and are read by people; this runs every peer once on a 1 MiB
input, so that a change to `jobctl run -i`, WriteJobInput or the job's stdin that breaks the
bench (or the byte count every run checks) fails here. No timing is asserted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_stdin.py"


def test_a_tiny_bench_runs_every_peer_counts_every_byte_and_leaves_nothing() -> None:
    argv = [sys.executable, str(TOOL), "--mib", "1", "--runs", "1", "--warmup", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for label in (
        "cat FILE, piped to wc -c (the floor)",
        "jobctl run -i wc -c < FILE",
        "grpcio client: StartJob + WriteJobInput + GetJobLogs",
    ):
        # a row of figures: wall, 1-byte wall, MB/s, net MB/s, CPUs, the two ratios
        row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", done.stdout, re.MULTILINE)
        assert row is not None, done.stdout
        assert len(row.group(1).split("|")) == 8, row.group(0)
    # each run's count is checked as it ends (a wrong one fails the bench); the report says so
    assert "Counts: every run's `wc -c` printed the input's size." in done.stdout
    assert "BENCH FAILED" not in done.stderr
    assert "Hygiene: processes left: 0; temp dirs left: 0." in done.stdout
