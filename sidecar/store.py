"""Reading key records from Redis, failing closed."""

from __future__ import annotations

from typing import cast

from sidecar.records import Keyspace
from sidecar.resp import RedisUnavailable, ReplyError, RespClient


class StoreUnavailable(Exception):
    """Redis did not answer, or not in time: the request must be refused."""


class KeyStore:
    """Look up key records through *client* under *keyspace*."""

    def __init__(self, client: RespClient, keyspace: Keyspace) -> None:
        self.client = client
        self.keyspace = keyspace

    async def fetch(self, key_hash: str) -> bytes | None:
        """Return the stored record of *key_hash*, or None when there is none."""
        try:
            raw = await self.client.execute(b"GET", self.keyspace.record(key_hash))
        except (RedisUnavailable, ReplyError) as e:
            raise StoreUnavailable(str(e)) from e
        return cast(bytes | None, raw)

    async def ping(self) -> bool:
        """Tell whether Redis answers within the timeout."""
        try:
            return bool(await self.client.execute(b"PING") == b"PONG")
        except (RedisUnavailable, ReplyError):
            return False
