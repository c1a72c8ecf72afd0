"""A Redis connection that streams many commands and reads their replies in order.

redis-py's pipelines spend more time in Python per command than Redis spends running the
scripts; a million versioned writes need the bare protocol: commands packed into one buffer,
replies parsed by hiredis as they arrive, with a bound on how many are in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from sidecar.options import redact_url
from sidecar.resp import encode_command

Arg = bytes | str | int

#: At most this many commands are sent and not yet answered; the sender waits beyond it.
MAX_IN_FLIGHT = 20000


class PipeError(ConnectionError):
    """The connection to Redis broke or Redis answered with an error."""


@dataclass(slots=True)
class Batch:
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


class Pipe:
    """One connection to Redis; use `open` to make one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future[Any] | Batch] = collections.deque()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._broken: BaseException | None = None
        self._pump = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def open(cls, url: str, *, connect_timeout: float) -> Pipe:
        """Connect to the Redis at *url* (redis://, rediss://, unix://) in *connect_timeout* s."""
        params = parse_url(url)
        kind = params.get("connection_class")
        try:
            async with asyncio.timeout(connect_timeout):
                if kind is UnixDomainSocketConnection:
                    reader, writer = await asyncio.open_unix_connection(params["path"])
                else:
                    tls = ssl.create_default_context() if kind is SSLConnection else None
                    reader, writer = await asyncio.open_connection(
                        params.get("host", "localhost"), int(params.get("port", 6379)), ssl=tls
                    )
                pipe = cls(reader, writer)
                if params.get("password") is not None:
                    user = params.get("username")
                    secret = params["password"]
                    await pipe.call(*(("AUTH", user, secret) if user else ("AUTH", secret)))
                if int(params.get("db", 0)):
                    await pipe.call("SELECT", int(params["db"]))
        except (OSError, TimeoutError) as e:
            raise PipeError(
                f"cannot connect to Redis at {redact_url(url)}: {e or 'timed out'}"
            ) from e
        return pipe

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply; raise PipeError on an error reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._send(encode_command(args), 1, future)
        return await future

    async def request(self, data: bytes) -> Any:
        """Send one packed command and return its reply; raise PipeError on an error reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._send(data, 1, future)
        return await future

    async def send(self, data: bytes, count: int, batch: Batch) -> None:
        """Send *count* packed commands in *data*; their replies are tallied in *batch*."""
        batch.expected += count
        await self._send(data, count, batch)

    async def wait(self, batch: Batch) -> Batch:
        """Wait until every command tallied in *batch* has its reply; return *batch*."""
        while batch.answered < batch.expected:
            self._check()
            self._room.clear()
            await self._room.wait()
        return batch

    async def close(self) -> None:
        """Close the connection."""
        self._pump.cancel()
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()
        self._fail(PipeError("pipe closed"))

    async def _send(self, data: bytes, count: int, waiter: asyncio.Future[Any] | Batch) -> None:
        while self._in_flight >= MAX_IN_FLIGHT:
            self._check()
            self._room.clear()
            await self._room.wait()
        self._check()
        self._in_flight += count
        for _ in range(count if isinstance(waiter, Batch) else 1):
            self._waiting.append(waiter)
        self._writer.write(data)
        try:
            await self._writer.drain()
        except OSError as e:
            self._fail(PipeError(f"Redis connection lost: {e}"))
            self._check()

    def _check(self) -> None:
        if self._broken is not None:
            raise PipeError(str(self._broken)) from self._broken

    async def _read_replies(self) -> None:
        try:
            while True:
                data = await self._reader.read(1 << 18)
                if not data:
                    raise PipeError("Redis closed the connection")
                self._parser.feed(data)
                while (reply := self._parser.gets()) is not False:
                    self._dispatch(reply)
                self._room.set()
        except (OSError, PipeError, hiredis.ProtocolError) as e:
            self._fail(e if isinstance(e, PipeError) else PipeError(f"Redis connection lost: {e}"))

    def _dispatch(self, reply: Any) -> None:
        waiter = self._waiting.popleft()
        self._in_flight -= 1
        if isinstance(waiter, Batch):
            waiter.answered += 1
            if isinstance(reply, hiredis.ReplyError):
                waiter.errors.append(str(reply))
            elif reply == 1:
                waiter.applied += 1
            elif isinstance(reply, list):
                waiter.applied += reply[0]
                waiter.kept_out += reply[1]
            else:
                waiter.kept_out += 1
        elif not waiter.done():
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(PipeError(f"Redis error: {reply}"))
            else:
                waiter.set_result(reply)

    def _fail(self, error: BaseException) -> None:
        if self._broken is None:
            self._broken = error
        while self._waiting:
            waiter = self._waiting.popleft()
            if not isinstance(waiter, Batch) and not waiter.done():
                waiter.set_exception(PipeError(str(error)))
        self._room.set()
