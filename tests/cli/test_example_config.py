"""examples/jobworker.toml names every key the server knows, each set to its default (or, for
a default computed at startup, shown commented out with a value the loader accepts): so the
example cannot rot when a key is added or a default changes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from jobworker.cli.config import KEYS, TRANSPORT_KEYS, load_config_file, resolve
from jobworker.purgatory import ServerLimits
from jobworker.supervisor import HostCapacity

EXAMPLE = Path(__file__).parents[2] / "examples" / "jobworker.toml"
NO_FLAGS = dict.fromkeys(KEYS)
# A host at least as large as the example's commented maximums, so they resolve.
HOST = HostCapacity(cpus=64, memory_bytes=2**40, pids=4 * 2**20)
_COMMENTED = re.compile(r"^# ?([a-z][a-z0-9-]*) = (.+?)\s*(#.*)?$")
_TABLE = re.compile(r"^\[([a-z-]+)\]")


def sections() -> dict[str | None, tuple[set[str], dict[str, str]]]:
    """Per table (None: the top level): the keys set, and the commented-out ``key = value``s."""
    found: dict[str | None, tuple[set[str], dict[str, str]]] = {None: (set(), {})}
    table = None
    for line in EXAMPLE.read_text().splitlines():
        if match := _TABLE.match(line):
            table = match.group(1)
            found[table] = (set(), {})
        elif match := re.match(r"^([a-z][a-z0-9-]*)\s*=", line):
            found[table][0].add(match.group(1))
        elif match := _COMMENTED.match(line):
            found[table][1][match.group(1)] = match.group(2)
    return found


def test_the_example_resolves_to_exactly_the_defaults() -> None:
    table = load_config_file(EXAMPLE)  # the real loader: TOML, and every key known
    assert resolve(NO_FLAGS, table, host=HOST) == resolve(NO_FLAGS, {}, host=HOST)


def test_the_example_lists_every_key_the_loader_knows() -> None:
    found = sections()
    top_set, top_commented = found[None]
    transport_set, transport_commented = found["transport"]
    tables = {"run-as", "transport"}
    assert top_set | set(top_commented) | tables == set(KEYS)
    assert not top_set & set(top_commented)
    table_keys = {k for k in TRANSPORT_KEYS if k not in top_set | set(top_commented)}
    assert transport_set | set(transport_commented) == table_keys
    assert found["run-as"][0] == set()  # the default: nobody is mapped
    # Commented out are exactly the keys whose default is computed when the server starts
    # (from the host, the euid, or another key) or is "none" (no allow-list, no metrics
    # listener, no IOPS limit): any other is set, so its value is checked.
    computed = {"data-dir", "allow", "metrics", "max-jobs-per-user", "max-log-streams-per-user"}
    computed |= {f"max-{k}" for k in ("cpu", "memory", "io-read", "io-write", "pids")}
    computed |= {"io-read-iops", "io-write-iops", "max-io-read-iops", "max-io-write-iops"}
    unset = ServerLimits()
    computed_transport = {
        k for k, (name, _) in TRANSPORT_KEYS.items() if getattr(unset, name) is None
    }
    assert set(top_commented) == computed | (computed_transport & set(KEYS))
    assert set(transport_commented) == computed_transport - set(KEYS)


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        (table, key, value)
        for table, (_, commented) in sections().items()
        if table != "run-as"
        for key, value in commented.items()
    ],
)
def test_each_commented_example_value_is_accepted(table: str | None, key: str, value: str) -> None:
    parsed = tomllib.loads(f"{key} = {value}")
    if key.startswith("max-") and key.endswith("-iops"):  # as its comment says: with a default
        default = key.removeprefix("max-")
        parsed |= tomllib.loads(f"{default} = {sections()[table][1][default]}")
    config = parsed if table is None else {table: parsed}
    resolve(NO_FLAGS, config, host=HOST)  # raises ConfigError if the example misleads
