"""jobctl is a client: importing it must not load the server's modules (the service, the
transport's server side, the supervisor and its cgroups). Each import runs in a fresh
interpreter, so whatever this test process has loaded cannot hide a leak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVER_SIDE = (
    "jobworker.service",
    "jobworker.supervisor",
    "jobworker.purgatory.server",
    "jobworker.purgatory.limits",
)


def modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def server_modules(modules: list[str]) -> list[str]:
    return [
        name for name in modules if name.startswith(SERVER_SIDE) or name.split(".")[-1] == "cgroups"
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "import jobworker.cli.jobctl",
        "from jobworker.cli.jobctl import main",
        "import jobworker.cli.client, jobworker.cli.formatting, jobworker.cli.parsing",
    ],
)
def test_jobctl_loads_no_server_module(statement: str) -> None:
    modules = modules_after(statement)
    assert "jobworker.cli.client" in modules  # the import did happen
    assert server_modules(modules) == []


def test_the_package_names_still_reach_the_supervisor_and_the_server_on_use() -> None:
    # Lazy, not gone: `jobworker.Supervisor` and `purgatory.Server` load their modules when
    # first named, and `from jobworker import *` still gives the supervisor's API.
    modules = modules_after(
        "import jobworker, jobworker.purgatory as p\n"
        "assert jobworker.Supervisor.__module__ == 'jobworker.supervisor.supervisor'\n"
        "assert p.Server.__module__ == 'jobworker.purgatory.server'\n"
        "assert all(getattr(p, name) is not None for name in p.__all__)\n"
        "names = {}\n"
        "exec('from jobworker import *', names)\n"
        "assert 'Supervisor' in names and 'parse_bytes' in names"
    )
    assert "jobworker.supervisor.supervisor" in modules
    assert "jobworker.purgatory.server" in modules


def test_units_and_api_helpers_keep_their_old_homes() -> None:
    from jobworker import api, units
    from jobworker.service import convert
    from jobworker.supervisor import format_bytes, limits, parse_bytes

    assert (parse_bytes, format_bytes) == (units.parse_bytes, units.format_bytes)
    assert limits.MiB == units.MiB
    assert convert.duration_to_proto is api.duration_to_proto
    assert convert.timestamp_to_proto is api.timestamp_to_proto
    assert convert.timestamp_from_proto is api.timestamp_from_proto
