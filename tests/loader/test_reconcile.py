"""Full reconciles and refreshes against real PostgreSQL, SQLite and Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from loader import admin
from loader.mirror import Mirror
from loader.postgres import PostgresSource
from loader.reconcile import BodySource, reconcile, refresh
from loader.rows import KeyRow, KeyRules
from loader.source import Changes, Source
from loader.sqlite import SqliteSource
from sidecar.records import Keyspace, decode, hash_key, version_of
from tests.conftest import RedisServer
from tests.loader.conftest import KNOWN, pg_account, pg_key, settings_for, sqlite_db

KS = Keyspace()


class SlowSource:
    """A source whose reads stop, after reading, until the test lets them go on."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.has_read = asyncio.Event()
        self.go_on = asyncio.Event()

    async def snapshot(self, batch: int) -> AsyncIterator[list[KeyRow]]:
        async for rows in self.inner.snapshot(batch):
            self.has_read.set()
            await self.go_on.wait()
            yield rows

    async def bodies(
        self, batch: int, *, version: int, rules: KeyRules
    ) -> AsyncIterator[list[tuple[str | None, bytes | None]]]:
        assert isinstance(self.inner, BodySource)
        async for rows in self.inner.bodies(batch, version=version, rules=rules):
            self.has_read.set()
            await self.go_on.wait()
            yield rows

    async def rows(self, changes: Changes) -> list[KeyRow]:
        rows = await self.inner.rows(changes)
        self.has_read.set()
        await self.go_on.wait()
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def full(source: Any, mirror: Mirror, mirror2: Mirror, batch_size: int = 1000) -> Any:
    return await reconcile(source, mirror, mirror2, rules=KNOWN, batch_size=batch_size)


async def test_reconcile_loads_active_keys_only(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    acct = await pg_account(pg, "Acme Inc")
    active_id, active, _ = await pg_key(pg, acct, ["messages:send", "contacts:read"])
    _, revoked, _ = await pg_key(pg, acct)
    await pg.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", hash_key(revoked)
    )
    _, expired, _ = await pg_key(pg, acct, expires_sql="now() - interval '1 second'")
    _, expiring, _ = await pg_key(pg, acct, expires_sql="now() + interval '1 hour'")

    report = await full(pg_source, mirror, mirror2)

    assert (report.active, report.written, report.deleted) == (2, 2, 0)
    raw = await redis.get(KS.record(hash_key(active)))
    assert raw is not None
    record = decode(raw)
    assert (record.key_id, record.account_id, record.account_name) == (active_id, acct, "Acme Inc")
    assert record.scopes == ("messages:send", "contacts:read")
    assert await redis.exists(KS.record(hash_key(revoked)), KS.record(hash_key(expired))) == 0
    expiring_raw = await redis.get(KS.record(hash_key(expiring)))
    assert expiring_raw is not None
    at = decode(expiring_raw).expires_at_ms
    assert at is not None and await redis.pexpiretime(KS.record(hash_key(expiring))) == at
    assert await redis.exists(KS.loaded) == 1


