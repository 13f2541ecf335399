"""jobworker/_pb/ is what tools/gen_proto.py makes of schema/ today, and the check notices when
it is not."""

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
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    fresh.mkdir()
    gen_proto.generate(fresh)
    shutil.copytree(ROOT / "jobworker" / "_pb", stale, ignore=shutil.ignore_patterns("__pycache__"))
    assert gen_proto.differences(fresh, stale) == []  # a faithful copy is current

    edited = stale / "jobworker" / "v1" / "jobworker_pb2.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    (stale / "grpc" / "health" / "v1" / "health_pb2.pyi").unlink()
    (stale / "jobworker" / "v1" / "old_pb2.py").write_text("")
    assert gen_proto.differences(fresh, stale) == [
        "missing: grpc/health/v1/health_pb2.pyi",
        "not generated: jobworker/v1/old_pb2.py",
        "differs: jobworker/v1/jobworker_pb2.py",
    ]

    # and --check itself fails on that tree, saying how to fix it
    monkeypatch.setattr(gen_proto, "OUT", stale)
    monkeypatch.setattr(sys, "argv", ["gen_proto.py", "--check"])
    assert gen_proto.main() == 1
    assert "regenerate with" in capsys.readouterr().err
