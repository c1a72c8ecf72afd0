"""last_used_at without a write per request: 10,000 checks through the real sidecar, one write.

PostgreSQL with Wacrm's schema and a trigger that records every update of an ``api_keys`` row;
the sidecar notes use at most once a minute per key; ``loader run`` copies the notes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.last_used import COUNTING_SQL, add_key, burst, writes
from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e.test_loader_e2e import Loader
from tests.loader.conftest import throwaway_database
from tests.loader.test_runner import eventually

KS = Keyspace()
REQUESTS = 10_000
FLUSH = 0.1


@pytest.fixture(scope="module")
def counted_dsn() -> Iterator[str]:
    """Return a database of its own with Wacrm's schema and the write-counting trigger."""
    with throwaway_database() as dsn:

        async def install() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(COUNTING_SQL)
            finally:
                await conn.close()

        asyncio.run(install())
        yield dsn


@pytest.fixture
async def counted(counted_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(counted_dsn)
    await conn.execute("TRUNCATE accounts, api_keys, api_key_writes CASCADE")
    yield conn
    await conn.close()


@pytest.fixture
def busy_sidecar(tmp_path: Path, redis_server: RedisServer) -> Iterator[procs.Process]:
    """Return a sidecar whose rate limit a 10,000-request burst does not reach."""
    proc = procs.sidecar(
        tmp_path,
        redis_url=redis_server.url,
        extra_env={
            "WACRM_RATE_LIMIT": "1000000/1h",
            # This test counts table writes, not timeouts: a busy CI machine may stall.
            "WACRM_REDIS_TIMEOUT": "5",
        },
    )
    proc.start()
    yield proc
    proc.stop()


async def test_a_10000_request_burst_on_one_key_writes_last_used_at_once(
    counted: asyncpg.Connection,
    counted_dsn: str,
    redis: Redis,
    redis_server: RedisServer,
    busy_sidecar: procs.Process,
    tmp_path: Path,
) -> None:
    key_id, key = await add_key(counted)
    loader = Loader(tmp_path, counted_dsn, redis_server.url)
    loader.env["WACRM_LAST_USED_FLUSH"] = str(FLUSH)
    await asyncio.to_thread(loader.start, redis_server.url)
    try:
        before = time.time()
        statuses = await burst(busy_sidecar.port, key, REQUESTS)
        assert statuses == {200: REQUESTS}

        async def written() -> bool:
            return await writes(counted, key_id) >= 1

        await eventually(written, 5)
        await asyncio.sleep(FLUSH * 10)  # ten more flushes: no second write comes
        assert await writes(counted, key_id) == 1
        used = await counted.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
        assert used is not None and before - 1 <= used.timestamp() <= time.time()

        # A note older than last_used_at (a slow sidecar, a restored note) is no write at all.
        await redis.zadd(KS.used, {key_id: int(used.timestamp() * 1000) - 60_000})

        async def drained() -> bool:
            return not await redis.exists(KS.used)

        await eventually(drained, 5)
        await asyncio.sleep(FLUSH * 5)
        assert await writes(counted, key_id) == 1
        later = await counted.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
        assert later == used
    finally:
        await asyncio.to_thread(loader.stop)
