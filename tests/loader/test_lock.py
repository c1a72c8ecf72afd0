"""The loader lock against real Redis: taken when free, renewed and freed only by its holder,
and given up in time when Redis cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from loader.lock import Lock, LockLost, new_token
from sidecar.records import UNLOCK_SCRIPT, Keyspace
from tests.conftest import RedisServer
from tests.loader.test_runner import eventually

KS = Keyspace()
TTL = 1.0


@contextlib.asynccontextmanager
async def lock_on(url: str, token: str, *, ttl: float = TTL) -> AsyncIterator[Lock]:
    lock = Lock(url, KS, ttl=ttl, timeout=0.5, token=token)
    try:
        yield lock
    finally:
        await lock.close()


@contextlib.asynccontextmanager
async def keeping(lock: Lock) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.create_task(lock.keep())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, LockLost):
            await task


class Proxy:
    """A TCP relay to Redis that can go silent: it keeps the connections, passes nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not self.silent:
                        dst.write(data)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@pytest.fixture
async def proxy(redis: Redis, redis_server: RedisServer) -> AsyncIterator[Proxy]:
    relay = Proxy(redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


def test_the_lock_key_lives_under_the_prefix_and_the_token_names_the_process() -> None:
    assert Keyspace("acme:").lock == "acme:loader-lock"
    host, pid, random = new_token().split(":")
    assert (host, pid, len(random)) == (socket.gethostname(), str(os.getpid()), 8)
    assert new_token() != new_token()


async def test_a_free_lock_is_taken_for_its_ttl_and_a_held_one_is_left_alone(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with lock_on(redis_server.url, "a") as a, lock_on(redis_server.url, "b") as b:
        assert await a.take() == "a" and a.held
        assert await redis.get(KS.lock) == b"a"
        assert 900 < await redis.pttl(KS.lock) <= 1000

        await redis.pexpire(KS.lock, 300)
        assert await b.take() == "a" and not b.held
        assert await redis.get(KS.lock) == b"a"
        assert await redis.pttl(KS.lock) <= 300, "another token never extends the lock"

        assert await a.take() == "a"
        assert await redis.pttl(KS.lock) > 900, "its holder extends it"


async def test_the_lock_is_freed_only_by_its_holder(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with lock_on(redis_server.url, "a") as a, lock_on(redis_server.url, "b") as b:
        assert await a.take() == "a"
        assert await b.release() is False, "b never held it"
        assert await redis.eval(UNLOCK_SCRIPT, 1, KS.lock, "b") == 0
        assert await redis.get(KS.lock) == b"a"

        await redis.set(KS.lock, "c", px=5000)  # a lost it, to c
        assert await a.release() is False
        assert await redis.get(KS.lock) == b"c"

        await redis.delete(KS.lock)
        assert await a.take() == "a"
        assert await a.release() is True and not a.held
        assert await redis.exists(KS.lock) == 0


async def test_keep_renews_the_lock_until_another_token_holds_it(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with lock_on(redis_server.url, "a") as a:
        await a.take()
        async with keeping(a) as task:
            await asyncio.sleep(TTL * 1.5)  # beyond the ttl: renewed meanwhile
            assert not task.done()
            assert await redis.get(KS.lock) == b"a"
            assert await redis.pttl(KS.lock) > TTL * 1000 * 0.5

            await redis.set(KS.lock, "b", px=5000)
            took = await eventually(lambda: _done(task), a.renew_every + 0.3)
            with pytest.raises(LockLost, match=r"another loader \(token b\)"):
                await task
        assert took <= a.renew_every + 0.3
        assert not a.held
        assert await redis.get(KS.lock) == b"b"


async def test_keep_takes_back_a_lock_that_redis_lost(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with lock_on(redis_server.url, "a") as a:
        await a.take()
        async with keeping(a) as task:
            await redis.flushdb()
            await eventually(lambda: _holds(redis, b"a"), a.renew_every + 0.3)
            await asyncio.sleep(a.renew_every)
            assert not task.done()


async def test_keep_gives_up_within_half_the_ttl_when_redis_goes_silent(
    proxy: Proxy, redis: Redis
) -> None:
    """The lock is given up while Redis still holds it for a good while: no standby can have
    taken it yet."""
    async with lock_on(proxy.url, "a") as a:
        await a.take()
        async with keeping(a) as task:
            await asyncio.sleep(a.renew_every + 0.1)  # one renewal through the proxy
            renewed = await redis.pttl(KS.lock)
            proxy.silent = True
            silenced = time.monotonic()
            await eventually(lambda: _done(task), TTL)
            gave_up = time.monotonic() - silenced
            left_ms = await redis.pttl(KS.lock)
            with pytest.raises(LockLost, match=r"could not be renewed for 0\.5 s"):
                await task
    assert renewed > 800
    assert gave_up < a.grace + 0.1  # half a ttl from the last renewal, before the silence
    assert left_ms > TTL * 1000 * 0.4, "given up well before the lock could expire"


async def test_keep_gives_up_within_half_the_ttl_when_redis_is_down(
    redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with lock_on(redis_server.url, "a") as a:
        await a.take()
        async with keeping(a) as task:
            redis_server.stop()
            try:
                with caplog.at_level(logging.WARNING, logger="loader.lock"):
                    took = await eventually(lambda: _done(task), TTL)
                with pytest.raises(LockLost):
                    await task
            finally:
                redis_server.start()
    assert took < a.grace + 0.1
    warned = [r for r in caplog.records if "cannot renew the loader lock" in r.getMessage()]
    assert len(warned) == 1, "one warning, not one per attempt"


async def test_a_standby_names_the_holder_once_and_takes_over_when_it_is_freed(
    redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []
    async with lock_on(redis_server.url, "a") as a, lock_on(redis_server.url, "b") as b:
        await a.take()
        with caplog.at_level(logging.INFO, logger="loader.lock"):
            standby = asyncio.create_task(b.acquire(seen.append))
            await asyncio.sleep(b.try_every * 4)
            assert not standby.done() and len(seen) >= 3 and set(seen) == {"a"}
            await a.release()
            took = await eventually(lambda: _done(standby), 1)
            await standby
    assert took < b.try_every + 0.1
    assert b.held and await redis.get(KS.lock) == b"b"
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("standby: another loader (token a) is active") == 1, lines


async def test_a_standby_takes_over_once_the_lock_expires(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with lock_on(redis_server.url, "a") as a, lock_on(redis_server.url, "b") as b:
        await a.take()  # and never renewed: its loader died
        started = time.monotonic()
        await asyncio.wait_for(b.acquire(), TTL * 2)
        took = time.monotonic() - started
    assert TTL * 0.9 < took < TTL + b.try_every + 0.1
    assert await redis.get(KS.lock) == b"b"


async def _done(task: asyncio.Task[None]) -> bool:
    return task.done()


async def _holds(redis: Redis, token: bytes) -> bool:
    return bool(await redis.get(KS.lock) == token)
