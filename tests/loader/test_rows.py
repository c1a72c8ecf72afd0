"""Turning a row of the key table into the gate's record (pure)."""

from __future__ import annotations

from loader.limits import Limits
from loader.rows import MAX_ACCOUNT_NAME, KeyRow, KeyRules, clean_text, is_valid_hash, judge
from sidecar.records import KeyRecord, RateLimit

KNOWN = KeyRules(frozenset({"messages:send", "contacts:read"}))
HASH = "a" * 64


def row(**kw: object) -> KeyRow:
    values: dict[str, object] = {
        "key_id": "k1",
        "account_id": "a1",
        "account_name": "Acme Inc",
        "account_exists": True,
        "key_prefix": "wacrm_live_abcdefgh",
        "key_hash": HASH,
        "scopes": ("messages:send",),
        "expires_at_ms": None,
        "revoked": False,
    }
    values.update(kw)
    return KeyRow(**values)  # type: ignore[arg-type]


def test_an_active_row_becomes_its_record() -> None:
    record, problems = judge(row(expires_at_ms=5000), KNOWN, 1000)
    assert record == KeyRecord(
        "k1", "a1", "Acme Inc", "wacrm_live_abcdefgh", ("messages:send",), 5000
    )
    assert problems == ()


def test_revoked_and_expired_rows_hold_nothing_silently() -> None:
    assert judge(row(revoked=True), KNOWN, 1000) == (None, ())
    assert judge(row(expires_at_ms=1000), KNOWN, 1000) == (None, ())
    assert judge(row(expires_at_ms=999), KNOWN, 1000) == (None, ())


def test_a_malformed_hash_is_skipped_with_a_problem() -> None:
    for bad in ("A" * 64, "a" * 63, "g" * 64, "", "a" * 65):
        record, problems = judge(row(key_hash=bad), KNOWN, 0)
        assert record is None
        assert problems == ("malformed key_hash, key skipped",)


def test_a_missing_account_is_skipped_with_a_problem() -> None:
    record, problems = judge(row(account_exists=False, account_name=None), KNOWN, 0)
    assert record is None
    assert "account a1 does not exist" in problems[0]


def test_unknown_and_null_scopes_are_dropped_and_the_key_still_loads() -> None:
    record, problems = judge(row(scopes=("messages:send", "admin:all", None)), KNOWN, 0)
    assert record is not None and record.scopes == ("messages:send",)
    assert any("'admin:all'" in p for p in problems)
    assert any("NULL" in p for p in problems)


def test_duplicate_scopes_are_dropped_in_order() -> None:
    record, _ = judge(row(scopes=("contacts:read", "messages:send", "contacts:read")), KNOWN, 0)
    assert record is not None and record.scopes == ("contacts:read", "messages:send")


def test_odd_account_names_are_cleaned_and_reported() -> None:
    record, problems = judge(row(account_name="Acme\x00\n\u202eInc\x7f"), KNOWN, 0)
    assert record is not None and record.account_name == "AcmeInc"
    assert problems and "cleaned" in problems[0]
    record, problems = judge(row(account_name="x" * 500), KNOWN, 0)
    assert record is not None and record.account_name == "x" * MAX_ACCOUNT_NAME
    record, problems = judge(row(account_name="Ünïcødé 名前 ok"), KNOWN, 0)
    assert record is not None and record.account_name == "Ünïcødé 名前 ok" and problems == ()


def test_a_null_account_name_stays_null() -> None:
    record, _ = judge(row(account_name=None), KNOWN, 0)
    assert record is not None and record.account_name is None


def test_a_row_the_source_could_not_read_is_skipped() -> None:
    record, problems = judge(row(problem="unreadable expires_at 'soon'"), KNOWN, 0)
    assert record is None and "unreadable expires_at" in problems[0]


def test_is_valid_hash_and_clean_text() -> None:
    assert is_valid_hash("0123456789abcdef" * 4)
    assert not is_valid_hash("0123456789ABCDEF" * 4)
    assert clean_text("plain text") == "plain text"
    assert clean_text("tab\there") == "tabhere"


def test_rate_limit_overrides_go_into_the_record_key_before_account() -> None:
    limits = Limits(keys={"k1": RateLimit(5, 1000)}, accounts={"a1": RateLimit(600, 60_000)})
    rules = KeyRules(KNOWN.scopes, limits)
    record, _ = judge(row(), rules, 0)
    assert record is not None and record.rate_limit == RateLimit(5, 1000)
    record, _ = judge(row(key_id="k2"), rules, 0)
    assert record is not None and record.rate_limit == RateLimit(600, 60_000)
    record, _ = judge(row(key_id="k2", account_id="a2"), rules, 0)
    assert record is not None and record.rate_limit is None
