"""jobworker/v1/ and jobworker/_pb/ are what tools/gen_proto.py makes of schema/ today, and
the check notices when they are not."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gen_proto.py"


@pytest.fixture(scope="module")
def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_check_notices_a_stale_tree(
    gen_proto: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "fresh").mkdir()
    fresh = gen_proto.generate(tmp_path / "fresh")
    api, private = ROOT / "jobworker" / "v1", ROOT / "jobworker" / "_pb"
    stale = {out: tmp_path / "stale" / out.name for out in (api, private)}
    for out, copy in stale.items():
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("__pycache__"))
        assert gen_proto.differences(fresh[out], copy) == []  # a faithful copy is current

    edited = stale[api] / "jobworker_pb2.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    (stale[api] / "jobworker_pb2_grpc.py").unlink()
    (stale[private] / "grpc" / "health" / "v1" / "health_pb2.pyi").unlink()
    (stale[api] / "old_pb2.py").write_text("")
    assert gen_proto.differences(fresh[api], stale[api]) == [
        "missing: jobworker_pb2_grpc.py",
        "not generated: old_pb2.py",
        "differs: jobworker_pb2.py",
    ]
    assert gen_proto.differences(fresh[private], stale[private]) == [
        "missing: grpc/health/v1/health_pb2.pyi"
    ]

    # and --check itself fails on those trees, saying how to fix it
    trees = {stale[out]: source for out, source in gen_proto.TREES.items()}
    monkeypatch.setattr(gen_proto, "TREES", trees)
    monkeypatch.setattr(sys, "argv", ["gen_proto.py", "--check"])
    assert gen_proto.main() == 1
    err = capsys.readouterr().err
    assert f"out of date: {stale[api]}/: missing: jobworker_pb2_grpc.py" in err
    assert "regenerate with" in err


def test_the_api_imports_as_its_proto_package_says_beside_the_library() -> None:
    """What a user of the schema writes, in a fresh interpreter: the messages and the grpcio
    stubs under `jobworker.v1`, and the library still whole (a generated `jobworker/` folder of
    their own would have hidden it)."""
    code = (
        "from jobworker.v1 import jobworker_pb2, jobworker_pb2_grpc\n"
        "import jobworker\n"
        "assert jobworker_pb2.DESCRIPTOR.package == 'jobworker.v1'\n"
        "assert jobworker_pb2_grpc.JobServiceStub and jobworker.Supervisor\n"
        "print(sorted(jobworker_pb2.DESCRIPTOR.services_by_name))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['JobService']"


# --- buf: the schema's lint and evolution rules, which CI runs (tools/buf.sh) ---------------

BUF = next((ROOT / "tools" / ".cache").glob("buf-*/node_modules/.bin/buf"), None)
needs_buf = pytest.mark.skipif(BUF is None, reason="buf is not installed: bash tools/buf.sh")


def _schema_copy(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    copy = tmp_path / "schema"
    shutil.copytree(ROOT / "schema", copy)
    if edit is not None:
        proto = copy / "jobworker" / "v1" / "jobworker.proto"
        text = proto.read_text()
        assert edit[0] in text
        proto.write_text(text.replace(edit[0], edit[1], 1))
    return copy


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    assert BUF is not None
    return subprocess.run([str(BUF), *args], capture_output=True, text=True, timeout=120)


@needs_buf
@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("string name = 27;", "string label = 27;"), 'changed name from "name" to "label"'),
        (("  uint64 dropped = 5;\n", ""), 'Previously present field "5" with name "dropped"'),
        (("bool force = 2;", "bool force = 3;"), 'Previously present field "2" with name "force"'),
    ],
)
def test_buf_breaking_refuses_what_would_break_a_client(
    tmp_path: Path, edit: tuple[str, str], complaint: str
) -> None:
    """The rules CI checks the schema with catch a rename, a removal and a renumbering; an
    addition passes."""
    changed = _buf("breaking", str(_schema_copy(tmp_path, edit)), "--against", str(ROOT / "schema"))
    assert changed.returncode != 0 and complaint in changed.stdout, changed.stdout
    added = ("string name = 27;", "string name = 27;\n  string added = 99;")
    shutil.rmtree(tmp_path / "schema")
    grown = _buf("breaking", str(_schema_copy(tmp_path, added)), "--against", str(ROOT / "schema"))
    assert grown.returncode == 0, grown.stdout


@needs_buf
def test_buf_lint_passes_and_would_catch_a_bare_response(tmp_path: Path) -> None:
    assert _buf("lint", str(ROOT / "schema")).returncode == 0
    bare = (
        "returns (GetJobStatusResponse);",
        "returns (JobStatus);",
    )
    linted = _buf("lint", str(_schema_copy(tmp_path, bare)))
    assert linted.returncode != 0 and "GetJobStatusResponse" in linted.stdout, linted.stdout


def test_the_breaking_baseline_is_a_commit_of_this_history() -> None:
    baseline = next(
        line for line in (ROOT / "schema" / "BREAKING_BASELINE").read_text().splitlines()
        if not line.startswith("#")
    )  # fmt: skip
    result = subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", baseline, "HEAD"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, f"{baseline} is not an ancestor of HEAD: {result.stderr}"
