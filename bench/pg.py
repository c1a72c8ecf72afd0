"""Throw-away PostgreSQL databases for the benchmarks (and the tests' DSN helper)."""

from __future__ import annotations

import asyncpg


def with_database(dsn: str, database: str) -> str:
    """Return *dsn* pointing at *database* instead, its query (sslmode, say) kept."""
    base, _, rest = dsn.rpartition("/")
    query = rest.partition("?")[2]
    return f"{base}/{database}" + (f"?{query}" if query else "")


async def recreate(admin_dsn: str, database: str, *scripts: str, force: bool = False) -> str:
    """Drop *database* if it exists, create it, run the SQL *scripts* in it; return its DSN.

    *force* drops it even while others are connected (PostgreSQL 13 and later).
    """
    await drop(admin_dsn, database, force=force)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {database}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, database)
    conn = await asyncpg.connect(dsn)
    try:
        for sql in scripts:
            await conn.execute(sql)
    finally:
        await conn.close()
    return dsn


async def drop(admin_dsn: str, database: str, *, force: bool = False) -> None:
    """Drop *database* if it exists (see `recreate` for *force*)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            f"DROP DATABASE IF EXISTS {database}" + (" WITH (FORCE)" if force else "")
        )
    finally:
        await conn.close()
