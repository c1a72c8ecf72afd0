"""Reading key records from Redis, failing closed."""

from __future__ import annotations

import asyncio
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sidecar.records import Keyspace

#: What a Redis call can raise when the server is down, slow or confused.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class StoreUnavailable(Exception):
    """Redis did not answer, or not in time: the request must be refused."""


class KeyStore:
    """Look up key records in *redis* under *keyspace*, each within *timeout* seconds."""

    def __init__(self, redis: Redis, keyspace: Keyspace, *, timeout: float) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.timeout = timeout

    async def fetch(self, key_hash: str) -> bytes | None:
        """Return the stored record of *key_hash*, or None when there is none."""
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.redis.get(self.keyspace.record(key_hash))
        except REDIS_ERRORS as e:
            raise StoreUnavailable(str(e) or type(e).__name__) from e
        return cast(bytes | None, raw)

    async def ping(self) -> bool:
        """Tell whether Redis answers within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self.redis.ping())
        except REDIS_ERRORS:
            return False
