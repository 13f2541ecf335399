"""Durations, sizes, addresses, KEY=VALUE pairs and signals as typed on command lines, and
where jobctl's own options end."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.cli.parsing import (
    Address,
    end_options_at_command,
    format_duration,
    parse_address,
    parse_cpu,
    parse_duration,
    parse_env,
    parse_signal,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1h0m5s", 3605.0),
        ("0", 0.0),
        ("2.5", 2.5),
        (".5s", 0.5),
        (" 10S ", 10.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "5 s", "1s5", "nan", "inf", "5sm", "m5"])
def test_bad_durations_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (2.5, "2.5s"), (12.4, "12s"), (95, "1m35s"), (3600 * 2 + 60, "2h01m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_sizes_are_binary_like_the_supervisors() -> None:
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1G") == 2**30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:50051", Address("127.0.0.1", 50051)),
        (":0", Address(None, 0)),
        ("localhost", Address("localhost", 7)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::1]", Address("::1", 7)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
    ],
)
def test_addresses(text: str, address: Address) -> None:
    assert parse_address(text, default_port=7) == address


@pytest.mark.parametrize("text", ["host:99999", "host:port", "::1:80", "[::1", "[nope]:1", "a b:1"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="not an address"):
        parse_address(text, default_port=7)


def test_an_address_needs_a_port_without_a_default() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address("localhost")


def test_address_spelling() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(Address(None, 80)) == ":80"


def test_env_pairs() -> None:
    assert parse_env(["A=1", "B=", "C=x=y"]) == {"A": "1", "B": "", "C": "x=y"}
    for bad in ("A", "=1"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_env([bad])


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [("TERM", 15), ("SIGTERM", 15), ("term", 15), ("sigkill", 9), ("9", 9), (" hup ", 1),
     ("USR1", 10), ("RTMIN", 34), ("rtmin+2", 36), ("RTMAX", 64), ("64", 64), ("IOT", 6)],
)  # fmt: skip
def test_signals_by_name_or_number(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize(
    "text", ["", "0", "65", "-9", "FOO", "SIG", "SIGSIGTERM", "RTMIN+31", "RTMIN+x", "9.0", "_x"]
)
def test_bad_signals_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="signal"):
        parse_signal(text)


# --- where jobctl's options end --------------------------------------------------------------

VALUE_OPTIONS = frozenset({"--cpu", "--server", "-e"})


def _split(*argv: str) -> list[str]:
    return end_options_at_command(argv, commands=("start", "run"), value_options=VALUE_OPTIONS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # docker's rule: the first positional after the command name is the job's command
        (["run", "echo", "x", "--cpu", "2"], ["run", "--", "echo", "x", "--cpu", "2"]),
        (["run", "--cpu", "2", "echo", "-l"], ["run", "--cpu", "2", "--", "echo", "-l"]),
        (["run", "--cpu=2", "echo"], ["run", "--cpu=2", "--", "echo"]),
        (["run", "-e", "A=1", "env"], ["run", "-e", "A=1", "--", "env"]),
        # a value that looks like a command name or an option is still the option's value
        (["--server", "run", "start", "x"], ["--server", "run", "start", "--", "x"]),
        (["run", "--cpu", "-1", "x"], ["run", "--cpu", "-1", "--", "x"]),
        # an explicit -- stays the only one
        (["run", "--", "echo", "--cpu"], ["run", "--", "echo", "--cpu"]),
        (["run", "--cpu", "1", "--", "ls"], ["run", "--cpu", "1", "--", "ls"]),
        # nothing to do: no command yet, help, other commands
        (["run"], ["run"]),
        (["run", "--help"], ["run", "--help"]),
        (["status", "x", "--json"], ["status", "x", "--json"]),
        (["list"], ["list"]),
        ([], []),
        (["--version"], ["--version"]),
        (["run", "-", "x"], ["run", "--", "-", "x"]),
    ],
)
def test_options_end_at_the_jobs_command(argv: list[str], expected: list[str]) -> None:
    assert _split(*argv) == expected


@given(st.lists(st.sampled_from(["run", "status", "--cpu", "--x", "-e", "--", "a", "b", "-"])))
def test_only_a_delimiter_is_ever_added(argv: list[str]) -> None:
    out = _split(*argv)
    if out != argv:
        i = out.index("--")
        assert out[:i] + out[i + 1 :] == argv  # one "--" inserted, nothing else touched
        assert "--" not in argv[:i]  # and never after one the user gave


def test_the_value_options_are_those_cyclopts_reads_as_taking_a_value() -> None:
    # START_VALUE_OPTIONS is written out (the command line is split before cyclopts runs);
    # this keeps it in step with the options start and run really have.
    from jobworker.cli.client import Connection
    from jobworker.cli.jobctl import START_VALUE_OPTIONS, app

    takes_value: set[str] = set()
    for command in ("start", "run"):
        for argument in app[command].assemble_argument_collection():
            names = [n for n in argument.names if n.startswith("-")]
            if names and argument.hint is not bool and argument.token_count()[0] >= 1:
                takes_value.update(names)
    connection = {f"--{field}" for field in Connection.__dataclass_fields__}
    assert takes_value | connection == START_VALUE_OPTIONS


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0.5", 0.5), ("2", 2.0), (" 1.5 ", 1.5), ("50%", 0.5), ("250%", 2.5), ("1%", 0.01),
     ("12.5%", 0.125), (0.25, 0.25)],
)  # fmt: skip
def test_cpu_in_cores_or_a_percentage_of_one_core(text: str | float, cores: float) -> None:
    assert parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize(
    "text", ["0", "0%", "-1", "-50%", "nan", "nan%", "inf", "inf%", "", "%", "half", "50%%", "5 0"]
)
def test_cpu_that_is_no_positive_amount_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cpu(text)
    assert str(caught.value) == (
        f"must be a positive number of cores or a percentage of one core, got {text!r}"
        " (examples: 0.5, 2, 50%)"
    )
