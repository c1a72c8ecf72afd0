"""Versioned writes of records, against a real redis-server."""

from __future__ import annotations

from redis.asyncio import Redis

from loader.mirror import PUT_MANY_KEYS, Mirror
from loader.pipe import Batch
from sidecar.records import KeyRecord, Keyspace, decode, version_of
from tests.conftest import RedisServer

KS = Keyspace()
H1, H2 = "1" * 64, "2" * 64
REC = KeyRecord("k1", "a1", "Acme", "wacrm_live_abcdefgh", ("messages:send",), None)


async def test_versions_come_from_redis_and_move_forward(mirror: Mirror) -> None:
    first = await mirror.version()
    second = await mirror.version()
    assert second > first


async def test_put_then_fetch_then_delete(mirror: Mirror, redis: Redis) -> None:
    batch = Batch()
    await mirror.put([(H1, REC)], version=100, batch=batch)
    await mirror.wait(batch)
    assert batch.applied == 1
    stored = await mirror.fetch([H1, H2])
    assert stored[1] is None and stored[0] is not None
    assert decode(stored[0]) == REC and version_of(stored[0]) == 100
    batch = Batch()
    await mirror.delete([H1], version=101, batch=batch)
    await mirror.wait(batch)
    assert await redis.exists(KS.record(H1)) == 0
    assert await redis.get(KS.tombstone(H1)) == b"101"


async def test_an_older_write_cannot_undo_a_newer_delete(mirror: Mirror, redis: Redis) -> None:
    batch = Batch()
    await mirror.delete([H1], version=200, batch=batch)
    await mirror.put([(H1, REC)], version=199, batch=batch)
    await mirror.wait(batch)
    assert batch.kept_out == 1
    assert await redis.exists(KS.record(H1)) == 0


async def test_an_older_delete_cannot_remove_a_newer_record(mirror: Mirror, redis: Redis) -> None:
    batch = Batch()
    await mirror.put([(H1, REC)], version=300, batch=batch)
    await mirror.delete([H1], version=299, batch=batch)
    await mirror.wait(batch)
    assert batch.kept_out == 1
    assert await redis.exists(KS.record(H1)) == 1


async def test_expiring_records_carry_a_redis_expiry(mirror: Mirror, redis: Redis) -> None:
    seconds, _ = await redis.time()
    at = (seconds + 60) * 1000
    batch = Batch()
    await mirror.put([(H1, KeyRecord("k", "a", None, "p", (), at))], version=1, batch=batch)
    await mirror.wait(batch)
    assert await redis.pexpiretime(KS.record(H1)) == at


async def test_scan_and_loaded_mark(mirror: Mirror) -> None:
    assert not await mirror.is_loaded()
    batch = Batch()
    await mirror.put([(H1, REC), (H2, REC)], version=1, batch=batch)
    await mirror.delete(["3" * 64], version=1, batch=batch)  # a tombstone is not a record
    await mirror.wait(batch)
    found = [KS.hash_of(k) async for page in mirror.scan_keys(count=1) for k in page]
    assert sorted(set(found)) == [H1, H2]
    assert not await mirror.mark_loaded(5)  # no reconcile began: nothing to confirm
    assert not await mirror.is_loaded()
    await mirror.begin_load()
    assert await mirror.is_loaded()
    assert await mirror.mark_loaded(5)
    await mirror.begin_load()  # a later reconcile keeps the mark as it is
    assert await mirror.pipe.call("GET", KS.loaded) == b"5"


async def test_many_writes_in_one_call_keep_each_key_s_rules(mirror: Mirror, redis: Redis) -> None:
    """PUT_MANY_SCRIPT, over several calls: tombstones and newer records keep old writes out."""
    hashes = [f"{i:064x}" for i in range(PUT_MANY_KEYS * 2 + 50)]
    seconds, _ = await redis.time()
    at = (seconds + 60) * 1000
    setup = Batch()
    await mirror.delete(hashes[0::5], version=500, batch=setup)  # newer tombstones
    await mirror.put([(h, REC) for h in hashes[1::5]], version=600, batch=setup)  # newer
    await mirror.put([(h, REC) for h in hashes[2::5]], version=100, batch=setup)  # older
    await mirror.delete(hashes[3::5], version=100, batch=setup)  # older tombstones
    await mirror.wait(setup)
    batch = Batch()
    records = [
        (h, REC if i % 2 else KeyRecord("k", "a", None, "p", (), at)) for i, h in enumerate(hashes)
    ]
    await mirror.put(records, version=400, batch=batch)
    await mirror.wait(batch)
    kept = len(hashes[0::5]) + len(hashes[1::5])
    assert (batch.applied, batch.kept_out, batch.expected) == (len(hashes) - kept, kept, 3)
    stored = await mirror.fetch(hashes)
    for i, (h, record) in enumerate(records):
        raw = stored[i]
        if i % 5 == 0:
            assert raw is None
        elif i % 5 == 1:
            assert raw is not None and version_of(raw) == 600
        else:
            assert raw is not None and version_of(raw) == 400 and decode(raw) == record
            expected_expiry = -1 if record.expires_at_ms is None else at
            assert await redis.pexpiretime(KS.record(h)) == expected_expiry
    again = Batch()
    await mirror.put(records[2::5], version=400, batch=again)  # the same payload: held
    await mirror.wait(again)
    assert again.applied == len(records[2::5])


async def test_a_prefix_beyond_ascii_is_framed_in_bytes(
    redis: Redis, redis_server: RedisServer
) -> None:
    ks = Keyspace("wäcrm{x}:")
    mirror = await Mirror.open(redis_server.url, ks, connect_timeout=5)
    try:
        batch = Batch()
        await mirror.put([(H1, REC)], version=100, batch=batch)
        await mirror.delete([H2], version=100, batch=batch)
        await mirror.wait(batch)
        assert batch.applied == 2
        assert decode(await redis.get(ks.record(H1))) == REC
        assert await redis.get(ks.tombstone(H2)) == b"100"
        assert await mirror.fetch([H1, H2]) == [await redis.get(ks.record(H1)), None]
        assert ks.hashes_in(ks.record_keys([H1])) == [H1]
        assert ks.hash_of(ks.record(H1).encode()) == H1
    finally:
        await mirror.close()
