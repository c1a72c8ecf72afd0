"""Fixtures shared by every test: our own redis-server, and a throwaway PostgreSQL database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from demo import procs


class RedisServer:
    """A redis-server on a free port that a test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "redis.sock"
        self.process = procs.redis_server(workdir, unix_socket=self.socket)
        self.port = self.process.port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        #: The same server and database through its Unix socket.
        self.socket_url = f"unix://{self.socket}?db=0"

    def start(self) -> None:
        if not self.process.running:
            self.process.start()

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder for the session's server logs and configs."""
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """Run one redis-server for the session; tests that stop it must start it again."""
    server = RedisServer(workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """Return a client of the session's Redis, emptied before the test."""
    redis_server.start()
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def silent_redis_url() -> AsyncIterator[str]:
    """Return the URL of a server that accepts connections and never answers."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    for w in accepted:
        w.close()
    server.close()
    await server.wait_closed()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """Return a database with Wacrm's schema and the shipped trigger, for the session."""
    # Imported here: tests.loader.conftest imports this module.
    from tests.loader.conftest import throwaway_database

    with throwaway_database() as dsn:
        yield dsn


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Return a connection to the session's database, emptied before the test."""
    from tests.loader.conftest import emptied

    conn = await emptied(pg_dsn)
    yield conn
    await conn.close()
