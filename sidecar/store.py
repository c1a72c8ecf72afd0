"""Reading key records from Redis, with the rate limit counted in the same round trip."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from sidecar.records import CHECK_SCRIPT, Keyspace, RateLimit
from sidecar.resp import RedisTimeout, RedisUnavailable, ReplyError, RespClient

_CHECK_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()


class StoreUnavailable(Exception):
    """Redis did not answer, or not in time: the request must be refused.

    *kind* is ``timeout``, ``connection`` or ``reply``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Lookup:
    """A found record and where its key stands against its rate limit."""

    raw: bytes
    allowed: bool
    #: Requests left right now; -1 when the key has no limit.
    remaining: int
    #: Unix seconds at which the key's allowance is full again.
    reset: int
    #: Seconds to wait before the next request may pass (on a refusal).
    retry_after: int
    limit: int


class KeyStore:
    """Look up key records through *client* under *keyspace*, counting *rate_limit*."""

    def __init__(
        self, client: RespClient, keyspace: Keyspace, rate_limit: RateLimit | None
    ) -> None:
        self.client = client
        self.keyspace = keyspace
        limit = (rate_limit.limit, rate_limit.window_ms) if rate_limit else (0, 1)
        self._limit_args = (b"%d" % limit[0], b"%d" % limit[1])

    async def check(self, key_hash: str) -> Lookup | None:
        """Return the record of *key_hash* with its rate-limit verdict, or None if none."""
        ks = self.keyspace
        args = (2, ks.record(key_hash), ks.rate(key_hash), *self._limit_args)
        try:
            try:
                reply = await self.client.execute(b"EVALSHA", _CHECK_SHA, *args)
            except ReplyError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
                reply = await self.client.execute(b"EVAL", CHECK_SCRIPT, *args)
        except RedisTimeout as e:
            raise StoreUnavailable("timeout", str(e)) from e
        except RedisUnavailable as e:
            raise StoreUnavailable("connection", str(e)) from e
        except ReplyError as e:
            raise StoreUnavailable("reply", str(e)) from e
        if reply is None:
            return None
        raw, allowed, remaining, reset, retry_after, limit = reply
        return Lookup(raw, allowed == 1, remaining, reset, retry_after, limit)

    def touch(self, key_id: str, now_ms: int) -> None:
        """Note that *key_id* was used at *now_ms*, without waiting for Redis to answer."""
        fut = self.client.send(b"ZADD", self.keyspace.used, b"GT", b"%d" % now_ms, key_id)
        if fut is not None:
            fut.add_done_callback(_ignore)

    async def ping(self) -> bool:
        """Tell whether Redis answers within the timeout."""
        try:
            return bool(await self.client.execute(b"PING") == b"PONG")
        except (RedisUnavailable, ReplyError):
            return False


def _ignore(fut: asyncio.Future[object]) -> None:
    # Retrieve the outcome so asyncio does not log it; a lost touch only delays last_used_at.
    if not fut.cancelled():
        fut.exception()
