"""A SQLite file as a source: its schema, change log and PRAGMA data_version feed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from loader.source import Changes, NewKey, NotFound
from loader.sqlite import SqliteSource, format_time, parse_time
from tests.loader.conftest import sqlite_db


def test_times_round_trip() -> None:
    moment = datetime(2025, 1, 31, 12, 0, 0, 123000, tzinfo=UTC)
    assert format_time(moment) == "2025-01-31T12:00:00.123Z"
    assert parse_time("2025-01-31T12:00:00.123Z") == moment
    assert parse_time("2025-01-31 12:00:00.123") == moment
    assert parse_time(None) is None
    with pytest.raises(ValueError):
        parse_time("soon")


async def test_a_new_file_gets_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    source = await SqliteSource.open(path)
    await source.close()
    with sqlite_db(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = [r[1] for r in db.execute("PRAGMA table_info(api_keys)")]
    assert {"accounts", "api_keys", "wacrm_changes"} <= tables
    assert columns == [
        "id",
        "account_id",
        "created_by",
        "name",
        "key_prefix",
        "key_hash",
        "scopes",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "created_at",
    ]
    again = await SqliteSource.open(path)  # opening an existing file changes nothing
    await again.close()


async def test_management_and_rows(sqlite_source: SqliteSource) -> None:
    await sqlite_source.create_account("acct", "Acme")
    expires = datetime(2100, 1, 1, tzinfo=UTC)
    await sqlite_source.create_key(
        NewKey("k1", "acct", "ci", "wacrm_live_abcdefgh", "a" * 64, ("messages:send",), expires)
    )
    with pytest.raises(NotFound):
        await sqlite_source.create_key(NewKey("k2", "nobody", "x", "p", "b" * 64, (), None))
    [row] = await sqlite_source.rows(Changes(key_ids={"k1"}))
    assert row.key_hash == "a" * 64 and row.expires_at_ms == int(expires.timestamp() * 1000)
    assert list(row.scopes) == ["messages:send"] and row.account_name == "Acme"
    [listed] = await sqlite_source.list_keys("acct")
    assert listed.expires_at == expires and listed.scopes == ("messages:send",)
    assert await sqlite_source.revoke_key("k1") == "a" * 64
    with pytest.raises(NotFound):
        await sqlite_source.revoke_key("k1")
    assert [c async for c in sqlite_source.snapshot(10)] == []


async def test_the_feed_sees_commits_of_other_connections(sqlite_source: SqliteSource) -> None:
    await sqlite_source.create_account("acct", "Acme")
    async with sqlite_source.feed(0.02) as feed:
        assert not await feed.next(0.1)
        with sqlite_db(sqlite_source.path) as db:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute(
                "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash)"
                " VALUES ('k1', 'acct', 'n', 'p', ?)",
                ("a" * 64,),
            )
        inserted = await feed.next(1)
        assert inserted.key_ids == {"k1"} and inserted.key_hashes == {"a" * 64}
        with sqlite_db(sqlite_source.path) as db:
            db.execute("UPDATE api_keys SET last_used_at = 'now' WHERE id = 'k1'")
        assert not await feed.next(0.2)
        with sqlite_db(sqlite_source.path) as db:
            db.execute("UPDATE api_keys SET revoked_at = 'now' WHERE id = 'k1'")
        assert (await feed.next(1)).key_ids == {"k1"}
        with sqlite_db(sqlite_source.path) as db:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("DELETE FROM accounts WHERE id = 'acct'")
        deleted = await feed.next(1)
        assert deleted.account_ids == {"acct"} and deleted.key_hashes == {"a" * 64}
        assert not deleted.lost


async def test_a_pruned_change_log_asks_for_a_full_reconcile(sqlite_source: SqliteSource) -> None:
    await sqlite_source.create_account("acct", "Acme")
    async with sqlite_source.feed(0.02) as feed:
        with sqlite_db(sqlite_source.path) as db:
            db.execute("INSERT INTO wacrm_changes (account_id) VALUES ('x')")
            db.execute("INSERT INTO wacrm_changes (account_id) VALUES ('y')")
            db.execute("DELETE FROM wacrm_changes WHERE account_id = 'x'")
        changes = await feed.next(1)
        assert changes.lost and changes.account_ids == {"y"}
