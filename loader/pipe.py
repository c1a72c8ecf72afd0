"""The loader's stream of many Redis commands, on the one Redis layer (`sidecar.resp`).

A full sync sends a million versioned writes: commands are packed into one buffer by the
caller, and their replies are tallied in a `Batch` as they arrive, with a bound on how many
are in flight, instead of one awaited future each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import hiredis

from sidecar.resp import (
    Arg,
    Connection,
    RedisUnavailable,
    Tally,
    connect,
    encode_command,
)

#: At most this many commands are sent and not yet answered; the sender waits beyond it.
MAX_IN_FLIGHT = 20000


@dataclass(slots=True)
class Batch(Tally):
    """The tally of a group of writes: how many Redis applied, kept out or refused.

    A command's reply is 1 (applied), another integer (kept out), a pair [applied, kept
    out] for a command that writes several keys, or an error.
    """

    #: Commands sent, and commands answered.
    expected: int = 0
    answered: int = 0
    applied: int = 0
    kept_out: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, reply: Any) -> None:
        """Count one reply."""
        self.answered += 1
        if isinstance(reply, hiredis.ReplyError):
            self.errors.append(str(reply))
        elif reply == 1:
            self.applied += 1
        elif isinstance(reply, list):
            self.applied += reply[0]
            self.kept_out += reply[1]
        else:
            self.kept_out += 1


class Pipe:
    """One connection to Redis for the loader; use `open` to make one."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, url: str, *, connect_timeout: float) -> Pipe:
        """Connect to the Redis at *url* (redis://, rediss://, unix://) in *connect_timeout* s."""
        return cls(await connect(url, connect_timeout=connect_timeout))

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply; raise `RedisError` on an error reply."""
        return await self.request(encode_command(args))

    async def request(self, data: bytes) -> Any:
        """Send one packed command and return its reply; raise `RedisError` on an error reply."""
        await self._room()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._conn.send(data, future, flush=True)
        await self._conn.drain()
        return await future

    async def send(self, data: bytes, count: int, batch: Batch) -> None:
        """Send *count* packed commands in *data*; their replies are tallied in *batch*."""
        await self._room()
        batch.expected += count
        self._conn.send(data, batch, count=count, flush=True)
        await self._conn.drain()
        self._check()

    async def wait(self, batch: Batch) -> Batch:
        """Wait until every command tallied in *batch* has its reply; return *batch*."""
        conn = self._conn
        while batch.answered < batch.expected:
            self._check()
            conn.progress.clear()
            await conn.progress.wait()
        return batch

    async def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    async def _room(self) -> None:
        conn = self._conn
        while len(conn.pending) >= MAX_IN_FLIGHT:
            self._check()
            conn.progress.clear()
            await conn.progress.wait()
        self._check()

    def _check(self) -> None:
        error = self._conn.error
        if error is not None:
            raise RedisUnavailable(str(error)) from error
