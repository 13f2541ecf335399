"""The fuzzer (tools/fuzz_purgatory.py) keeps working: a few hundred deterministic inputs.

Its long runs are by hand; this only checks that its seeds are still clean client streams for
the current wire, that its engine runs and replays the same inputs for the same seed, and that
its invariants do catch a connection that breaks them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[3] / "tools" / "fuzz_purgatory.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_purgatory", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_purgatory"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        module.load_wire()
        yield module
    finally:
        sys.modules.pop("fuzz_purgatory", None)
        if tracemalloc.is_tracing():
            tracemalloc.stop()


@pytest.fixture
def small_corpus(fuzz, tmp_path):
    """The seeds small enough for a quick run (the large-message ones take seconds each)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in sorted(fuzz.DEFAULT_CORPUS.glob("*.bin")):
        if seed.stat().st_size <= 16 * 2**10:
            shutil.copy(seed, corpus)
    return corpus


def test_every_seed_is_a_clean_client_stream(fuzz):
    """Real grpcio and purgatory client streams, read in every way the harness knows, break
    no invariant: else every mutant would inherit a finding that says nothing."""
    harness = fuzz.Harness(measure_memory=False)
    seeds = fuzz.load_corpus(fuzz.DEFAULT_CORPUS)
    assert {p.name.split("-")[0] for p in fuzz.DEFAULT_CORPUS.glob("*.bin")} == {
        "grpcio",
        "purgatory",
    }
    for data in seeds:
        result = harness.run(data)
        assert result.findings == [], (fuzz.describe(data[4:]), result.findings)
        if not fuzz.Control.parse(data[:4]).small_limits:  # else a window may be overrun
            assert "ev:RequestReceived" in result.features, fuzz.describe(data[4:])


def _run(fuzz, corpus: Path, crashes: Path, inputs: int):
    args = fuzz.parse_args(["--seed", "7", "--max-len", str(16 * 2**10), "--no-memory"])
    stats = fuzz.Stats()
    fuzz.fuzz_builtin(3600, 7, corpus, fuzz.Recorder(crashes, stats), args, max_inputs=inputs)
    return stats


def test_the_engine_is_deterministic_and_its_findings_replay(fuzz, small_corpus, tmp_path):
    first = _run(fuzz, small_corpus, tmp_path / "first", 200)
    second = _run(fuzz, small_corpus, tmp_path / "second", 200)
    assert first.inputs == second.inputs == 200
    assert first.input_bytes == second.input_bytes
    assert first.distinct == second.distinct
    assert first.corpus > len(list(small_corpus.glob("*.bin")))  # new behaviour was kept
    saved = sorted(p.name for p in (tmp_path / "first").glob("*.bin"))
    assert saved == sorted(p.name for p in (tmp_path / "second").glob("*.bin"))
    harness = fuzz.Harness(measure_memory=False)
    for path in (tmp_path / "first").glob("*.bin"):
        if path.name.startswith("slow-"):
            continue
        kind = path.name.rsplit("-", 2)[0]
        notes = path.with_suffix(".txt").read_text()
        assert "--replay" in notes
        assert kind in {f.kind for f in harness.run(path.read_bytes()).findings}


def test_the_invariants_catch_a_connection_that_breaks_them(fuzz, monkeypatch):
    """A connection that raises something undeclared, or breaks without a GOAWAY, is caught."""
    real = fuzz.wire["ServerConnection"]
    broken = fuzz.wire["ConnectionBroken"]

    class Raising(real):
        def receive_data(self, data):
            if b"\xde\xad" in data:
                raise KeyError("planted")
            return super().receive_data(data)

    class Silent(real):
        def receive_data(self, data):
            if b"\xde\xad" in data:
                self.data_to_send()  # whatever was queued goes, and no GOAWAY follows
                raise broken("planted")
            return super().receive_data(data)

    seed = (fuzz.DEFAULT_CORPUS / "purgatory-unary.bin").read_bytes()
    data = bytes(4) + seed + b"\xde\xad"
    harness = fuzz.Harness(measure_memory=False)
    assert harness.run(bytes(4) + seed).findings == []
    for cls, kind in ((Raising, "exception"), (Silent, "no-goaway")):
        monkeypatch.setitem(fuzz.wire, "ServerConnection", cls)
        findings = harness.run(data).findings
        assert [f.kind for f in findings] == [kind], findings
        assert "planted" in findings[0].detail
