"""Wacrm's PostgreSQL tables as a source, and the shipped NOTIFY trigger."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from loader.postgres import PostgresSource, parse_payload
from loader.rows import KeyRow
from loader.source import Changes, NewKey, NotFound, SourceUnavailable
from tests.loader.conftest import pg_account, pg_key


def test_payloads_name_rows_and_nothing_else() -> None:
    kid = str(uuid.uuid4())
    assert parse_payload(f"k {kid} {'a' * 64}") == Changes(key_hashes={"a" * 64}, key_ids={kid})
    both = parse_payload(f"k {kid} {'a' * 64} {'b' * 64}")
    assert both is not None and both.key_hashes == {"a" * 64, "b" * 64}
    assert parse_payload(f"k {kid} NOTAHASH") == Changes(key_ids={kid})
    assert parse_payload(f"a {kid}") == Changes(account_ids={kid})
    for junk in ("", "k", "k not-a-uuid " + "a" * 64, "x " + kid, f"a {kid} extra"):
        assert parse_payload(junk) is None


async def test_snapshot_reads_unrevoked_keys_in_batches(
    pg: asyncpg.Connection, pg_source: PostgresSource
) -> None:
    acct = await pg_account(pg, "Acme")
    for _ in range(5):
        await pg_key(pg, acct, ["contacts:read"], expires_sql="'2100-01-01T00:00:00.123456Z'")
    revoked_id, _, _ = await pg_key(pg, acct)
    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", revoked_id)
    chunks = [chunk async for chunk in pg_source.snapshot(2)]
    assert [len(c) for c in chunks] == [2, 2, 1]
    row = KeyRow(*chunks[0][0])  # the driver's rows come in KeyRow's field order
    assert row.account_id == acct and row.account_name == "Acme" and row.account_exists
    assert list(row.scopes) == ["contacts:read"] and not row.revoked
    assert row.expires_at_ms == 4102444800123


async def test_rows_reads_current_rows_by_hash_id_or_account(
    pg: asyncpg.Connection, pg_source: PostgresSource
) -> None:
    acct = await pg_account(pg)
    other = await pg_account(pg)
    k1, _, h1 = await pg_key(pg, acct)
    k2, _, _ = await pg_key(pg, acct)
    k3, _, h3 = await pg_key(pg, other)
    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", k2)
    by_hash = await pg_source.rows(Changes(key_hashes={h1, "f" * 64}))
    assert [r.key_id for r in by_hash] == [k1]
    by_account = await pg_source.rows(Changes(account_ids={acct}, key_ids={"junk"}))
    assert {r.key_id for r in by_account} == {k1, k2}
    assert {r.key_id: r.revoked for r in by_account}[k2]
    by_id = await pg_source.rows(Changes(key_ids={k3}))
    assert [r.key_hash for r in by_id] == [h3]


async def test_the_trigger_notifies_changes_the_gate_cares_about(
    pg: asyncpg.Connection, pg_source: PostgresSource
) -> None:
    async with pg_source.feed(0.05) as feed:
        acct = await pg_account(pg)
        key_id, _, key_hash = await pg_key(pg, acct)
        inserted = await feed.next(2)
        assert inserted.key_ids == {key_id} and inserted.key_hashes == {key_hash}

        await pg.execute(
            "UPDATE api_keys SET last_used_at = now(), name = 'x' WHERE id = $1", key_id
        )
        assert not await feed.next(0.3)

        for sql in (
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1",
            "UPDATE api_keys SET scopes = '{contacts:read}' WHERE id = $1",
            "UPDATE api_keys SET expires_at = now() WHERE id = $1",
        ):
            await pg.execute(sql, key_id)
            assert (await feed.next(2)).key_ids == {key_id}, sql

        await pg.execute("UPDATE accounts SET name = 'Renamed' WHERE id = $1", acct)
        assert (await feed.next(2)).account_ids == {acct}

        await pg.execute("DELETE FROM accounts WHERE id = $1", acct)
        deleted = await feed.next(2)
        assert deleted.account_ids == {acct} and deleted.key_hashes == {key_hash}


async def test_the_feed_fails_when_its_connection_dies(
    pg: asyncpg.Connection, pg_source: PostgresSource
) -> None:
    async with pg_source.feed(0.05) as feed:
        pid = feed.conn.get_server_pid()
        await pg.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(SourceUnavailable):
            for _ in range(20):
                await feed.next(0.2)


async def test_management(pg: asyncpg.Connection, pg_source: PostgresSource) -> None:
    acct = str(uuid.uuid4())
    await pg_source.create_account(acct, "Acme")
    key = NewKey(
        str(uuid.uuid4()), acct, "ci", "wacrm_live_abcdefgh", "a" * 64, ("messages:send",), None
    )
    await pg_source.create_key(key)
    with pytest.raises(NotFound):
        await pg_source.create_key(
            NewKey(str(uuid.uuid4()), str(uuid.uuid4()), "x", "p", "b" * 64, (), None)
        )
    with pytest.raises(NotFound):
        await pg_source.create_key(NewKey(str(uuid.uuid4()), "nope", "x", "p", "c" * 64, (), None))
    [listed] = await pg_source.list_keys(acct)
    assert (listed.id, listed.name, listed.scopes, listed.revoked_at) == (
        key.id,
        "ci",
        ("messages:send",),
        None,
    )
    assert await pg_source.list_keys(str(uuid.uuid4())) == []
    assert await pg_source.revoke_key(key.id) == "a" * 64
    with pytest.raises(NotFound):
        await pg_source.revoke_key(key.id)
    with pytest.raises(NotFound):
        await pg_source.revoke_key("not-a-uuid")
    [listed] = await pg_source.list_keys(None)
    assert listed.revoked_at is not None


async def test_an_unreachable_database_is_reported() -> None:
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        await PostgresSource.open("postgresql://postgres@127.0.0.1:1/none", connect_timeout=1)
