"""The streaming Redis connection, against a real redis-server."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from loader.pipe import Batch, Pipe
from sidecar.resp import RedisError, encode_command
from tests.conftest import RedisServer


async def test_calls_answer_in_order(redis: Redis, redis_server: RedisServer) -> None:
    pipe = await Pipe.open(redis_server.url, connect_timeout=2)
    try:
        assert await pipe.call("SET", "a", "1") == b"OK"
        assert await pipe.call("GET", "a") == b"1"
        with pytest.raises(RedisError, match=r"WRONGTYPE|ERR"):
            await pipe.call("LPUSH", "a", "x")
        assert await pipe.call("PING") == b"PONG"
    finally:
        await pipe.close()


async def test_a_unix_socket_url_reaches_the_same_database(
    redis: Redis, redis_server: RedisServer
) -> None:
    await redis.set("a", "over tcp")
    pipe = await Pipe.open(redis_server.socket_url, connect_timeout=2)
    try:
        assert await pipe.call("GET", "a") == b"over tcp"
    finally:
        await pipe.close()


async def test_a_batch_tallies_every_reply(redis: Redis, redis_server: RedisServer) -> None:
    pipe = await Pipe.open(redis_server.url, connect_timeout=2)
    try:
        batch = Batch()
        commands = [encode_command(("SETNX", f"k{i % 100}", "v")) for i in range(25000)]
        await pipe.send(b"".join(commands), len(commands), batch)
        await pipe.wait(batch)
        assert (batch.applied, batch.kept_out, batch.errors) == (100, 24900, [])
        assert await redis.dbsize() == 100
    finally:
        await pipe.close()


async def test_a_dead_server_fails_fast(redis_server: RedisServer) -> None:
    with pytest.raises(RedisError, match="cannot connect"):
        await Pipe.open("redis://127.0.0.1:1/0", connect_timeout=1)


async def test_a_server_going_away_fails_waiting_calls(redis_server: RedisServer) -> None:
    redis_server.start()
    pipe = await Pipe.open(redis_server.url, connect_timeout=2)
    try:
        redis_server.stop()
        with pytest.raises(RedisError):
            for _ in range(3):  # the first write may still reach the socket buffer
                await pipe.call("PING")
    finally:
        await pipe.close()
        redis_server.start()
