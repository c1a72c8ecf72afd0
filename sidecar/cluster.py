"""The sidecar's way into a Redis Cluster: each command to the master of its slot.

The slot map comes from ``CLUSTER SLOTS``, asked of any node that answers.  Each master gets
its own pipelined `RespClient`, so the commands of one event-loop tick for one node travel in
one write, and each node's commands time out on their own.  A ``MOVED`` reply re-sends the
command where it points and refreshes the map (a resharding, a failover); an ``ASK`` reply
re-sends it there once, after ``ASKING`` (a slot on its way to another node).  Anything else
fails the command, and the caller refuses the request: a Cluster in trouble fails closed.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from sidecar.resp import (
    RECONNECT_PAUSE,
    Arg,
    Connection,
    RedisError,
    RedisUnavailable,
    ReplyError,
    RespClient,
    encode_command,
)
from sidecar.slots import SLOTS

log = logging.getLogger(__name__)

#: A node's address: host and port.
Address = tuple[str, int]

#: Most redirections one command follows before it fails (a map changing under it).
MAX_REDIRECTS = 5

_ASKING = encode_command((b"ASKING",))


class SlotMap:
    """Which master serves each slot, as a ``CLUSTER SLOTS`` reply tells."""

    def __init__(self, reply: list[Any], default_host: str) -> None:
        self.owners: list[Address | None] = [None] * SLOTS
        masters: dict[Address, list[int]] = {}
        for start, end, master, *_replicas in reply:
            addr = _address(master[0], master[1], default_host)
            masters.setdefault(addr, []).append(int(start))
            for slot in range(int(start), int(end) + 1):
                self.owners[slot] = addr
        #: Each master, with the first slot of each of its ranges.
        self.masters = masters

    def unserved(self) -> int:
        """Return how many slots no master serves."""
        return self.owners.count(None)


#: Every master each Cluster URL led to, as last seen: where to start when that node is down.
_known: dict[str, list[Address]] = {}


def seeds(url: str) -> list[str]:
    """Return the URLs to try, in turn, to reach the Cluster at *url*: it, then its masters."""
    seed = urlsplit(url)
    return [url, *(node_url(seed, addr) for addr in _known.get(url, ()))]


def remember(url: str, slot_map: SlotMap) -> None:
    """Note the masters of *slot_map*, the Cluster reached through *url*."""
    if slot_map.masters:
        _known[url] = list(slot_map.masters)


class ClusterClient:
    """Send commands to the Redis Cluster that the node at *url* belongs to."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._seed = urlsplit(url)
        self._default_host = self._seed.hostname or "127.0.0.1"
        self.map = SlotMap([], self._default_host)
        self.nodes: dict[Address, RespClient] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = -RECONNECT_PAUSE
        self._tasks: set[asyncio.Future[Any]] = set()

    async def start(self, conn: Connection) -> None:
        """Take the slot map from *conn*, a connection to a node of the Cluster."""
        self._use(await conn.call("CLUSTER", "SLOTS"))
        log.info(
            "Redis at %s is a node of a Redis Cluster: %d masters serve %d of %d slots",
            self.where,
            len(self.map.masters),
            SLOTS - self.map.unserved(),
            SLOTS,
        )

    @property
    def where(self) -> str:
        return f"{self._default_host}:{self._seed.port or 6379}"

    def send_encoded(self, command: bytes, slot: int) -> asyncio.Future[Any]:
        """Send the encoded *command*, whose keys are in *slot*; return the future of its reply.

        The future fails with `ReplyError` or `RedisUnavailable`.
        """
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._route(outer, command, slot, self.map.owners[slot], False, 0)
        return outer

    async def execute(self, *args: Arg, slot: int) -> Any:
        """Send one command whose keys are in *slot*, and return its reply."""
        return await self.send_encoded(encode_command(args), slot)

    async def problem(self) -> str | None:
        """Return why the Cluster cannot serve every key now, or None when it can.

        Every slot must be served, and every master must answer with ``cluster_state:ok``.
        """
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
        if unserved := self.map.unserved():
            return f"{unserved} slots have no master"

        async def state(addr: Address) -> str | None:
            try:
                info = await self._node(addr).execute("CLUSTER", "INFO")
            except RedisError as e:
                return f"the master at {addr[0]}:{addr[1]} does not answer: {e}"
            if b"cluster_state:ok" not in info:
                return f"the master at {addr[0]}:{addr[1]} says the Cluster is not ok"
            return None

        states = await asyncio.gather(*(state(a) for a in self.map.masters))
        return next((s for s in states if s is not None), None)

    async def aclose(self) -> None:
        """Close every connection; commands in flight fail."""
        for task in list(self._tasks):
            task.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self.nodes.values():
            await node.aclose()

    def _node(self, addr: Address) -> RespClient:
        node = self.nodes.get(addr)
        if node is None:
            node = self.nodes[addr] = RespClient(
                node_url(self._seed, addr), timeout=self.timeout, cluster_node=True
            )
        return node

    def _route(
        self,
        outer: asyncio.Future[Any],
        command: bytes,
        slot: int,
        addr: Address | None,
        asking: bool,
        hops: int,
    ) -> None:
        if addr is None:
            self.refresh_soon()
            outer.set_exception(RedisUnavailable(f"no master serves slot {slot} (yet)"))
            return
        node = self._node(addr)
        if not node.connected:
            task = asyncio.ensure_future(node.connect())
            self._tasks.add(task)
            task.add_done_callback(
                partial(self._connected, outer, command, slot, addr, asking, hops)
            )
            return
        if asking and (ok := node.send_encoded(_ASKING)) is not None:
            ok.add_done_callback(_ignore)
        inner = node.send_encoded(command)
        if inner is None:  # the connection dropped this instant
            outer.set_exception(RedisUnavailable("connection lost"))
            return
        inner.add_done_callback(partial(self._reply, outer, command, slot, hops))

    def _connected(
        self,
        outer: asyncio.Future[Any],
        command: bytes,
        slot: int,
        addr: Address,
        asking: bool,
        hops: int,
        task: asyncio.Future[Any],
    ) -> None:
        self._tasks.discard(task)
        if outer.done():
            return
        if task.cancelled():
            outer.set_exception(RedisUnavailable("stopping"))
        elif (e := task.exception()) is not None:
            self.refresh_soon()  # the master may be gone: a failover names another
            outer.set_exception(e)
        else:
            self._route(outer, command, slot, addr, asking, hops)

    def _reply(
        self, outer: asyncio.Future[Any], command: bytes, slot: int, hops: int, inner: Any
    ) -> None:
        if outer.done():
            return
        if inner.cancelled():
            outer.set_exception(RedisUnavailable("stopping"))
            return
        e = inner.exception()
        if e is None:
            outer.set_result(inner.result())
            return
        if isinstance(e, ReplyError) and hops < MAX_REDIRECTS:
            where = redirection(str(e), self._default_host)
            if where is not None and where[0] is not None:
                addr, asking = where
                if not asking:
                    self.map.owners[slot] = addr
                    self.refresh_soon()
                self._route(outer, command, slot, addr, asking, hops + 1)
                return
        if isinstance(e, RedisUnavailable):
            self.refresh_soon()
        outer.set_exception(e)

    def refresh_soon(self) -> None:
        """Ask the Cluster for its slot map again, unless that was done a moment ago."""
        loop = asyncio.get_running_loop()
        if self._refreshing is None and loop.time() - self._last_refresh >= RECONNECT_PAUSE:
            self._last_refresh = loop.time()
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and (e := task.exception()) is not None:
            log.debug("could not refresh the Cluster's slot map: %s", e)

    async def _refresh(self) -> None:
        """Take the slot map from the first node that gives one: masters, then the rest."""
        known = [*self.map.masters, *(a for a in self.nodes if a not in self.map.masters)]
        seed = (self._default_host, self._seed.port or 6379)
        errors = []
        for addr in [*known, *([seed] if seed not in known else [])]:
            try:
                reply = await self._node(addr).execute("CLUSTER", "SLOTS")
            except RedisError as e:
                errors.append(f"{addr[0]}:{addr[1]}: {e}")
                continue
            if reply:
                self._use(reply)
                return
        raise RedisUnavailable("no node gave the slot map: " + "; ".join(errors))

    def _use(self, reply: list[Any]) -> None:
        new = SlotMap(reply, self._default_host)
        if new.masters.keys() != self.map.masters.keys():
            log.info(
                "Redis Cluster masters: %s",
                ", ".join(f"{h}:{p}" for h, p in sorted(new.masters)) or "none",
            )
        self.map = new
        remember(self.url, new)


