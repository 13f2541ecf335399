"""Durations, sizes, addresses and KEY=VALUE pairs as typed on command lines."""

from __future__ import annotations

import pytest

from jobworker.cli.parsing import (
    Address,
    format_duration,
    parse_address,
    parse_duration,
    parse_env,
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
