"""Wacrm's rules for minting a key: what a name, a scope list and a lifetime may be."""

from __future__ import annotations

from collections.abc import Iterable

MAX_NAME = 80
MAX_DAYS = 365


class RuleError(ValueError):
    """Input that Wacrm would refuse when minting a key."""


def key_name(raw: str) -> str:
    """Return *raw* trimmed; refuse it when empty or longer than 80 characters."""
    name = raw.strip()
    if not name:
        raise RuleError("name is required")
    if len(name) > MAX_NAME:
        raise RuleError(f"name is longer than {MAX_NAME} characters")
    return name


def account_name(raw: str) -> str:
    """Return *raw* trimmed; refuse it when empty."""
    name = raw.strip()
    if not name:
        raise RuleError("account name is required")
    return name


def scopes(raw: Iterable[str], known: frozenset[str]) -> tuple[str, ...]:
    """Return *raw* without duplicates, in order; refuse any scope not in *known*."""
    out: list[str] = []
    for scope in raw:
        if scope not in known:
            raise RuleError(f"unknown scope {scope!r}; known: {', '.join(sorted(known))}")
        if scope not in out:
            out.append(scope)
    return tuple(out)


def lifetime_days(raw: int | None) -> int | None:
    """Return *raw* when it is a whole number of days from 1 to 365, or None for never."""
    if raw is None:
        return None
    if not 1 <= raw <= MAX_DAYS:
        raise RuleError(f"expires-in-days must be from 1 to {MAX_DAYS}")
    return raw
