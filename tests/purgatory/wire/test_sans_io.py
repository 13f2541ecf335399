"""The wire layer is sans-IO: it imports nothing that does I/O, keeps time, logs or runs
threads, and nothing of purgatory outside wire/ (TLS, the driver, the server).

Every import statement of every module is checked, wherever it stands (in a function, under
TYPE_CHECKING), relative ones resolved to the module they name. What is allowed is a short
list; anything else fails, so a new dependency is a decision made here, in the open.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jobworker.purgatory.wire as wire

PACKAGE = "jobworker.purgatory.wire"
# Pure computation only. Not logging either: the wire reports through events and exceptions,
# and the transport decides what is worth a log line (a peer must not be able to make us log).
ALLOWED_STDLIB = {
    "__future__",
    "base64",
    "binascii",
    "collections",
    "dataclasses",
    "enum",
    "fractions",
    "functools",
    "math",
    "re",
    "struct",
    "typing",
    "zlib",
}
ALLOWED_THIRD_PARTY = {"h2", "hpack", "hyperframe"}
# Named for clear failures; all are outside the lists above anyway.
FORBIDDEN = {
    "OpenSSL",
    "cryptography",
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "time",
    "threading",
    "multiprocessing",
    "subprocess",
    "logging",
    "os",
    "io",
    "sys",
}


def imported_modules(source: str, module: str) -> list[str]:
    """The absolute names of every module `source` (the text of `module`) imports."""
    package = module.rpartition(".")[0]  # for wire/__init__.py too: "wire.__init__"
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                if node.module:
                    names.append(".".join([*base, node.module]))
                else:  # from . import x: each x is a module or a name of the package
                    names += [".".join([*base, alias.name]) for alias in node.names]
            else:
                names.append(node.module)
    return names


def problem(name: str) -> str | None:
    top = name.split(".")[0]
    if top in FORBIDDEN:
        return "forbidden: I/O, clocks, threads or logging"
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return None
    if top == "jobworker":
        return "outside wire/: the wire may not depend on the rest of purgatory"
    if top in ALLOWED_STDLIB or top in ALLOWED_THIRD_PARTY:
        return None
    return "not on the allowed list"


def wire_sources() -> list[tuple[Path, str]]:
    root = Path(wire.__file__).parent
    return [(path, f"{PACKAGE}.{path.stem}") for path in sorted(root.glob("*.py"))]


def test_every_import_of_the_wire_is_allowed() -> None:
    sources = wire_sources()
    assert len(sources) > 5
    found = []
    for path, module in sources:
        for name in imported_modules(path.read_text(), module):
            why = problem(name)
            if why is not None:
                found.append(f"{path.name} imports {name}: {why}")
    assert found == []


@pytest.mark.parametrize(
    ("statement", "caught"),
    [
        ("import OpenSSL", True),
        ("from OpenSSL import SSL", True),
        ("from cryptography import x509", True),
        ("from ..tls import TLSStream", True),
        ("from .. import driver", True),
        ("from ...service import app", True),
        ("import logging", True),
        ("import os.path", True),
        ("import trio.lowlevel", True),
        ("def f():\n    import time", True),
        ("if TYPE_CHECKING:\n    import socket", True),
        ("import json", True),  # not forbidden, but not on the list either
        ("from . import events", False),
        ("from .fields import encode_block", False),
        ("from jobworker.purgatory.wire.errors import WireError", False),
        ("import h2.connection", False),
        ("from hyperframe.frame import Frame", False),
    ],
)
def test_the_check_catches_what_it_should(statement: str, caught: bool) -> None:
    names = imported_modules(statement, f"{PACKAGE}.core")
    assert any(problem(name) for name in names) is caught
