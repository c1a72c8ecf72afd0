"""Rows of the key table, and the pure rules that turn one into the gate's record."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from loader.limits import NO_LIMITS, Limits
from sidecar.records import Fields, KeyRecord

_HEX = "0123456789abcdef"
#: Longest account name put in a record; longer names are cut (Wacrm's own names are short).
MAX_ACCOUNT_NAME = 200


class KeyRow(NamedTuple):
    """One ``api_keys`` row joined to its account, as either source reads it.

    A named tuple rather than a dataclass: a sync builds a million of them.
    """

    key_id: str
    account_id: str
    #: The account's name; None when the name is NULL or the account is missing.
    account_name: str | None
    account_exists: bool
    key_prefix: str
    key_hash: str
    scopes: Sequence[str | None]
    expires_at_ms: int | None
    revoked: bool
    #: Why the source could not read the row properly; such a row is skipped.
    problem: str | None = None


#: What to do with a row: the record to hold (None = hold nothing) and any complaints.
Judgement = tuple[KeyRecord | None, tuple[str, ...]]
FieldsJudgement = tuple[Fields | None, tuple[str, ...]]
_NOTHING: FieldsJudgement = (None, ())


def is_valid_hash(key_hash: str) -> bool:
    """Tell whether *key_hash* is a lowercase hex SHA-256, the only form the gate looks up."""
    # strip() removes hex digits from both ends, so any other character is left over.
    return len(key_hash) == 64 and not key_hash.strip(_HEX)


@dataclass(frozen=True, slots=True)
class KeyRules:
    """What the deployment allows keys: the known *scopes*, and rate *limits* by key."""

    scopes: frozenset[str]
    limits: Limits = NO_LIMITS


def judge(row: KeyRow, rules: KeyRules, now_ms: int) -> Judgement:
    """Decide what Redis must hold for *row* at *now_ms*, under *rules* (see `judge_fields`)."""
    fields, problems = judge_fields(row, rules, now_ms)
    return (None if fields is None else KeyRecord(*fields)), problems


def judge_fields(row: KeyRow, rules: KeyRules, now_ms: int) -> FieldsJudgement:
    """Decide what Redis must hold for *row* at *now_ms*, under *rules*, as plain fields.

    *row* may be any sequence in `KeyRow`'s field order (a database driver's row); this runs
    once per key in a full reconcile, so it avoids every avoidable allocation.

    Revoked and expired keys hold nothing.  A malformed hash or a missing account holds
    nothing and is a problem; unknown scopes and odd account names are dropped or cleaned,
    and reported, but the key is still loaded.
    """
    (
        key_id,
        account_id,
        name,
        account_exists,
        key_prefix,
        key_hash,
        raw_scopes,
        expires,
        revoked,
        problem,
    ) = row
    if revoked or (expires is not None and expires <= now_ms):
        return _NOTHING
    if problem is not None:
        return None, (f"{problem}, key skipped",)
    if len(key_hash) != 64 or key_hash.strip(_HEX):
        return None, ("malformed key_hash, key skipped",)
    if not account_exists:
        return None, (f"account {account_id} does not exist, key skipped",)
    scopes, problems = _scopes(tuple(raw_scopes), rules.scopes)
    if name is not None and (len(name) > MAX_ACCOUNT_NAME or not name.isprintable()):
        cleaned = clean_text(name)[:MAX_ACCOUNT_NAME]
        if cleaned != name:
            problems += ("account name has control characters or is too long; cleaned",)
            name = cleaned
    if not key_prefix.isprintable():
        key_prefix = clean_text(key_prefix)
    limit = rules.limits.of(account_id, key_id)
    return (key_id, account_id, name, key_prefix, scopes, expires, limit), problems


def clean_text(text: str) -> str:
    """Return *text* without control, format, private-use or line-separator characters."""
    if text.isprintable():
        return text
    return "".join(c for c in text if _printable(c))


@lru_cache(maxsize=4096)
def _scopes(
    raw: tuple[str | None, ...], known: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the known scopes of *raw* without duplicates, and what was dropped and why."""
    out: list[str] = []
    problems: list[str] = []
    for scope in raw:
        if scope is None:
            problems.append("NULL or unreadable scope dropped")
        elif scope not in known:
            problems.append(f"unknown scope {scope!r} dropped")
        elif scope not in out:
            out.append(scope)
    return tuple(out), tuple(problems)


def _printable(c: str) -> bool:
    category = unicodedata.category(c)
    return category[0] != "C" and category not in ("Zl", "Zp")
