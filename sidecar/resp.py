"""The one Redis layer under the sidecar and the loader: RESP encoding and a pipelined connection.

A `Connection` writes commands as they come and hands each reply to the oldest waiter (Redis
answers a connection's commands in the order it received them); hiredis parses.  `connect`
opens one from a Redis URL (redis://, rediss://, unix://, with AUTH and SELECT), the same
way for both processes.  On top of it:

- the sidecar's `RespClient`: one long-lived connection whose commands of one event-loop
  tick travel in one write, failing closed (a connection error, or any reply later than its
  timeout, fails every command in flight and drops the connection; the next connects again);
- the loader's ``loader.pipe.Pipe``: a bounded stream of many commands, whose replies are
  tallied rather than awaited one by one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

import hiredis
from redis.connection import parse_url

from sidecar.options import SENTINEL_SCHEMES, redact_url

if TYPE_CHECKING:
    from sidecar.cluster import ClusterClient

log = logging.getLogger(__name__)

#: Seconds between a command's deadline and the second look that fails it.
_SECOND_LOOK = 0.01
#: Least seconds between two attempts of a client to connect: an outage costs Redis (or its
#: sentinels) a few connections a second, not one per request.
RECONNECT_PAUSE = 0.05


class RedisError(Exception):
    """Redis could not be used: the base of this layer's errors."""


class RedisUnavailable(RedisError):
    """Redis could not be reached, or did not answer in time."""


class RedisTimeout(RedisUnavailable):
    """Redis did not answer in time."""


class ReplyError(RedisError):
    """Redis answered a command with an error."""


Arg = bytes | str | int


def bulk(arg: Arg) -> bytes:
    """Encode *arg* as one argument of a RESP command (a bulk string)."""
    if isinstance(arg, str):
        b = arg.encode()
    elif isinstance(arg, int):
        b = b"%d" % arg
    else:
        b = arg
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_bulks(bulks: list[bytes]) -> bytes:
    """Encode one RESP command from its arguments, each already encoded by `bulk`.

    A caller that sends the same arguments again and again can encode them once.
    """
    return b"*%d\r\n%s" % (len(bulks), b"".join(bulks))


def encode_command(args: tuple[Arg, ...]) -> bytes:
    """Encode *args* as one RESP command."""
    return encode_bulks([bulk(arg) for arg in args])


class Tally:
    """A waiter for many replies that counts them instead of returning each (see `Connection`)."""

    __slots__ = ()

    def add(self, reply: Any) -> None:
        """Take one reply (a ``hiredis.ReplyError`` for an error reply)."""
        raise NotImplementedError


#: Who gets a reply: a future (its result, or ReplyError), or a `Tally`.
Waiter = asyncio.Future[Any] | Tally


