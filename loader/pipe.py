"""The loader's stream of many Redis commands, on the one Redis layer (`sidecar.resp`).

A full sync sends a million versioned writes: commands are packed into one buffer by the
caller, and their replies are tallied in a `Batch` as they arrive, with a bound on how many
are in flight, instead of one awaited future each.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import hiredis

from sidecar.cluster import Address, SlotMap, node_url, redirection, remember, seeds
from sidecar.options import redact_url
from sidecar.resp import (
    RECONNECT_PAUSE,
    Arg,
    Connection,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
    Tally,
    Waiter,
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
        """Connect to the one Redis at *url* (redis://, rediss://, unix://) in *connect_timeout* s.

        A node of a Redis Cluster is refused: `open_pipe` opens a `ClusterPipe` to it.
        """
        conn = await connect(url, connect_timeout=connect_timeout)
        if conn.cluster_enabled:
            conn.close()
            raise RedisUnavailable(f"{redact_url(url)} is a node of a Redis Cluster")
        return cls(conn)

    async def call(self, *args: Arg, slot: int = 0) -> Any:
        """Send one command and return its reply; raise `RedisError` on an error reply.

        *slot*, the Cluster slot of the command's keys, is for a `ClusterPipe`: one Redis
        holds them all.
        """
        return await self.request(encode_command(args))

    async def request(self, data: bytes) -> Any:
        """Send one packed command and return its reply; raise `RedisError` on an error reply."""
        await self.room()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._conn.send(data, future, flush=True)
        await self._conn.drain()
        return await future

    async def load_script(self, script: str) -> bytes:
        """Load *script* into Redis; return its SHA1."""
        sha = await self.call("SCRIPT", "LOAD", script)
        return sha.encode() if isinstance(sha, str) else bytes(sha)

    async def send(self, data: bytes, count: int, batch: Batch) -> None:
        """Send *count* packed commands in *data*; their replies are tallied in *batch*."""
        await self.room()
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

    def send_now(self, data: bytes, waiter: Waiter, *, flush: bool = True) -> None:
        """Send the packed command *data* for *waiter*: written now, or with the next `flush`."""
        self._conn.send(data, waiter, flush=flush)

    def flush(self) -> None:
        """Write the commands sent and not written yet."""
        self._conn.flush()

    async def drain(self) -> None:
        """Wait until the connection takes writes again; raise if it is lost."""
        await self._conn.drain()
        self._check()

    async def room(self) -> None:
        """Wait until fewer than MAX_IN_FLIGHT commands wait for their replies."""
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


async def open_pipe(url: str, *, connect_timeout: float) -> Pipe | ClusterPipe:
    """Connect to the Redis at *url*: a `Pipe`, or a `ClusterPipe` when it is a Cluster node.

    When *url* names a Cluster node that does not answer, the Cluster's other masters seen
    through it before are tried in turn (a failover may have replaced it).
    """
    first, *others = seeds(url)
    try:
        conn = await connect(first, connect_timeout=connect_timeout)
    except RedisUnavailable:
        for other in others:
            with contextlib.suppress(RedisUnavailable):
                conn = await connect(other, connect_timeout=connect_timeout)
                break
        else:
            raise
    if not conn.cluster_enabled:
        return Pipe(conn)
    try:
        async with asyncio.timeout(connect_timeout):
            slots = await conn.call("CLUSTER", "SLOTS")
    except TimeoutError as e:
        raise RedisTimeout("the Cluster's slot map did not come in time") from e
    finally:
        conn.close()
    pipe = ClusterPipe(url, slots, connect_timeout=connect_timeout)
    remember(url, pipe.map)
    return pipe


#: Redirections one command follows before it counts as refused: a map changing under it, or
#: a slot whose keys are halfway to another master (TRYAGAIN, every RECONNECT_PAUSE: 2 s).
MAX_REDIRECTS = 40
_ASKING = encode_command(("ASKING",))


class _Ignored(Tally):
    """Replies nobody needs (to ASKING)."""

    def add(self, reply: Any) -> None:
        pass


_IGNORED = _Ignored()


@dataclass(slots=True)
class _Left:
    """How many replies a `ClusterPipe.request_many` still waits for, and what to wake."""

    count: int
    progress: asyncio.Event


class _Collected(Tally):
    """Replies of one master to `ClusterPipe.request_many`, each put in its place in *out*."""

    __slots__ = ("at", "left", "out", "where")

    def __init__(self, out: list[Any], where: list[int], left: _Left) -> None:
        self.out, self.where, self.left, self.at = out, where, left, 0

    def add(self, reply: Any) -> None:
        self.out[self.where[self.at]] = reply
        self.at += 1
        self.left.count -= 1
        if not self.left.count:
            self.left.progress.set()


class _Routed(Tally):
    """One command of a tallied stream to a Cluster, following its redirections."""

    __slots__ = ("batch", "data", "hops", "pipe", "slot")

    def __init__(self, pipe: ClusterPipe, batch: Batch, slot: int, data: bytes) -> None:
        self.pipe, self.batch, self.slot, self.data, self.hops = pipe, batch, slot, data, 0

    def add(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError) and self.hops < MAX_REDIRECTS:
            where = redirection(str(reply), self.pipe.default_host)
            if where is not None:
                self.hops += 1
                self.pipe.redirect(self, *where)
                return
        self.batch.add(reply)
        self.pipe.progress.set()


class ClusterPipe:
    """The loader's streams to a Redis Cluster: a `Pipe` to each master, by slot.

    *slots* is a ``CLUSTER SLOTS`` reply.  Every command names the slot of its keys; a command
    a master redirects (``MOVED``, ``ASK``, ``TRYAGAIN``) is sent again where it points, and
    ``MOVED`` refreshes the slot map.  The scripts given to `load_script` are loaded into each
    master as the pipe connects to it.  When a master's connection is lost the pipe is broken,
    as a `Pipe` is: the loader opens another.
    """

    def __init__(self, url: str, slots: list[Any], *, connect_timeout: float) -> None:
        self.url = url
        self._seed = urlsplit(url)
        self.default_host = self._seed.hostname or "127.0.0.1"
        self.map = SlotMap(slots, self.default_host)
        self.connect_timeout = connect_timeout
        self.pipes: dict[Address, Pipe] = {}
        self._connecting: dict[Address, asyncio.Future[Pipe]] = {}
        self._scripts: list[str] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        #: Why the pipe is broken, once it is.
        self.error: RedisError | None = None
        #: Set whenever a tallied reply arrives, or a connection is lost.
        self.progress = asyncio.Event()

    @property
    def masters(self) -> list[Address]:
        """Return the address of each master, as the slot map has them."""
        return list(self.map.masters)

    async def load_script(self, script: str) -> bytes:
        """Load *script* into every master (and each met later); return its SHA1."""
        self._scripts.append(script)
        shas = {await (await self._pipe(a)).call("SCRIPT", "LOAD", script) for a in self.masters}
        (sha,) = shas
        return sha.encode() if isinstance(sha, str) else bytes(sha)

    async def call(self, *args: Arg, slot: int = 0, node: Address | None = None) -> Any:
        """Send one command for the keys in *slot* (or to *node*) and return its reply."""
        return await self.request(encode_command(args), slot=slot, node=node)

    async def request(self, data: bytes, *, slot: int = 0, node: Address | None = None) -> Any:
        """Send one packed command for the keys in *slot* (or to *node*); return its reply."""
        addr = node or self._owner(slot)
        asking = False
        for _ in range(MAX_REDIRECTS):
            pipe = await self._pipe(addr)
            if asking:
                pipe.send_now(_ASKING, _IGNORED)
            try:
                return await pipe.request(data)
            except ReplyError as e:
                where = None if node else redirection(str(e), self.default_host)
                if where is None:
                    raise
                to, asking = where
                if to is None:
                    await asyncio.sleep(RECONNECT_PAUSE)
                else:
                    addr = to
                    if not asking:
                        self.map.owners[slot] = to
                        await self.refresh()
        return await (await self._pipe(addr)).request(data)

    async def request_many(self, commands: list[tuple[int, bytes]]) -> list[Any]:
        """Send each (slot, packed command) of *commands* and return their replies, in order.

        They travel together, one write per master; the few a master redirects follow.
        """
        out: list[Any] = [None] * len(commands)
        by_node: dict[Address, list[int]] = {}
        for i, (slot, _) in enumerate(commands):
            by_node.setdefault(self._owner(slot), []).append(i)
        left = _Left(len(commands), self.progress)
        for addr, where in by_node.items():
            pipe = await self._pipe(addr)
            await pipe.room()
            collected = _Collected(out, where, left)
            for i in where:
                pipe.send_now(commands[i][1], collected, flush=False)
            pipe.flush()
        while left.count:
            self._check()
            self.progress.clear()
            await self.progress.wait()
        for i, reply in enumerate(out):
            if isinstance(reply, hiredis.ReplyError):  # a redirection, or a refusal
                out[i] = await self.request(commands[i][1], slot=commands[i][0])
        return out

    async def send(self, commands: list[tuple[int, bytes]], batch: Batch) -> None:
        """Send each (slot, packed command) of *commands*; their replies are tallied in *batch*."""
        by_node: dict[Address, list[tuple[int, bytes]]] = {}
        for slot, data in commands:
            by_node.setdefault(self._owner(slot), []).append((slot, data))
        for addr, group in by_node.items():
            pipe = await self._pipe(addr)
            await pipe.room()
            batch.expected += len(group)
            for slot, data in group:
                pipe.send_now(data, _Routed(self, batch, slot, data), flush=False)
            pipe.flush()
            await pipe.drain()
        self._check()

    def redirect(self, routed: _Routed, to: Address | None, asking: bool) -> None:
        """Send the command of *routed* again where a redirection points."""
        if to is not None and not asking:
            self.map.owners[routed.slot] = to
        task = asyncio.ensure_future(self._resend(routed, to, asking))
        self._tasks.add(task)
        task.add_done_callback(self._resent)

    async def _resend(self, routed: _Routed, to: Address | None, asking: bool) -> None:
        if to is None:
            await asyncio.sleep(RECONNECT_PAUSE)
        pipe = await self._pipe(to or self._owner(routed.slot))
        if asking:
            pipe.send_now(_ASKING, _IGNORED, flush=False)
        pipe.send_now(routed.data, routed)

    def _resent(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            self._broken(RedisUnavailable(f"cannot follow a redirection: {e}"))

    async def wait(self, batch: Batch) -> Batch:
        """Wait until every command tallied in *batch* has its reply; return *batch*."""
        while batch.answered < batch.expected:
            self._check()
            self.progress.clear()
            await self.progress.wait()
        return batch

    async def refresh(self) -> None:
        """Take the slot map again from a master that gives it."""
        for addr in self.masters:
            try:
                slots = await (await self._pipe(addr)).call("CLUSTER", "SLOTS")
            except RedisError:
                continue
            self.map = SlotMap(slots, self.default_host)
            remember(self.url, self.map)
            return

    async def problem(self) -> str | None:
        """Return why the Cluster cannot take every write now, or None when it can."""
        if unserved := self.map.unserved():
            return f"{unserved} slots of the Redis Cluster have no master"
        for addr in self.masters:
            info = await self.call("CLUSTER", "INFO", node=addr)
            if b"cluster_state:ok" not in info:
                return f"the master at {addr[0]}:{addr[1]} says the Redis Cluster is not ok"
        return None

    async def close(self) -> None:
        """Close every connection."""
        for task in list(self._tasks):
            task.cancel()
        for pipe in self.pipes.values():
            await pipe.close()

    def _owner(self, slot: int) -> Address:
        owner = self.map.owners[slot]
        if owner is None:
            raise RedisUnavailable(f"no master of the Redis Cluster serves slot {slot}")
        return owner

    async def _pipe(self, addr: Address) -> Pipe:
        pipe = self.pipes.get(addr)
        if pipe is not None:
            return pipe
        connecting = self._connecting.get(addr)
        if connecting is None:
            connecting = self._connecting[addr] = asyncio.ensure_future(self._open(addr))
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting.pop(addr, None)

    async def _open(self, addr: Address) -> Pipe:
        url = node_url(self._seed, addr)
        conn = await connect(url, connect_timeout=self.connect_timeout)
        conn.on_lost(lambda _: self._broken(RedisUnavailable(f"lost {addr[0]}:{addr[1]}")))
        pipe = Pipe(conn)
        for script in self._scripts:
            await pipe.call("SCRIPT", "LOAD", script)
        self.pipes[addr] = pipe
        return pipe

    def _broken(self, error: RedisError) -> None:
        if self.error is None:
            self.error = error
        self.progress.set()

    def _check(self) -> None:
        if self.error is not None:
            raise RedisUnavailable(str(self.error)) from self.error
