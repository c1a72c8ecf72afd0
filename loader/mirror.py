"""The loader's side of the Redis contract: versioned writes and deletes of key records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from loader.pipe import Batch, ClusterPipe, Pipe, open_pipe
from sidecar.records import (
    DELETE_SCRIPT,
    DRAIN_USED_SCRIPT,
    HASH_LENGTH,
    PUT_MANY_SCRIPT,
    TOMBSTONE_TTL_MS,
    VERSION_HEAD,
    KeyRecord,
    Keyspace,
    body,
)
from sidecar.resp import RedisError, ReplyError, encode_command
from sidecar.slots import SLOTS, key_slot, tag_slot

#: What a Redis call of the loader can raise when the server is down, slow or confused.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

#: Keys written per call of PUT_MANY_SCRIPT: it holds Redis for about a millisecond.
PUT_MANY_KEYS = 200

#: Into a Redis Cluster, writes wait until this many keys are pending (or `Mirror.wait`): a
#: batch of the source spreads over the 16,384 slots, a key or so in each.
CLUSTER_PENDING_KEYS = 50_000

#: How long to wait after reading the clock so that anything read later is strictly newer.
_TICK = 0.002
_NEVER = b"$0\r\n\r\n"
_NEVER_TAIL = b"\r\n" + _NEVER


class Mirror:
    """Write key records under *keyspace* through *pipe*, always with a version.

    Into a Redis Cluster (a `ClusterPipe`), each script call carries the keys of one slot.
    """

    def __init__(self, pipe: Pipe | ClusterPipe, keyspace: Keyspace) -> None:
        self.pipe = pipe
        self.keyspace = keyspace
        self._put_head = b""
        self._delete_head = b""
        # Every record and tombstone key of a valid hash has the same length, so its RESP form
        # is a constant head, the hash and a constant tail (sizes in bytes: a prefix may hold
        # characters that UTF-8 writes in several).
        self._record_parts = _resp_parts(*keyspace.record_around)
        self._tombstone_parts = _resp_parts(*keyspace.tombstone_around)
        self._marks: list[str] | None = None  # a Cluster's loaded mark of each slot
        # A Cluster's writes kept back by `put_bodies`: by slot, and their version and tally.
        self._pending: dict[int, list[tuple[str, bytes, int | None]]] = {}
        self._pending_keys = 0
        self._pending_for: tuple[int, Batch] | None = None

    @classmethod
    async def open(cls, url: str, keyspace: Keyspace, *, connect_timeout: float) -> Mirror:
        """Connect to the Redis at *url* and load the scripts."""
        mirror = cls(await open_pipe(url, connect_timeout=connect_timeout), keyspace)
        try:
            async with asyncio.timeout(connect_timeout):
                await mirror.load_scripts()
        except BaseException:
            await mirror.close()
            raise
        return mirror

    async def load_scripts(self) -> None:
        """Load PUT_MANY_SCRIPT and DELETE_SCRIPT into Redis (again after a restart)."""
        put = await self.pipe.load_script(PUT_MANY_SCRIPT)
        delete = await self.pipe.load_script(DELETE_SCRIPT)
        self._put_head = b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % put
        self._delete_head = b"*7\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n" % delete

    async def close(self) -> None:
        """Close the connection."""
        await self.pipe.close()

    async def version(self) -> int:
        """Return Redis's clock in milliseconds, once it has ticked past what it returns.

        Anything the caller reads from the source afterwards is newer than the version, so
        a change committed after that read always gets a strictly greater version.
        """
        seconds, micros = await self.pipe.call("TIME")
        await asyncio.sleep(_TICK)
        return int(seconds) * 1000 + int(micros) // 1000

    async def fetch(self, key_hashes: Sequence[str]) -> list[bytes | None]:
        """Return the stored record of each of *key_hashes* (None where there is none)."""
        return await self.fetch_keys(self.keyspace.record_keys(key_hashes))

    async def fetch_keys(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Return the value of each of the Redis *keys* (None where there is none)."""
        if not keys:
            return []
        if isinstance(self.pipe, ClusterPipe):
            return await self._fetch_by_slot(self.pipe, keys)
        size = len(keys[0])
        if len(set(map(len, keys))) == 1:
            args = b"$%d\r\n%s\r\n" % (size, (b"\r\n$%d\r\n" % size).join(keys))
        else:
            args = b"".join([b"$%d\r\n%s\r\n" % (len(k), k) for k in keys])
        result: list[bytes | None] = await self.pipe.request(
            b"*%d\r\n$4\r\nMGET\r\n%s" % (len(keys) + 1, args)
        )
        return result

    async def _fetch_by_slot(self, pipe: ClusterPipe, keys: Sequence[bytes]) -> list[bytes | None]:
        """`fetch_keys` from a Cluster: one MGET per slot, all sent together."""
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_slot.setdefault(key_slot(k), []).append(i)
        commands = [
            (slot, encode_command((b"MGET", *[keys[i] for i in where])))
            for slot, where in by_slot.items()
        ]
        out: list[bytes | None] = [None] * len(keys)
        for where, values in zip(by_slot.values(), await pipe.request_many(commands), strict=True):
            for i, value in zip(where, values, strict=True):
                out[i] = value
        return out

    async def put(
        self, records: Iterable[tuple[str, KeyRecord]], *, version: int, batch: Batch
    ) -> None:
        """Send a versioned write of each (hash, record) in *records*; tally them in *batch*."""
        await self.put_bodies(
            [(h, body(r), r.expires_at_ms) for h, r in records], version=version, batch=batch
        )

    async def put_bodies(
        self, bodies: Sequence[tuple[str, bytes, int | None]], *, version: int, batch: Batch
    ) -> None:
        """Like `put`, for (hash, `sidecar.records.body`, expiry) triples already encoded."""
        if not bodies:
            return
        pipe = self.pipe
        if isinstance(pipe, ClusterPipe):
            # One call per slot, a Cluster's calls staying in one: the writes wait (until
            # `wait`, or CLUSTER_PENDING_KEYS) so that each call carries several keys.
            kept = self._pending_for
            if kept is not None and (kept[0] != version or kept[1] is not batch):
                await self._flush(pipe)
            self._pending_for = (version, batch)
            pending = self._pending
            for b in bodies:
                pending.setdefault(tag_slot(b[0].encode()), []).append(b)
            self._pending_keys += len(bodies)
            if self._pending_keys >= CLUSTER_PENDING_KEYS:
                await self._flush(pipe)
        else:
            commands = self._put_commands(bodies, version)
            await pipe.send(b"".join(commands), len(commands), batch)

    async def _flush(self, pipe: ClusterPipe) -> None:
        """Send the writes `put_bodies` keeps back for a Cluster."""
        if self._pending_for is None:
            return
        (version, batch), pending = self._pending_for, self._pending
        self._pending_for, self._pending, self._pending_keys = None, {}, 0
        commands = [
            (slot, command)
            for slot, group in pending.items()
            for command in self._put_commands(group, version)
        ]
        await pipe.send(commands, batch)

    def _put_commands(
        self, bodies: Sequence[tuple[str, bytes, int | None]], version: int
    ) -> list[bytes]:
        """Return the calls of PUT_MANY_SCRIPT that write *bodies* at *version*."""
        # Built as text where it is text (f-strings are the cheapest formatting there is),
        # with one header per payload length: this runs once per key of a full sync.
        rhead, rtail, thead, ttail = [
            p.decode() for p in (*self._record_parts, *self._tombstone_parts)
        ]
        ver = b"%d" % version
        # The payload is encode(record, version=version): the version, then the body.
        lead = VERSION_HEAD + ver
        size = len(lead)
        heads: dict[int, bytes] = {}
        out = []
        for i in range(0, len(bodies), PUT_MANY_KEYS):
            group = bodies[i : i + PUT_MANY_KEYS]
            keys = "".join([f"{rhead}{h}{rtail}{thead}{h}{ttail}" for h, _, _ in group])
            args = []
            for _, payload, expires in group:
                n = size + len(payload)
                head = heads.get(n)
                if head is None:
                    head = heads[n] = b"$%d\r\n%s" % (n, lead)
                args.append(head)
                args.append(payload)
                args.append(
                    _NEVER_TAIL
                    if expires is None
                    else b"\r\n$%d\r\n%d\r\n" % (len(str(expires)), expires)
                )
            n = len(group)
            out.append(
                b"*%d\r\n%s$%d\r\n%d\r\n%s$%d\r\n%s\r\n%s"
                % (
                    4 + 4 * n,
                    self._put_head,
                    len(str(2 * n)),
                    2 * n,
                    keys.encode(),
                    len(ver),
                    ver,
                    b"".join(args),
                )
            )
        return out

    async def delete(self, key_hashes: Iterable[str], *, version: int, batch: Batch) -> None:
        """Send a versioned delete of each of *key_hashes*; tally them in *batch*."""
        head = self._delete_head
        (rhead, rtail), (thead, ttail) = self._record_parts, self._tombstone_parts
        ver = b"%d" % version
        ttl = b"%d" % TOMBSTONE_TTL_MS
        tail = b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ver), ver, len(ttl), ttl)
        out = [
            (hb, b"%s%s%s%s%s%s%s%s" % (head, rhead, hb, rtail, thead, hb, ttail, tail))
            for h in key_hashes
            for hb in (h.encode(),)
        ]
        if not out:
            return
        if isinstance(self.pipe, ClusterPipe):
            await self.pipe.send([(tag_slot(hb), command) for hb, command in out], batch)
        else:
            await self.pipe.send(b"".join([command for _, command in out]), len(out), batch)

    async def wait(self, batch: Batch) -> Batch:
        """Wait for every write tallied in *batch*; raise ReplyError if Redis refused one."""
        kept = self._pending_for
        if isinstance(self.pipe, ClusterPipe) and kept is not None and kept[1] is batch:
            await self._flush(self.pipe)
        await self.pipe.wait(batch)
        if batch.errors:
            raise ReplyError(f"Redis refused {len(batch.errors)} writes: {batch.errors[0]}")
        return batch

    async def scan_keys(self, *, count: int = 10000) -> AsyncIterator[list[bytes]]:
        """Yield the Redis key of every stored record, a SCAN page at a time.

        In a Cluster, each master is scanned in turn; a key that moves to another master
        meanwhile (a resharding) may be missed, and is found by the next reconcile.
        """
        pipe = self.pipe
        pattern = self.keyspace.record_pattern
        for node in pipe.masters if isinstance(pipe, ClusterPipe) else [None]:
            cursor: Any = b"0"
            while True:
                scan = ("SCAN", cursor, "MATCH", pattern, "COUNT", count)
                if isinstance(pipe, ClusterPipe):
                    cursor, keys = await pipe.call(*scan, node=node)
                else:
                    cursor, keys = await pipe.call(*scan)
                if keys:
                    yield keys
                if cursor in (b"0", "0", 0):
                    break

    async def drain_used(self) -> dict[str, int]:
        """Take the sidecars' last-use notes: key id -> last time used (ms)."""
        used = self.keyspace.used
        flat = await self.pipe.call("EVAL", DRAIN_USED_SCRIPT, 1, used, slot=key_slot(used))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): int(float(v))
            for k, v in zip(flat[::2], flat[1::2], strict=True)
        }

    async def restore_used(self, uses: Mapping[str, int]) -> None:
        """Put back notes taken by `drain_used` that could not be stored (newer ones win)."""
        if uses:
            args = [x for key_id, ms in uses.items() for x in (ms, key_id)]
            used = self.keyspace.used
            await self.pipe.call("ZADD", used, "GT", *args, slot=key_slot(used))

    async def begin_load(self) -> None:
        """Make sure the mark exists while a full reconcile runs, so a wipe removes it."""
        if isinstance(self.pipe, ClusterPipe):
            await self._set_marks(self.pipe, 0, b"NX")
        else:
            await self.pipe.call("SET", self.keyspace.loaded, 0, "NX")

    async def mark_loaded(self, version: int) -> bool:
        """Record that a full reconcile at *version* completed.

        Return False when the mark vanished since `begin_load`: Redis lost its data while the
        reconcile ran, and what it wrote before that is gone.
        """
        if isinstance(self.pipe, ClusterPipe):
            replies = await self._set_marks(self.pipe, version, b"XX")
            return all(r is not None for r in replies)
        return await self.pipe.call("SET", self.keyspace.loaded, version, "XX") is not None

    async def is_loaded(self) -> bool:
        """Tell whether Redis still holds the mark of a full reconcile.

        In a Cluster, each master is asked for the mark of its first slot: a master that
        restarted empty lost all of its own.
        """
        pipe = self.pipe
        if not isinstance(pipe, ClusterPipe):
            return bool(await pipe.call("EXISTS", self.keyspace.loaded))
        firsts = [slots[0] for slots in pipe.map.masters.values()]
        commands = [(s, encode_command((b"EXISTS", self.keyspace.loaded_in(s)))) for s in firsts]
        return all(await pipe.request_many(commands))

    async def problem(self) -> str | None:
        """Return why Redis cannot take every write now (a Redis Cluster not ok), or None."""
        if isinstance(self.pipe, ClusterPipe):
            return await self.pipe.problem()
        return None

    async def _set_marks(self, pipe: ClusterPipe, value: int, condition: bytes) -> list[Any]:
        """SET the loaded mark of every slot of a Cluster to *value*, under *condition*."""
        marks = self._marks
        if marks is None:
            marks = self._marks = [self.keyspace.loaded_in(s) for s in range(SLOTS)]
        return await pipe.request_many(
            [(s, encode_command((b"SET", mark, value, condition))) for s, mark in enumerate(marks)]
        )


def _resp_parts(head: str, tail: str) -> tuple[bytes, bytes]:
    """Return the RESP framing of a Redis key of a valid hash: what precedes and follows it."""
    size = len(head.encode()) + HASH_LENGTH + len(tail.encode())
    return b"$%d\r\n%s" % (size, head.encode()), tail.encode() + b"\r\n"
