"""purgatory's names load on first use (a client must not pay for the server's modules), so its
three lists — the lazy table, ``__all__`` and the type checkers' imports — are kept in step by
hand. A name in one and not the others, or pointing at a module that lacks it, fails here."""

from __future__ import annotations

import importlib

import pytest

import jobworker.purgatory as purgatory


def test_every_exported_name_has_a_home_and_loads_from_it() -> None:
    assert set(purgatory.__all__) == set(purgatory._HOMES)
    for name, home in purgatory._HOMES.items():
        module = importlib.import_module(f"jobworker.purgatory.{home}")
        assert getattr(purgatory, name) is getattr(module, name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        purgatory.NoSuchThing  # noqa: B018