def _address(host: Any, port: Any, default_host: str) -> Address:
    """Return the address a node announces; a node that names no host is on *default_host*."""
    text = host.decode() if isinstance(host, bytes) else str(host)
    return (text if text not in ("", "?") else default_host), int(port)


def node_url(seed: SplitResult, addr: Address) -> str:
    """Return the URL of the node at *addr*, with the seed URL's scheme, credentials and query."""
    scheme = "rediss" if seed.scheme == "rediss" else "redis"
    netloc = seed.netloc.rpartition("@")
    userinfo = netloc[0] + "@" if netloc[1] else ""
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return urlunsplit((scheme, f"{userinfo}{host}:{addr[1]}", "/0", seed.query, ""))


def redirection(error: str, default_host: str) -> tuple[Address | None, bool] | None:
    """Read a Cluster's redirection: (where to, whether to ask first), or None.

    ``MOVED`` and ``ASK`` name the node; ``TRYAGAIN`` (keys of one slot caught halfway
    through a migration) means the same slot again, a moment later (None).
    """
    kind, _, rest = error.partition(" ")
    if kind in ("MOVED", "ASK"):
        host, _, port = rest.partition(" ")[2].rpartition(":")
        return (host or default_host, int(port)), kind == "ASK"
    if kind == "TRYAGAIN":
        return None, False
    return None


def _ignore(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()
