"""The loader's side of the Redis contract: versioned writes and deletes of key records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from loader.pipe import Batch, Pipe, PipeError
from sidecar.records import DELETE_SCRIPT, PUT_SCRIPT, TOMBSTONE_TTL_MS, KeyRecord, Keyspace, encode

#: What a Redis call of the loader can raise when the server is down, slow or confused.
REDIS_ERRORS = (PipeError, OSError, asyncio.TimeoutError)

#: How long to wait after reading the clock so that anything read later is strictly newer.
_TICK = 0.002


class Mirror:
    """Write key records under *keyspace* through *pipe*, always with a version."""

    def __init__(self, pipe: Pipe, keyspace: Keyspace) -> None:
        self.pipe = pipe
        self.keyspace = keyspace
        self._put_head = b""
        self._delete_head = b""

    @classmethod
    async def open(cls, url: str, keyspace: Keyspace, *, connect_timeout: float) -> Mirror:
        """Connect to the Redis at *url* and load the scripts."""
        mirror = cls(await Pipe.open(url, connect_timeout=connect_timeout), keyspace)
        try:
            async with asyncio.timeout(connect_timeout):
                await mirror.load_scripts()
        except BaseException:
            await mirror.close()
            raise
        return mirror

    async def load_scripts(self) -> None:
        """Load PUT_SCRIPT and DELETE_SCRIPT into Redis (again after a restart)."""
        put = await self.pipe.call("SCRIPT", "LOAD", PUT_SCRIPT)
        delete = await self.pipe.call("SCRIPT", "LOAD", DELETE_SCRIPT)
        self._put_head = b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n" % _sha(put)
        self._delete_head = b"*7\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n" % _sha(delete)

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
        if not key_hashes:
            return []
        record = self.keyspace.record
        result: list[bytes | None] = await self.pipe.call("MGET", *[record(h) for h in key_hashes])
        return result

    async def put(
        self, records: Iterable[tuple[str, KeyRecord]], *, version: int, batch: Batch
    ) -> None:
        """Send a versioned write of each (hash, record) in *records*; tally them in *batch*."""
        head = self._put_head
        ks = self.keyspace
        out: list[bytes] = []
        for key_hash, record in records:
            rk = ks.record(key_hash).encode()
            tk = ks.tombstone(key_hash).encode()
            payload = encode(record, version=version)
            ver = b"%d" % version
            exp = b"" if record.expires_at_ms is None else b"%d" % record.expires_at_ms
            out.append(
                b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (
                    head,
                    len(rk),
                    rk,
                    len(tk),
                    tk,
                    len(payload),
                    payload,
                    len(ver),
                    ver,
                    len(exp),
                    exp,
                )
            )
        if out:
            await self.pipe.send(b"".join(out), len(out), batch)

    async def delete(self, key_hashes: Iterable[str], *, version: int, batch: Batch) -> None:
        """Send a versioned delete of each of *key_hashes*; tally them in *batch*."""
        head = self._delete_head
        ks = self.keyspace
        ver = b"%d" % version
        ttl = b"%d" % TOMBSTONE_TTL_MS
        out: list[bytes] = []
        for key_hash in key_hashes:
            rk = ks.record(key_hash).encode()
            tk = ks.tombstone(key_hash).encode()
            out.append(
                b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (head, len(rk), rk, len(tk), tk, len(ver), ver, len(ttl), ttl)
            )
        if out:
            await self.pipe.send(b"".join(out), len(out), batch)

    async def wait(self, batch: Batch) -> Batch:
        """Wait for every write tallied in *batch*; raise PipeError if Redis refused one."""
        await self.pipe.wait(batch)
        if batch.errors:
            raise PipeError(f"Redis refused {len(batch.errors)} writes: {batch.errors[0]}")
        return batch

    async def scan_hashes(self, *, count: int = 10000) -> AsyncIterator[list[str]]:
        """Yield the hashes of every stored record, a SCAN page at a time."""
        cursor: Any = b"0"
        pattern = self.keyspace.record_pattern
        hash_of = self.keyspace.hash_of
        while True:
            cursor, keys = await self.pipe.call("SCAN", cursor, "MATCH", pattern, "COUNT", count)
            if keys:
                yield [hash_of(k) for k in keys]
            if cursor in (b"0", "0", 0):
                return

    async def mark_loaded(self, version: int) -> None:
        """Record that a full reconcile at *version* completed."""
        await self.pipe.call("SET", self.keyspace.loaded, version)

    async def is_loaded(self) -> bool:
        """Tell whether Redis still holds the mark of a full reconcile."""
        return bool(await self.pipe.call("EXISTS", self.keyspace.loaded))


def same_record(stored: bytes, record: KeyRecord) -> bool:
    """Tell whether *stored* holds *record*, whatever version it was written at."""
    fresh = encode(record, version=0)
    return stored[stored.find(b",") :] == fresh[fresh.find(b",") :]


def _sha(reply: bytes | str) -> bytes:
    return reply.encode() if isinstance(reply, str) else reply
