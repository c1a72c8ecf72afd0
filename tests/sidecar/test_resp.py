"""The pipelined Redis client, against the session's real Redis and against silent servers."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from demo import procs
from sidecar.resp import (
    RedisUnavailable,
    ReplyError,
    RespClient,
    bulk,
    encode_bulks,
    encode_command,
)
from tests.conftest import RedisServer


def test_encode_command() -> None:
    assert encode_command((b"GET", "k", 12)) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$2\r\n12\r\n"


def test_arguments_encoded_ahead_make_the_same_command() -> None:
    assert encode_bulks([bulk(b"GET"), bulk("k"), bulk(12)]) == encode_command((b"GET", "k", 12))
    assert bulk("é") == b"$2\r\n\xc3\xa9\r\n"  # the length counts bytes, not characters


async def test_concurrent_commands_get_their_own_replies(
    redis: Redis, redis_server: RedisServer
) -> None:
    await redis.mset({f"k{i}": f"v{i}" for i in range(500)})
    client = RespClient(redis_server.url, timeout=2)
    try:
        replies = await asyncio.gather(*(client.execute("GET", f"k{i}") for i in range(500)))
        assert replies == [f"v{i}".encode() for i in range(500)]
        assert await client.execute("GET", "missing") is None
    finally:
        await client.aclose()


async def test_a_unix_socket_url_reaches_the_same_server_and_database(
    redis: Redis, redis_server: RedisServer
) -> None:
    await redis.set("k", "over tcp")
    other = Redis.from_url(redis_server.url.replace("/0", "/4"))
    await other.set("k", "in db 4")
    client = RespClient(redis_server.socket_url, timeout=2)
    in_db_4 = RespClient(f"unix://{redis_server.socket}?db=4", timeout=2)
    try:
        assert await client.execute("GET", "k") == b"over tcp"
        assert await in_db_4.execute("GET", "k") == b"in db 4"
    finally:
        await client.aclose()
        await in_db_4.aclose()
        await other.delete("k")
        await other.aclose()


async def test_error_reply_fails_only_its_command(redis: Redis, redis_server: RedisServer) -> None:
    await redis.set("k", "v")
    client = RespClient(redis_server.url, timeout=2)
    try:
        bad, good = await asyncio.gather(
            client.execute("NOSUCHCOMMAND"), client.execute("GET", "k"), return_exceptions=True
        )
        assert isinstance(bad, ReplyError)
        assert good == b"v"
    finally:
        await client.aclose()


async def test_database_number_in_the_url_is_selected(
    redis: Redis, redis_server: RedisServer
) -> None:
    other = Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/3")
    await other.set("only-in-3", "yes")
    client = RespClient(f"redis://127.0.0.1:{redis_server.port}/3", timeout=2)
    try:
        assert await client.execute("GET", "only-in-3") == b"yes"
    finally:
        await client.aclose()
        await other.flushdb()
        await other.aclose()


async def test_wrong_password_is_unavailable(redis_server: RedisServer) -> None:
    client = RespClient(f"redis://:nope@127.0.0.1:{redis_server.port}/0", timeout=2)
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        await client.execute("PING")


async def test_nothing_listening_is_unavailable() -> None:
    client = RespClient(f"redis://127.0.0.1:{procs.free_port()}/0", timeout=1)
    with pytest.raises(RedisUnavailable):
        await client.execute("PING")


async def test_silent_server_fails_every_command_within_the_timeout(silent_redis_url: str) -> None:
    """A server that accepts and never answers: every command in flight fails, none hangs."""
    client = RespClient(silent_redis_url, timeout=0.2)
    started = time.monotonic()
    results = await asyncio.gather(
        *(client.execute("GET", "k") for _ in range(20)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r, RedisUnavailable) for r in results)
    assert elapsed < 1.0
    await client.aclose()


async def test_reconnects_after_redis_restarts(redis: Redis, redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url, timeout=1)
    try:
        assert await client.execute("PING") == b"PONG"
        redis_server.stop()
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
        redis_server.start()
        assert await client.execute("PING") == b"PONG"
    finally:
        redis_server.start()
        await client.aclose()
