"""Fixtures for the loader: a throw-away PostgreSQL database with Wacrm's schema, and sources."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.pg import with_database
from loader.mirror import Mirror
from loader.postgres import PostgresSource
from loader.rows import KeyRules
from loader.settings import Settings
from loader.sqlite import SqliteSource
from sidecar.apikeys import mint
from sidecar.records import Keyspace
from sidecar.routes import load_policy
from tests.conftest import RedisServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: Wacrm's tables, as the compose stack's PostgreSQL gets them.
WACRM_SCHEMA = ROOT / "deploy" / "compose" / "wacrm-schema.sql"
NOTIFY_SQL = ROOT / "loader" / "wacrm-notify.sql"


@contextlib.contextmanager
def sqlite_db(path: str | Path) -> Iterator[sqlite3.Connection]:
    """Open *path*, commit on success, and close it: sqlite3's own ``with`` only commits."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        yield db


ADMIN_DSN = os.environ.get("WACRM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KNOWN = KeyRules(load_policy().scopes)


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """Create a database with Wacrm's schema and the shipped trigger; drop it afterwards."""
    name = f"wacrm_test_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(with_database(ADMIN_DSN, name))
        try:
            await conn.execute(WACRM_SCHEMA.read_text())
            await conn.execute(NOTIFY_SQL.read_text())
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield with_database(ADMIN_DSN, name)
    finally:
        asyncio.run(drop())


async def emptied(dsn: str) -> asyncpg.Connection:
    """Return a connection to *dsn* after emptying Wacrm's tables."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("TRUNCATE accounts, api_keys CASCADE")
    return conn


@pytest.fixture
async def pg_source(pg: asyncpg.Connection, pg_dsn: str) -> AsyncIterator[PostgresSource]:
    source = await PostgresSource.open(pg_dsn, connect_timeout=5)
    yield source
    await source.close()


@pytest.fixture
async def sqlite_source(tmp_path: Path) -> AsyncIterator[SqliteSource]:
    source = await SqliteSource.open(tmp_path / "keys.db")
    yield source
    await source.close()


@pytest.fixture
async def mirror(redis: Redis, redis_server: RedisServer) -> AsyncIterator[Mirror]:
    m = await Mirror.open(redis_server.url, Keyspace(), connect_timeout=5)
    yield m
    await m.close()


@pytest.fixture
async def mirror2(redis: Redis, redis_server: RedisServer) -> AsyncIterator[Mirror]:
    m = await Mirror.open(redis_server.url, Keyspace(), connect_timeout=5)
    yield m
    await m.close()


def settings_for(source: str, redis_server: RedisServer, **kw: object) -> Settings:
    """Return loader settings for *source* and the session's Redis, fast polling."""
    values: dict[str, object] = {
        "source": source,
        "redis_url": redis_server.url,
        "poll_interval": 0.05,
        "retry_max": 0.5,
        "timeout": 2.0,
    }
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


async def pg_account(pg: asyncpg.Connection, name: str | None = "Acme Inc") -> str:
    """Insert an account; return its id."""
    account_id = str(uuid.uuid4())
    await pg.execute("INSERT INTO accounts (id, name) VALUES ($1, $2)", account_id, name)
    return account_id


async def bulk_keys(pg: asyncpg.Connection, acct: str, count: int) -> None:
    """Insert *count* keys of *acct* in one statement; key i is ``wacrm_live_`` + i, zero-padded."""
    await pg.execute(
        """
        INSERT INTO api_keys (account_id, name, key_prefix, key_hash, scopes)
        SELECT $1, 'bulk ' || i, 'wacrm_live_' || lpad(i::text, 8, '0'),
               encode(sha256(('wacrm_live_' || lpad(i::text, 43, '0'))::bytea), 'hex'),
               '{contacts:read}'
        FROM generate_series(1, $2) i
        """,
        acct,
        count,
    )


async def pg_key(
    pg: asyncpg.Connection,
    account_id: str,
    scopes: list[str] | None = None,
    *,
    expires_sql: str = "NULL",
    key_hash: str | None = None,
) -> tuple[str, str, str]:
    """Insert a key the way Wacrm does; return (key id, plaintext, hash)."""
    minted = mint()
    key_id = str(uuid.uuid4())
    await pg.execute(
        "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes, expires_at)"
        f" VALUES ($1, $2, 'test key', $3, $4, $5, {expires_sql})",
        key_id,
        account_id,
        minted.key_prefix,
        key_hash or minted.key_hash,
        scopes if scopes is not None else ["messages:send"],
    )
    return key_id, minted.plaintext, key_hash or minted.key_hash


def sqlite_key(path: Path, key_id: str, key_hash: str, *, new_account: bool = False) -> None:
    """Insert a key with the messages:send scope into the SQLite table at *path*."""
    with sqlite_db(path) as db:
        if new_account:
            db.execute("INSERT INTO accounts (id, name) VALUES ('acct', 'Acme')")
        db.execute(
            "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes)"
            " VALUES (?, 'acct', 'n', 'wacrm_live_abcdefgh', ?, '[\"messages:send\"]')",
            (key_id, key_hash),
        )
