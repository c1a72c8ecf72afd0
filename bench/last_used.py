"""last_used_at without a write per request: how many table writes a burst on one key causes.

Runs redis-server, the sidecar (rate limit out of the way) and ``loader run`` on a throwaway
PostgreSQL database with Wacrm's schema, plus a trigger that records every update of an
``api_keys`` row in a side table.  Sends *--requests* checks with one key straight to the
sidecar's ``/auth``, concurrently, waits for the loader to flush the last-use notes, and
prints the requests sent and the table writes they caused (Wacrm itself: one per request).

Usage: ``.venv/bin/python -m bench.last_used [--requests N] [--pg DSN]``; it creates (and
drops) a database ``wacrm_bench_last_used`` next to the one *--pg* names.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import asyncpg
from redis.asyncio import Redis

from bench import pg
from demo import procs
from sidecar.apikeys import mint
from sidecar.records import Keyspace, hash_key

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "deploy" / "compose" / "wacrm-schema.sql"
NOTIFY = ROOT / "loader" / "wacrm-notify.sql"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "wacrm_bench_last_used"
#: Seconds between the loader's flushes of last-use notes, in the benchmark.
FLUSH = 0.1

#: Every update of an api_keys row, recorded in a side table: what the burst cost the table.
COUNTING_SQL = """
CREATE TABLE IF NOT EXISTS api_key_writes (
  n        bigserial PRIMARY KEY,
  key_id   uuid NOT NULL,
  old_used timestamptz,
  new_used timestamptz
);
CREATE OR REPLACE FUNCTION count_api_key_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO api_key_writes (key_id, old_used, new_used)
  VALUES (NEW.id, OLD.last_used_at, NEW.last_used_at);
  RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS count_api_key_write ON api_keys;
CREATE TRIGGER count_api_key_write AFTER UPDATE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION count_api_key_write();
"""


async def burst(
    port: int, key: str, requests: int, *, concurrency: int = 64
) -> collections.Counter[int]:
    """Send *requests* checks of *key* to the sidecar's /auth on *port*; count the statuses."""
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Original-Method": "GET",
        "X-Original-URI": "/api/v1/contacts",
    }
    statuses: collections.Counter[int] = collections.Counter()
    left = iter(range(requests))
    url = f"http://127.0.0.1:{port}/auth"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for _ in left:
                async with http.get(url, headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def add_key(conn: asyncpg.Connection) -> tuple[str, str]:
    """Insert an account and a key with scope contacts:read; return (key id, plaintext)."""
    account_id, key_id = str(uuid.uuid4()), str(uuid.uuid4())
    minted = mint()
    await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, 'Bench')", account_id)
    await conn.execute(
        "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes)"
        " VALUES ($1, $2, 'bench', $3, $4, '{contacts:read}')",
        key_id,
        account_id,
        minted.key_prefix,
        minted.key_hash,
    )
    return key_id, minted.plaintext


async def writes(conn: asyncpg.Connection, key_id: str) -> int:
    """Return how many times the row of *key_id* was updated since the trigger went in."""
    return int(await conn.fetchval("SELECT count(*) FROM api_key_writes WHERE key_id = $1", key_id))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pg", default=os.environ.get("WACRM_TEST_PG", DEFAULT_PG))
    args = parser.parse_args(argv)
    return asyncio.run(_bench(args.pg, args.requests, args.concurrency))


async def _bench(admin_dsn: str, requests: int, concurrency: int) -> int:
    dsn = await pg.recreate(
        admin_dsn, DATABASE, SCHEMA.read_text(), NOTIFY.read_text(), COUNTING_SQL, force=True
    )
    try:
        with tempfile.TemporaryDirectory(prefix="last-used-bench-") as tmp:
            return await _run(Path(tmp), dsn, requests, concurrency)
    finally:
        await pg.drop(admin_dsn, DATABASE, force=True)


async def _run(workdir: Path, dsn: str, requests: int, concurrency: int) -> int:
    redis_proc = procs.redis_server(workdir)
    redis_proc.start()
    url = f"redis://127.0.0.1:{redis_proc.port}/0"
    sidecar = procs.sidecar(
        workdir, redis_url=url, extra_env={"WACRM_RATE_LIMIT": f"{requests * 10}/1h"}
    )
    loader = procs.Process(
        [sys.executable, "-m", "loader", "run"],
        port=0,
        log=workdir / "loader.log",
        env={
            **os.environ,
            "WACRM_SOURCE": dsn,
            "WACRM_REDIS_URL": url,
            "WACRM_LAST_USED_FLUSH": str(FLUSH),
        },
    )
    conn = await asyncpg.connect(dsn)
    try:
        key_id, key = await add_key(conn)
        sidecar.start()
        loader.start_background()
        await _until_loaded(url, key)
        started = time.monotonic()
        statuses = await burst(sidecar.port, key, requests, concurrency=concurrency)
        seconds = time.monotonic() - started
        await asyncio.sleep(FLUSH * 20)  # many flushes: any write the burst causes is made
        count = await writes(conn, key_id)
        used = await conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
    finally:
        await conn.close()
        for p in (loader, sidecar, redis_proc):
            p.stop()
    allowed = statuses.get(200, 0)
    print(f"requests with one key:       {requests:,} in {seconds:.1f} s ({allowed:,} allowed)")
    print(f"api_keys.last_used_at:       {used}")
    print(f"writes to its api_keys row:  {count} (Wacrm: {allowed:,}, one per request)")
    return 0 if allowed == requests and count == 1 else 1


async def _until_loaded(redis_url: str, key: str) -> None:
    record = Keyspace().record(hash_key(key))
    async with Redis.from_url(redis_url) as r:
        for _ in range(500):
            if await r.exists(record):
                return
            await asyncio.sleep(0.02)
    raise TimeoutError("the loader did not load the key")


if __name__ == "__main__":
    sys.exit(main())
