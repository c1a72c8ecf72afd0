"""Wacrm's PostgreSQL tables as a source, and the shipped NOTIFY trigger."""

from __future__ import annotations

import time
import uuid

import asyncpg
import orjson
import pytest

from loader.limits import Limits
from loader.postgres import PostgresSource, parse_payload
from loader.rows import MAX_ACCOUNT_NAME, KeyRow, KeyRules, clean_text, judge
from loader.source import Changes, NewKey, NotFound, SourceUnavailable
from sidecar import records
from sidecar.records import UNLIMITED, RateLimit
from tests.loader.conftest import KNOWN, pg_account, pg_key


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
    assert row.expires_at_ms == 4102444800124  # rounded up: a key never expires early


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


#: Account names the SQL must quote exactly as orjson does, or never as the loader writes them.
TRICKY_NAMES = [
    "Acme Inc",
    'Quote " and \\ backslash',
    "Ünïcödé 名前 🚀 emoji",
    "tab\there",
    "nul-free \x01\x1f\x7f controls",
    "line\u2028separator",
    "soft\u00adhyphen and no\u00a0break",
    "/slash/ <tags> & 'single'",
    "x" * 250,
    "",
]
#: Scope lists of the table as Wacrm may hold them: empty, repeated, unknown, NULL.
SCOPE_LISTS: list[list[str | None]] = [
    [],
    ["messages:send"],
    ["contacts:read", "contacts:write", "contacts:read"],
    ["messages:send", "admin:everything"],
    ["messages:send", None],
]


async def test_bodies_are_encode_s_bytes_or_bytes_the_loader_never_writes(
    pg: asyncpg.Connection, pg_source: PostgresSource
) -> None:
    """For every row, SQL's body equals encode()'s, or cannot equal any record Python wrote."""
    keys = {"k-own": RateLimit(7, 60_000)}
    limited_key = str(uuid.uuid4())
    keys[limited_key] = RateLimit(5, 1000)
    accounts: dict[str, RateLimit] = {}
    for i, name in enumerate(TRICKY_NAMES):
        acct = await pg_account(pg, name)
        if i % 3 == 0:
            accounts[acct] = UNLIMITED if i % 2 else RateLimit(100, 3_600_000)
        for j, scopes in enumerate(SCOPE_LISTS):
            key_id, _, _ = await pg_key(
                pg, acct, scopes, expires_sql="now() + interval '1 day'" if j % 2 else "NULL"
            )
            await pg.execute(
                "UPDATE api_keys SET key_prefix = $2 WHERE id = $1",
                key_id,
                ["wacrm_live_ab", 'pre"fix\\', "pré\x02fix"][(i + j) % 3],
            )
    await pg.execute(
        "UPDATE api_keys SET id = $1 WHERE id = (SELECT id FROM api_keys LIMIT 1)", limited_key
    )
    await pg.execute(
        "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes,"
        " expires_at) SELECT gen_random_uuid(), account_id, name, key_prefix,"
        " md5(key_hash), scopes, now() - interval '1 second' FROM api_keys LIMIT 1"
    )
    rules = KeyRules(KNOWN.scopes, Limits(keys, accounts))
    version = int(time.time() * 1000)
    bodies = dict(
        [
            (h, b)
            async for chunk in pg_source.bodies(7, version=version, rules=rules)
            for h, b in chunk
            if h is not None
        ]
    )
    rows = [KeyRow(*r) async for chunk in pg_source.snapshot(100) for r in chunk]
    assert len(bodies) == len(rows) - 1  # the expired key comes without its hash
    exact = set()
    for row in rows:
        record, _ = judge(row, rules, version)
        if record is None or (body := bodies[row.key_hash]) is None:
            continue  # nothing to hold, or left to judge()
        if judge_would_change(body):
            assert body != records.body(record)
        else:
            assert body == records.body(record), row
            exact.add(row.account_name)
    # Quotes, backslashes, non-ASCII, emoji and an empty name all come out exact.
    assert exact == {n for n in TRICKY_NAMES if clean_text(n)[:MAX_ACCOUNT_NAME] == n}
    assert len(exact) == 5


def judge_would_change(body: bytes | None) -> bool:
    """Tell whether a record with *body* is one judge() never produces (it would clean it)."""
    assert body is not None
    d = orjson.loads(records.VERSION_HEAD + b"0" + body)
    name, prefix, scopes = d["n"], d["p"], d["s"]
    return (
        (name is not None and clean_text(name)[:MAX_ACCOUNT_NAME] != name)
        or clean_text(prefix) != prefix
        or len(set(scopes)) != len(scopes)
        or not set(scopes) <= KNOWN.scopes
    )