async def test_a_second_reconcile_writes_nothing_and_keeps_versions(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    acct = await pg_account(pg)
    _, plain, _ = await pg_key(pg, acct)
    await full(pg_source, mirror, mirror2)
    before = await redis.get(KS.record(hash_key(plain)))
    report = await full(pg_source, mirror, mirror2)
    assert (report.active, report.written, report.deleted) == (1, 0, 0)
    assert await redis.get(KS.record(hash_key(plain))) == before


async def test_reconcile_writes_differences_and_deletes_strays(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    acct = await pg_account(pg)
    keys = [await pg_key(pg, acct) for _ in range(5)]
    await full(pg_source, mirror, mirror2, batch_size=2)
    changed_id, changed, _ = keys[0]
    await pg.execute("UPDATE api_keys SET scopes = '{contacts:read}' WHERE id = $1", changed_id)
    await pg.execute("DELETE FROM api_keys WHERE id = $1", keys[1][0])
    await redis.set(KS.record("f" * 64), b'{"v":1,"k":"stray"}')

    report = await full(pg_source, mirror, mirror2, batch_size=2)

    assert (report.active, report.written, report.deleted) == (4, 1, 2)
    raw = await redis.get(KS.record(hash_key(changed)))
    assert raw is not None and decode(raw).scopes == ("contacts:read",)
    assert await redis.exists(KS.record(hash_key(keys[1][1])), KS.record("f" * 64)) == 0
    for _, plain, _ in keys[2:]:
        assert await redis.exists(KS.record(hash_key(plain))) == 1


async def test_renaming_an_account_rewrites_its_keys(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    acct = await pg_account(pg, "Old")
    _, plain, _ = await pg_key(pg, acct)
    await full(pg_source, mirror, mirror2)
    await pg.execute("UPDATE accounts SET name = 'New' WHERE id = $1", acct)
    report = await full(pg_source, mirror, mirror2)
    raw = await redis.get(KS.record(hash_key(plain)))
    assert report.written == 1 and raw is not None and decode(raw).account_name == "New"


async def test_no_resurrection_when_a_revocation_lands_during_a_slow_reconcile(
    pg: asyncpg.Connection,
    pg_source: PostgresSource,
    pg_dsn: str,
    mirror: Mirror,
    mirror2: Mirror,
    redis: Redis,
    redis_server: RedisServer,
) -> None:
    """The reconcile reads the key as active, `keys revoke` runs, then the reconcile writes."""
    acct = await pg_account(pg)
    key_id, plain, _ = await pg_key(pg, acct)
    _, other, _ = await pg_key(pg, acct)
    slow = SlowSource(pg_source)
    task = asyncio.create_task(full(slow, mirror, mirror2))
    await asyncio.wait_for(slow.has_read.wait(), 10)
    assert await redis.exists(KS.record(hash_key(plain))) == 0  # nothing written yet

    assert await admin.revoke_key(settings_for(pg_dsn, redis_server), key_id)
    assert await redis.exists(KS.tombstone(hash_key(plain))) == 1
    slow.go_on.set()
    report = await asyncio.wait_for(task, 10)

    assert report.kept_out == 1 and report.written == 1
    assert await redis.exists(KS.record(hash_key(plain))) == 0
    assert await redis.exists(KS.record(hash_key(other))) == 1
    again = await full(pg_source, mirror, mirror2)
    assert again.active == 1 and await redis.exists(KS.record(hash_key(plain))) == 0


async def test_no_resurrection_with_a_plain_sql_revocation_and_the_incremental_path(
    pg: asyncpg.Connection,
    pg_source: PostgresSource,
    mirror: Mirror,
    mirror2: Mirror,
    redis: Redis,
    redis_server: RedisServer,
) -> None:
    """The revocation arrives as a SQL UPDATE the loader refreshes while a reconcile stalls."""
    acct = await pg_account(pg)
    key_id, _, key_hash = await pg_key(pg, acct)
    await full(pg_source, mirror, mirror2)  # the key is in Redis at an older version
    slow = SlowSource(pg_source)
    task = asyncio.create_task(full(slow, mirror, mirror2))
    await asyncio.wait_for(slow.has_read.wait(), 10)
    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    incremental = await Mirror.open(redis_server.url, KS, connect_timeout=2)
    try:
        done = await refresh(pg_source, incremental, Changes(key_ids={key_id}), rules=KNOWN)
    finally:
        await incremental.close()
    assert done.deleted == 1
    slow.go_on.set()
    await asyncio.wait_for(task, 10)
    assert await redis.exists(KS.record(key_hash)) == 0


async def test_refreshes_out_of_order_keep_the_newest(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    """An older refresh (read: active) written after a newer one (read: revoked) loses."""
    acct = await pg_account(pg)
    key_id, _, key_hash = await pg_key(pg, acct)
    slow = SlowSource(pg_source)
    old = asyncio.create_task(refresh(slow, mirror, Changes(key_ids={key_id}), rules=KNOWN))
    await asyncio.wait_for(slow.has_read.wait(), 10)
    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    await refresh(pg_source, mirror2, Changes(key_ids={key_id}), rules=KNOWN)
    slow.go_on.set()
    report = await asyncio.wait_for(old, 10)
    assert report.kept_out == 1
    assert await redis.exists(KS.record(key_hash)) == 0


async def test_a_key_created_during_a_reconcile_survives_its_deletes(
    pg: asyncpg.Connection,
    pg_source: PostgresSource,
    pg_dsn: str,
    mirror: Mirror,
    mirror2: Mirror,
    redis: Redis,
    redis_server: RedisServer,
) -> None:
    acct = await pg_account(pg)
    await pg_key(pg, acct)
    slow = SlowSource(pg_source)
    task = asyncio.create_task(full(slow, mirror, mirror2))
    await asyncio.wait_for(slow.has_read.wait(), 10)
    created = await admin.create_key(
        settings_for(pg_dsn, redis_server),
        account_id=acct,
        name="new",
        scopes=[],
        expires_in_days=None,
    )
    assert created.in_redis
    slow.go_on.set()
    report = await asyncio.wait_for(task, 10)
    # The snapshot did not have it: its delete is refused, or never tried when the
    # reconcile's SCAN had already passed by.
    assert report.kept_out in (0, 1) and report.deleted == 0
    assert await redis.exists(KS.record(created.key.key_hash)) == 1


async def test_refresh_follows_hash_changes_and_deleted_rows(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, redis: Redis
) -> None:
    acct = await pg_account(pg)
    key_id, _, old_hash = await pg_key(pg, acct)
    await refresh(pg_source, mirror, Changes(key_ids={key_id}), rules=KNOWN)
    assert await redis.exists(KS.record(old_hash)) == 1
    new_hash = "e" * 64
    await pg.execute("UPDATE api_keys SET key_hash = $1 WHERE id = $2", new_hash, key_id)
    await refresh(
        pg_source,
        mirror,
        Changes(key_ids={key_id}, key_hashes={old_hash, new_hash}),
        rules=KNOWN,
    )
    assert await redis.exists(KS.record(old_hash)) == 0
    assert await redis.exists(KS.record(new_hash)) == 1
    await pg.execute("DELETE FROM accounts WHERE id = $1", acct)
    report = await refresh(
        pg_source, mirror, Changes(key_ids={key_id}, key_hashes={new_hash}), rules=KNOWN
    )
    assert report.deleted == 1 and await redis.exists(KS.record(new_hash)) == 0


async def test_bad_rows_are_skipped_with_warnings_and_cost_no_other_key(
    sqlite_source: SqliteSource,
    mirror: Mirror,
    mirror2: Mirror,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = sqlite_source.path
    good = "a" * 64
    with sqlite_db(path) as db:  # foreign keys off: an orphan key can exist
        db.execute("INSERT INTO accounts (id, name) VALUES ('acct', CAST(X'41636D65FF0A' AS TEXT))")
        rows = [
            ("good", "acct", good, '["messages:send","admin:everything"]', None),
            ("badhash", "acct", "NOT-A-HASH", '["messages:send"]', None),
            ("orphan", "nobody", "b" * 64, '["messages:send"]', None),
            ("badjson", "acct", "c" * 64, "messages:send", None),
            ("badtime", "acct", "d" * 64, "[]", "next tuesday"),
        ]
        db.executemany(
            "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes, expires_at)"
            " VALUES (?, ?, 'n', 'wacrm_live_abcdefgh', ?, ?, ?)",
            rows,
        )
    with caplog.at_level(logging.WARNING, logger="loader"):
        report = await full(sqlite_source, mirror, mirror2)
    assert report.active == 2 and report.skipped == 3
    raw = await redis.get(KS.record(good))
    assert raw is not None
    record = decode(raw)
    assert record.scopes == ("messages:send",) and record.account_name == "Acme\ufffd"
    raw = await redis.get(KS.record("c" * 64))
    assert raw is not None and decode(raw).scopes == ()
    text = caplog.text
    for key_id in ("good", "badhash", "orphan", "badjson", "badtime"):
        assert f"key {key_id}:" in text
    assert await redis.exists(KS.record("b" * 64), KS.record("d" * 64)) == 0


async def test_versions_of_a_reconcile_are_taken_before_it_reads(
    sqlite_source: SqliteSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    await sqlite_source.create_account("acct", "Acme")
    from loader.source import NewKey

    await sqlite_source.create_key(
        NewKey("k", "acct", "n", "wacrm_live_abcdefgh", "a" * 64, ("messages:send",), None)
    )
    seconds, micros = await redis.time()
    report = await full(sqlite_source, mirror, mirror2)
    raw = await redis.get(KS.record("a" * 64))
    assert raw is not None
    assert seconds * 1000 + micros // 1000 <= version_of(raw) == report.version


class PausingSource:
    """A source that stops after its first chunk until the test lets it go on."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.go_on = asyncio.Event()

    async def snapshot(self, batch: int) -> AsyncIterator[list[KeyRow]]:
        first = True
        async for rows in self.inner.snapshot(batch):
            if not first:
                await self.go_on.wait()
            first = False
            yield rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_redis_wiped_during_a_reconcile_is_loaded_again(
    pg: asyncpg.Connection, pg_source: PostgresSource, mirror: Mirror, mirror2: Mirror, redis: Redis
) -> None:
    """Records written before a flush are gone; the reconcile notices and starts over."""
    acct = await pg_account(pg)
    keys = [await pg_key(pg, acct) for _ in range(4)]
    paused = PausingSource(pg_source)
    task = asyncio.create_task(full(paused, mirror, mirror2, batch_size=2))
    try:
        for _ in range(1000):
            if await redis.exists(*[KS.record(h) for _, _, h in keys]) == 2:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail("the first chunk was never written")
        await redis.flushall()
    finally:
        paused.go_on.set()
    report = await asyncio.wait_for(task, 10)
    assert report.complete
    for _, _, key_hash in keys:
        assert await redis.exists(KS.record(key_hash)) == 1
    assert await redis.get(KS.loaded) == str(report.version).encode()


async def test_a_reconcile_into_a_loaded_redis_compares_and_fixes_every_kind_of_row(
    pg: asyncpg.Connection,
    pg_source: PostgresSource,
    mirror: Mirror,
    mirror2: Mirror,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The PostgreSQL-built bodies path: held keys kept, changes written, bad rows warned."""
    acct = await pg_account(pg, 'Quote " \\ Ünï 🚀')
    odd = await pg_account(pg, "tab\there")
    same = [await pg_key(pg, acct) for _ in range(3)]
    _, _, rescoped = await pg_key(pg, acct, ["contacts:read"])
    _, _, renamed = await pg_key(pg, odd)
    first = await full(pg_source, mirror, mirror2)
    assert first.active == 5 and await mirror.is_loaded()
    await pg.execute("UPDATE api_keys SET scopes = '{messages:send}' WHERE key_hash = $1", rescoped)
    _, _, dup = await pg_key(pg, acct, ["messages:send", "messages:send", "admin:all"])
    await pg_key(pg, acct, key_hash="A" * 64)  # uppercase: not a hash the gate looks up
    await pg_key(pg, acct, key_hash="e" * 63)  # too short
    await pg_key(pg, acct, expires_sql="now() - interval '1 second'")
    stray = "f" * 64
    await redis.set(KS.record(stray), b'{"v":1,"l":null}')
    versions = {h: version_of(await redis.get(KS.record(h)) or b"") for _, _, h in same}
    with caplog.at_level(logging.WARNING, logger="loader"):
        report = await full(pg_source, mirror, mirror2)
    assert (report.active, report.written, report.deleted) == (6, 2, 1)
    assert report.skipped == 3  # two malformed hashes, one expired key
    assert report.problems == 4  # the hashes, the unknown scope, the name cleaned
    assert caplog.text.count("malformed key_hash") == 2
    for _, _, h in same:  # held as they were: not even rewritten
        assert version_of(await redis.get(KS.record(h)) or b"") == versions[h]
    rescoped_raw = await redis.get(KS.record(rescoped))
    assert rescoped_raw is not None and decode(rescoped_raw).scopes == ("messages:send",)
    dup_raw = await redis.get(KS.record(dup))
    assert dup_raw is not None and decode(dup_raw).scopes == ("messages:send",)
    renamed_raw = await redis.get(KS.record(renamed))
    assert renamed_raw is not None and decode(renamed_raw).account_name == "tabhere"
    assert await redis.exists(KS.record(stray), KS.record("a" * 64)) == 0
    again = await full(pg_source, mirror, mirror2)
    assert (again.active, again.written, again.deleted) == (6, 0, 0)
