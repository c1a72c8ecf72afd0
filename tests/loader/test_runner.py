"""``run`` against real PostgreSQL/SQLite and Redis: changes within a second, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from loader import runner
from loader.metrics import LoaderMetrics
from loader.settings import Settings
from loader.source import NewKey, SourceUnavailable
from loader.sqlite import SqliteSource
from sidecar.records import Keyspace, RateLimit, decode
from tests.conftest import RedisServer
from tests.loader.conftest import pg_account, pg_key, settings_for, sqlite_db, sqlite_key

KS = Keyspace()


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Wait until *check* holds; return how long it took, or fail after *within* seconds."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            pytest.fail(f"not true within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(
    settings: Settings, metrics: LoaderMetrics | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.run(settings, metrics))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def reconciled(redis: Redis) -> bool:
    """Tell whether a full reconcile completed (the mark holds its version, not 0)."""
    return await redis.get(KS.loaded) not in (None, b"0")


async def present(redis: Redis, key_hash: str) -> bool:
    return bool(await redis.exists(KS.record(key_hash)))


async def test_run_follows_postgresql_within_a_second(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    acct = await pg_account(pg)
    _, _, initial = await pg_key(pg, acct)
    async with running(settings_for(pg_dsn, redis_server)):
        await eventually(lambda: reconciled(redis), 5)
        assert await present(redis, initial)

        key_id, _, key_hash = await pg_key(pg, acct, ["messages:send"])
        assert await eventually(lambda: present(redis, key_hash), 1.0) < 1.0

        await pg.execute("UPDATE api_keys SET scopes = '{contacts:read}' WHERE id = $1", key_id)

        async def rescoped() -> bool:
            raw = await redis.get(KS.record(key_hash))
            return raw is not None and decode(raw).scopes == ("contacts:read",)

        assert await eventually(rescoped, 1.0) < 1.0

        await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
        assert await eventually(lambda: _absent(redis, key_hash), 1.0) < 1.0

        await pg.execute("DELETE FROM accounts WHERE id = $1", acct)
        assert await eventually(lambda: _absent(redis, initial), 1.0) < 1.0


async def test_run_reloads_a_redis_that_lost_its_data(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    acct = await pg_account(pg)
    _, _, key_hash = await pg_key(pg, acct)
    async with running(settings_for(pg_dsn, redis_server)):
        await eventually(lambda: present(redis, key_hash), 5)
        await redis.flushall()
        await eventually(lambda: present(redis, key_hash), 3)

        redis_server.stop()
        await asyncio.sleep(0.5)
        redis_server.start()
        fresh = Redis.from_url(redis_server.url)
        try:
            await eventually(lambda: present(fresh, key_hash), 5)
        finally:
            await fresh.aclose()


async def test_run_keeps_retrying_while_the_source_is_down(
    redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.set(KS.record("a" * 64), b'{"v":1}')
    settings = settings_for("postgresql://postgres@127.0.0.1:1/none", redis_server)
    with caplog.at_level(logging.WARNING, logger="loader"):
        async with running(settings) as task:
            await asyncio.sleep(1.5)
            assert not task.done()
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2 and all(r.exc_info is None for r in retries)
    assert await redis.exists(KS.record("a" * 64)) == 1  # what Redis holds is kept


async def test_sync_fails_clearly_when_the_source_is_down(redis_server: RedisServer) -> None:
    with pytest.raises(SourceUnavailable, match="cannot connect to PostgreSQL"):
        await runner.sync(settings_for("postgresql://postgres@127.0.0.1:1/none", redis_server))


async def test_run_follows_sqlite_within_a_second(
    tmp_path: Path, redis: Redis, redis_server: RedisServer
) -> None:
    path = tmp_path / "keys.db"
    async with running(settings_for(f"sqlite:///{path}", redis_server)):
        await eventually(lambda: reconciled(redis), 5)
        sqlite_key(path, "k1", "a" * 64, new_account=True)
        assert await eventually(lambda: present(redis, "a" * 64), 1.0) < 1.0
        with sqlite_db(path) as db:
            db.execute("UPDATE api_keys SET revoked_at = '2025-01-01T00:00:00Z' WHERE id = 'k1'")
        assert await eventually(lambda: _absent(redis, "a" * 64), 1.0) < 1.0


async def _absent(redis: Redis, key_hash: str) -> bool:
    return not await present(redis, key_hash)


async def test_run_copies_last_use_notes_into_last_used_at(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    acct = await pg_account(pg)
    key_id, _, _ = await pg_key(pg, acct)
    seconds, _ = await redis.time()
    used_ms = (seconds - 5) * 1000 + 250
    await redis.zadd(KS.used, {key_id: used_ms, "not-a-uuid": used_ms})
    async with running(settings_for(pg_dsn, redis_server, last_used_flush=0.05)):

        async def noted() -> bool:
            at = await pg.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
            return at is not None and int(at.timestamp() * 1000) == used_ms

        await eventually(noted, 3)
        assert await redis.exists(KS.used) == 0
        # An older note never moves last_used_at back.
        await redis.zadd(KS.used, {key_id: used_ms - 1000})
        await eventually(lambda: _absent_key(redis, KS.used), 3)
        assert await noted()


async def test_sqlite_touch_keeps_the_latest_use(sqlite_source: SqliteSource) -> None:
    await sqlite_source.create_account("acct", "Acme")
    await sqlite_source.create_key(NewKey("k1", "acct", "n", "p", "a" * 64, (), None))
    assert await sqlite_source.touch({"k1": 1_700_000_000_500, "nope": 1}) == 1
    assert await sqlite_source.touch({"k1": 1_600_000_000_000}) == 0
    [listed] = await sqlite_source.list_keys("acct")
    assert listed.last_used_at is not None
    assert int(listed.last_used_at.timestamp() * 1000) == 1_700_000_000_500


async def _absent_key(redis: Redis, name: str) -> bool:
    return not await redis.exists(name)


async def test_sighup_applies_a_changed_rate_limits_file_and_keeps_a_broken_one_out(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.db"
    limits = tmp_path / "limits"
    limits.write_text("")
    settings = settings_for(f"sqlite:///{path}", redis_server, rate_limits=limits)
    metrics = LoaderMetrics()
    async with running(settings, metrics):
        await eventually(lambda: reconciled(redis), 5)
        sqlite_key(path, "k1", "b" * 64, new_account=True)
        await eventually(lambda: present(redis, "b" * 64), 2)

        async def limit() -> RateLimit | None:
            return decode(await redis.get(KS.record("b" * 64))).rate_limit

        assert await limit() is None

        limits.write_text("key k1 5/1s\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: _is(limit, RateLimit(5, 1000)), 5)

        limits.write_text("key k1 five\n")
        with caplog.at_level(logging.ERROR, logger="loader.runner"):
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(lambda: _logged(caplog, "reload refused"), 2)
        sqlite_key(path, "k2", "c" * 64)  # still following the table, under the old rules
        await eventually(lambda: present(redis, "c" * 64), 2)
        assert await limit() == RateLimit(5, 1000)

        os.kill(os.getpid(), signal.SIGHUP)  # the file is still broken

        async def refused_twice() -> bool:
            sample = {"result": "refused"}
            return metrics.registry.get_sample_value("wacrm_loader_reloads_total", sample) == 2

        await eventually(refused_twice, 2)
    reloads = {
        r: metrics.registry.get_sample_value("wacrm_loader_reloads_total", {"result": r})
        for r in ("applied", "unchanged", "refused")
    }
    assert reloads == {"applied": 1, "unchanged": 0, "refused": 2}


async def _is(get: Callable[[], Awaitable[object]], expected: object) -> bool:
    return await get() == expected


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_run_works_only_while_it_holds_the_loader_lock(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Standing by, `run` writes nothing; once the lock is free it takes it and reconciles in
    full; when another token takes the lock, its work stops at once."""
    path = tmp_path / "keys.db"
    await redis.set(KS.lock, "other", px=60_000)
    metrics = LoaderMetrics()
    settings = settings_for(f"sqlite:///{path}", redis_server, lock_ttl=1.0)
    with caplog.at_level(logging.INFO, logger="loader"):
        async with running(settings, metrics):
            await eventually(lambda: _standing_by_for(metrics, "other"), 2)
            await asyncio.sleep(0.3)
            assert await redis.exists(KS.loaded) == 0, "a standby does not reconcile"
            assert not metrics.is_active and not path.exists()

            await redis.delete(KS.lock)  # the other loader stopped cleanly
            await eventually(lambda: reconciled(redis), 3)
            assert metrics.is_active and metrics.ready

            await redis.set(KS.lock, "other", px=60_000)  # another loader took it
            await eventually(lambda: _standing_by_for(metrics, "other"), 1)
            sqlite_key(path, "k1", "d" * 64, new_account=True)
            await asyncio.sleep(0.5)
            assert not await present(redis, "d" * 64), "no work without the lock"

            await redis.delete(KS.lock)
            await eventually(lambda: present(redis, "d" * 64), 3)  # taken back, reconciled
    assert await redis.exists(KS.lock) == 0, "freed on a clean stop"
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("standby: another loader (token other) is active") == 2
    assert any("another loader (token other) holds the loader lock" in m for m in messages)


async def _standing_by_for(metrics: LoaderMetrics, token: str) -> bool:
    return not metrics.is_active and metrics.active_token == token
