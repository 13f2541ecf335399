"""The wire layer is sans-IO: no event loop, socket, clock or thread imports anywhere in it."""

from __future__ import annotations

import ast
from pathlib import Path

import jobworker.purgatory.wire as wire

FORBIDDEN = {
    "trio",
    "asyncio",
    "anyio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "time",
    "threading",
}


def test_no_io_or_clock_imports() -> None:
    sources = sorted(Path(wire.__file__).parent.glob("*.py"))
    assert len(sources) > 1
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
