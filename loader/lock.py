"""The lock that lets one ``loader run`` work while the others stand by, ready to take over.

The active loader holds `Keyspace.lock` with a Redis expiry of *ttl* and renews it every
third of that (`LOCK_SCRIPT`: take it if free, extend it if ours, never touch another's).  It
may work only while its last successful renewal, counted from when that renewal was sent, is
younger than half the ttl: Redis gives the lock a full ttl from later than that, so a loader
that cannot reach Redis stops before its lock can expire and a standby take it.  A standby
tries to take the lock every tenth of the ttl; a clean stop frees it (`UNLOCK_SCRIPT`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from loader.mirror import REDIS_ERRORS
from loader.pipe import ClusterPipe, Pipe, open_pipe
from sidecar.records import LOCK_SCRIPT, UNLOCK_SCRIPT, Keyspace
from sidecar.slots import key_slot

log = logging.getLogger(__name__)


class LockLost(Exception):
    """This loader no longer holds the lock, or has not been able to renew it in time."""


def new_token() -> str:
    """Return a token naming this process to the other loaders: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Lock:
    """Take and keep the loader lock of *keyspace* in the Redis at *url*, as *token*.

    Every Redis call waits at most *timeout* seconds; the connection is the lock's own.
    """

    def __init__(
        self,
        url: str,
        keyspace: Keyspace,
        *,
        ttl: float,
        timeout: float,
        token: str | None = None,
    ) -> None:
        self.url = url
        self.key = keyspace.lock
        self._slot = key_slot(self.key)
        self.ttl = ttl
        self.timeout = timeout
        self.token = token or new_token()
        #: Seconds between renewals, between a standby's attempts, and of work unrenewed.
        self.renew_every = ttl / 3
        self.try_every = ttl / 10
        self.grace = ttl / 2
        #: Whether this loader took the lock and has not lost or freed it since.
        self.held = False
        self._ttl_ms = max(1, round(ttl * 1000))
        self._renewed = 0.0
        #: Whether an attempt to take the lock went unanswered: it may be ours.
        self._unsure = False
        self._pipe: Pipe | ClusterPipe | None = None

    async def take(self, *, within: float | None = None) -> str:
        """Try once to take the lock, or extend it if held; return the token holding it now.

        Raise one of `loader.mirror.REDIS_ERRORS` when Redis does not answer *within* that
        many seconds (default: the lock's timeout).
        """
        sent = asyncio.get_running_loop().time()
        try:
            reply = await self._call(
                "EVAL", LOCK_SCRIPT, 1, self.key, self.token, self._ttl_ms, within=within
            )
        except BaseException:
            self._unsure = True  # Redis may have run it: `release` must look
            raise
        self._unsure = False
        holder = _text(reply)
        if holder == self.token:
            self.held = True
            self._renewed = sent
        return holder

    async def acquire(self, seen: Callable[[str | None], None] | None = None) -> None:
        """Stand by until this loader holds the lock.

        Call *seen* after each attempt that did not take it, with the token of the loader
        holding it, or None when Redis could not be reached.
        """
        logged: str | None = None
        unreachable = False
        while True:
            try:
                holder = await self.take()
            except REDIS_ERRORS as e:
                if not unreachable:
                    log.warning("standby: cannot reach Redis to take the loader lock: %s", e)
                    unreachable = True
                logged = None
                if seen is not None:
                    seen(None)
            else:
                if holder == self.token:
                    return
                if holder != logged:
                    log.info("standby: another loader (token %s) is active", holder)
                    logged = holder
                unreachable = False
                if seen is not None:
                    seen(holder)
            await asyncio.sleep(self.try_every)

    async def keep(self) -> NoReturn:
        """Renew the lock while this loader holds it; raise `LockLost` once it does not.

        That is when a renewal finds another token, or when no renewal has succeeded for
        half the ttl (Redis down, slow or out of reach): this loader must then stop working,
        before the lock could expire.  A lock that vanished while still ours (Redis lost its
        data) is taken again.
        """
        loop = asyncio.get_running_loop()
        failing = False
        next_try = self._renewed + self.renew_every
        while True:
            deadline = self._renewed + self.grace
            await asyncio.sleep(max(0.0, min(next_try, deadline) - loop.time()))
            left = deadline - loop.time()
            if left <= 0:
                self.held = False
                raise LockLost(f"the loader lock could not be renewed for {self.grace:.1f} s")
            try:
                holder = await self.take(within=min(self.timeout, left))
            except REDIS_ERRORS as e:
                if not failing:
                    log.warning("cannot renew the loader lock, retrying: %s", e)
                    failing = True
                next_try = loop.time() + self.try_every
                continue
            if holder != self.token:
                self.held = False
                raise LockLost(f"another loader (token {holder}) holds the loader lock")
            if failing:
                log.info("the loader lock is renewed again")
                failing = False
            next_try = self._renewed + self.renew_every

    async def release(self, *, within: float | None = None) -> bool:
        """Free the lock if this loader holds it, and only then; return whether it did.

        Wait *within* that many seconds at most (default: the lock's timeout).
        """
        if not (self.held or self._unsure):
            return False
        self.held = False
        reply = await self._call("EVAL", UNLOCK_SCRIPT, 1, self.key, self.token, within=within)
        return bool(reply == 1)

    async def close(self) -> None:
        """Close the lock's connection to Redis."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()

    async def _call(self, *args: str | int, within: float | None = None) -> Any:
        """Send one command on the lock's connection, opened if need be; wait for its reply
        *within* that many seconds (default: the lock's timeout)."""
        within = self.timeout if within is None else within
        end = asyncio.get_running_loop().time() + within
        try:
            if self._pipe is None:
                # Half for the connection, half for its check (INFO): all of it within time.
                self._pipe = await open_pipe(self.url, connect_timeout=within / 2)
            async with asyncio.timeout_at(end):
                return await self._pipe.call(*args, slot=self._slot)
        except BaseException:
            # Unanswered or cancelled: the connection's state is unknown, so start afresh.
            await self.close()  # does not suspend, so it completes even when cancelled
            raise


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
