"""Wacrm's rules for minting a key (pure)."""

from __future__ import annotations

import pytest

from loader import rules

KNOWN = frozenset({"messages:send", "contacts:read"})


def test_names_are_trimmed_and_at_most_80_characters() -> None:
    assert rules.key_name("  CI key  ") == "CI key"
    assert rules.key_name(" " + "x" * 80 + " ") == "x" * 80
    with pytest.raises(rules.RuleError, match="longer than 80"):
        rules.key_name("x" * 81)
    with pytest.raises(rules.RuleError, match="required"):
        rules.key_name("   ")


def test_scopes_must_be_known_and_duplicates_are_dropped() -> None:
    assert rules.scopes(["contacts:read", "messages:send", "contacts:read"], KNOWN) == (
        "contacts:read",
        "messages:send",
    )
    assert rules.scopes([], KNOWN) == ()
    with pytest.raises(rules.RuleError, match="unknown scope 'admin'"):
        rules.scopes(["admin"], KNOWN)


def test_lifetime_is_whole_days_up_to_365() -> None:
    assert rules.lifetime_days(None) is None
    assert rules.lifetime_days(1) == 1
    assert rules.lifetime_days(365) == 365
    for bad in (0, -1, 366):
        with pytest.raises(rules.RuleError, match="1 to 365"):
            rules.lifetime_days(bad)


def test_account_names_are_required() -> None:
    assert rules.account_name(" Acme ") == "Acme"
    with pytest.raises(rules.RuleError):
        rules.account_name("")