class Connection(asyncio.Protocol):
    """One connection to Redis; `connect` opens one.

    `send` queues a command and its waiter.  Commands are written when the event loop turns
    over, all those of one tick in one write, or at once with *flush*.  When the connection
    is lost or aborted, every waiting future fails with `RedisUnavailable` (or the error
    given to `abort`), and so does every later `send`.
    """

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        #: Each command sent and not yet answered: its waiter, and when it was sent.
        self.pending: collections.deque[tuple[Waiter, float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        #: Why the connection is unusable, once it is.
        self.error: RedisUnavailable | None = None
        #: Set whenever replies arrive, the connection is lost, or writing may resume.
        self.progress = asyncio.Event()
        self._outbox: list[bytes] = []
        self._writable = True
        self._on_lost: list[Any] = []
        #: Whether the server is a node of a Redis Cluster (``INFO cluster``), set by `connect`.
        self.cluster_enabled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, command: bytes, waiter: Waiter, *, count: int = 1, flush: bool = False) -> None:
        """Queue the packed *command* (*count* commands for a `Tally`) for *waiter*."""
        if self.error is not None:
            raise RedisUnavailable(str(self.error))
        loop = asyncio.get_running_loop()
        if not self._outbox and not flush:
            loop.call_soon(self.flush)
        self._outbox.append(command)
        now = loop.time()
        if count == 1:
            self.pending.append((waiter, now))
        else:
            self.pending.extend([(waiter, now)] * count)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Write every queued command now."""
        if self._outbox and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._outbox))
        self._outbox.clear()

    async def drain(self) -> None:
        """Wait until the transport's buffer has room again (see `pause_writing`)."""
        while not self._writable and self.error is None:
            self.progress.clear()
            await self.progress.wait()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self.progress.set()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        demoted = False
        try:
            while (reply := self.reader.gets()) is not False:
                if not pending:
                    self.abort("reply without a request")
                    return
                waiter = pending.popleft()[0]
                if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("READONLY"):
                    demoted = True
                if isinstance(waiter, Tally):
                    waiter.add(reply)
                elif not waiter.done():
                    if isinstance(reply, hiredis.ReplyError):
                        waiter.set_exception(ReplyError(str(reply)))
                    else:
                        waiter.set_result(reply)
        except hiredis.ProtocolError as e:
            self.abort(f"protocol error: {e}")
        if demoted:
            # A master demoted by a failover: drop it, so the next command finds the master.
            self.abort("the server is a replica now (READONLY)")
        self.progress.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost: {exc}" if exc else "connection closed")
        for callback in self._on_lost:
            callback(self)

    def on_lost(self, callback: Any) -> None:
        """Call *callback* with this connection once it is lost."""
        self._on_lost.append(callback)

    def fail(self, why: str, error: type[RedisUnavailable] = RedisUnavailable) -> None:
        """Fail every command in flight, and every later one, with *error*(*why*)."""
        if self.error is None:
            self.error = error(why)
        while self.pending:
            waiter = self.pending.popleft()[0]
            if not isinstance(waiter, Tally) and not waiter.done():
                waiter.set_exception(error(why))
        self.progress.set()

    def abort(self, why: str, error: type[RedisUnavailable] = RedisUnavailable) -> None:
        """`fail` with *why*, and drop the connection."""
        self.fail(why, error)
        if self.transport is not None:
            self.transport.abort()

    async def call(self, *args: Arg) -> Any:
        """Send one command now and return its reply; raise `ReplyError` or `RedisUnavailable`."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.send(encode_command(args), fut, flush=True)
        return await fut

    def close(self) -> None:
        """Close the connection; commands in flight fail."""
        self.fail("connection closed")
        if self.transport is not None:
            self.transport.close()


async def connect(url: str, *, connect_timeout: float) -> Connection:
    """Connect to the Redis at *url* (redis://, rediss://, unix://) in *connect_timeout* s.

    The URL's password (with its user name, if any) is sent with AUTH, its database with
    SELECT; the connection's `Connection.cluster_enabled` tells whether the server is a node
    of a Redis Cluster.  A redis+sentinel:// or rediss+sentinel://
    URL reaches the master its sentinels name (see `sidecar.sentinel`).  Raise
    `RedisTimeout`, or `RedisUnavailable` naming the URL without its password.
    """
    if url.startswith(SENTINEL_SCHEMES):
        # Imported here: sidecar.sentinel is built on this module.
        from sidecar.sentinel import connect_master

        return await connect_master(url, connect_timeout=connect_timeout)
    params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    conn = Connection()
    where = redact_url(url)
    try:
        async with asyncio.timeout(connect_timeout):
            if "path" in params:
                await loop.create_unix_connection(lambda: conn, params["path"])
            else:
                tls = ssl.create_default_context() if url.startswith("rediss:") else None
                host, port = params.get("host", "localhost"), params.get("port", 6379)
                await loop.create_connection(lambda: conn, host, port, ssl=tls)
            setup: list[asyncio.Future[Any]] = []
            if params.get("password") is not None:
                user, secret = params.get("username"), params["password"]
                setup.append(loop.create_future())
                auth = ("AUTH", user, secret) if user else ("AUTH", secret)
                conn.send(encode_command(auth), setup[-1])
            if params.get("db"):
                setup.append(loop.create_future())
                conn.send(encode_command(("SELECT", int(params["db"]))), setup[-1])
            conn.flush()
            await asyncio.gather(*setup)
            conn.cluster_enabled = await _in_cluster(conn)
    except TimeoutError as e:
        conn.abort("connect timed out")
        raise RedisTimeout(f"cannot connect to Redis at {where}: timed out") from e
    except (OSError, RedisError) as e:
        conn.abort("connect failed")
        raise RedisUnavailable(
            f"cannot connect to Redis at {where}: {e or type(e).__name__}"
        ) from e
    return conn


async def _in_cluster(conn: Connection) -> bool:
    """Tell whether the server on *conn* is a node of a Redis Cluster.

    A server that refuses INFO (a managed Redis may rename it) is taken as a plain one.
    """
    try:
        info = await conn.call("INFO", "cluster")
    except ReplyError:
        return False
    return b"cluster_enabled:1" in info


class RespClient:
    """Send commands to the Redis at *url* over one pipelined connection, reconnecting.

    When that Redis is a node of a Redis Cluster, the client finds it out on connecting and
    from then on sends each command to the master of its slot (see `sidecar.cluster`), which
    the caller names with *slot*.  A *cluster_node* client talks to its node only.
    """

    def __init__(self, url: str, *, timeout: float, cluster_node: bool = False) -> None:
        self.url = url
        self.timeout = timeout
        #: The Cluster behind *url*, once connecting found one.
        self.cluster: ClusterClient | None = None
        self._cluster_node = cluster_node
        self._conn: Connection | None = None
        self._connecting: asyncio.Future[Connection | None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._suspect: Waiter | None = None
        self._last_attempt = -RECONNECT_PAUSE

    @property
    def connected(self) -> bool:
        """Tell whether commands can be sent now, without connecting first."""
        conn = self._conn
        return self.cluster is not None or (conn is not None and conn.error is None)

    async def connect(self) -> None:
        """Connect, unless connected; raise `RedisUnavailable` if that fails."""
        if not self.connected:
            await self._connect()

    async def execute(self, *args: Arg, slot: int | None = None) -> Any:
        """Send one command and return its reply; raise `RedisUnavailable` or `ReplyError`.

        *slot* is the Cluster slot of the command's keys; in a Cluster, a command without one
        goes to the master of slot 0.
        """
        return await self.execute_encoded(encode_command(args), slot=slot)

    async def execute_encoded(self, command: bytes, *, slot: int | None = None) -> Any:
        """`execute` the *command* encoded by `encode_command` or `encode_bulks`."""
        await self.connect()
        fut = self.send_encoded(command, slot=slot)
        if fut is None:
            raise RedisUnavailable("connection lost")
        return await fut

    def send(
        self, *args: Arg, flush: bool = False, slot: int | None = None
    ) -> asyncio.Future[Any] | None:
        """Send one command on the open connection and return the future of its reply.

        The command is written when the event loop turns over, with the others of this tick;
        *flush* writes it (and any waiting) now.  Return None, sending nothing, when no
        connection is open.  *slot* is as for `execute`.
        """
        return self.send_encoded(encode_command(args), flush=flush, slot=slot)

    def send_encoded(
        self, command: bytes, *, flush: bool = False, slot: int | None = None
    ) -> asyncio.Future[Any] | None:
        """`send` the *command* encoded by `encode_command` or `encode_bulks`."""
        if self.cluster is not None:
            return self.cluster.send_encoded(command, 0 if slot is None else slot)
        conn = self._conn
        if conn is None or conn.error is not None:  # not connected, or dropped a moment ago
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        conn.send(command, fut, flush=flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._check)
        return fut

    async def aclose(self) -> None:
        """Close the connection; commands in flight fail."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self.cluster is not None:
            await self.cluster.aclose()

    def _check(self) -> None:
        """Fail everything in flight if the oldest command waited longer than the timeout.

        Timers run before the event loop reads its sockets, so after the loop was busy a
        reply may be waiting unread.  A command past its time is therefore given one more
        read of the sockets (a short second look) before it counts as unanswered.
        """
        self._watchdog = None
        conn = self._conn
        if conn is None or not conn.pending:
            return
        loop = asyncio.get_running_loop()
        oldest_waiter, oldest = conn.pending[0]
        if loop.time() - oldest < self.timeout:
            self._watchdog = loop.call_at(oldest + self.timeout, self._check)
            return
        if self._suspect is not oldest_waiter:
            self._suspect = oldest_waiter
            self._watchdog = loop.call_later(_SECOND_LOOK, self._check)
            return
        # Debug only: the verifier's outage log reports the requests this refuses.
        log.debug("redis did not answer within %.3fs; reconnecting", self.timeout)
        self._conn = None
        conn.abort("timed out", RedisTimeout)

    def _lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connect(self) -> Connection | None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future[Connection | None]) -> None:
        self._connecting = None
        if not fut.cancelled() and fut.exception() is None:
            self._conn = fut.result()

    async def _open(self) -> Connection | None:
        loop = asyncio.get_running_loop()
        if (wait := self._last_attempt + RECONNECT_PAUSE - loop.time()) > 0:
            await asyncio.sleep(wait)  # the commands asking meanwhile wait for this attempt
        self._last_attempt = loop.time()
        started = time.monotonic()
        conn = await connect(self.url, connect_timeout=self.timeout)
        if conn.cluster_enabled and not self._cluster_node:
            # Imported here: sidecar.cluster is built on this module.
            from sidecar.cluster import ClusterClient

            cluster = ClusterClient(self.url, timeout=self.timeout)
            try:
                async with asyncio.timeout(self.timeout):
                    await cluster.start(conn)
            except TimeoutError as e:
                raise RedisTimeout("the Cluster's slot map did not come in time") from e
            finally:
                conn.close()
            self.cluster = cluster
            return None
        conn.on_lost(self._lost)
        log.debug("connected to redis in %.1f ms", (time.monotonic() - started) * 1000)
        return conn
