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


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    # The console script as pip writes it, in a fresh interpreter.
    code = (
        "import json, sys\n"
        "from jobworker.cli.launch import jobctl\n"
        "code = jobctl()\n"
        "print(json.dumps(sorted(sys.modules)))\n"  # only reached when jobctl returned
        "sys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_version_is_answered_without_loading_the_app() -> None:
    import jobworker

    done = launch("--version")
    version, modules = done.stdout.splitlines()
    assert (done.returncode, version) == (0, jobworker.__version__)
    loaded = json.loads(modules)
    assert not [m for m in loaded if m.split(".")[0] in ("trio", "cyclopts", "OpenSSL", "google")]


def test_a_command_leaves_at_once_with_its_output_and_exit_code() -> None:
    # Leaving through os._exit skips the interpreter's final flush: what the command wrote must
    # have been flushed before, all of it (help is long enough to fill a pipe's buffer), the
    # same as when the interpreter exits as usual.
    done = launch("--help")
    usual = subprocess.run(
        [sys.executable, "-c", "from jobworker.cli.jobctl import main; main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == usual.returncode == 0, done.stderr
    assert "Usage: jobctl" in done.stdout
    assert done.stdout == usual.stdout  # and not followed by the module list: it left

    done = launch("status")  # a usage error: its one line, and exit code 2
    assert done.returncode == 2
    assert done.stderr.startswith("jobctl: ") and done.stdout == ""
