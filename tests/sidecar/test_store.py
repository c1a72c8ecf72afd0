"""Key lookups from the request path, batched per event-loop tick, on the session's real Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from sidecar import records
from sidecar.records import KeyRecord, Keyspace, RateLimit
from sidecar.resp import RespClient
from sidecar.store import MAX_BATCH, NOT_LOADED, KeyStore, StoreUnavailable
from tests.conftest import RedisServer

KS = Keyspace()


async def _put(redis: Redis, key_hash: str, key_id: str) -> None:
    rec = KeyRecord(key_id, "acct", None, "p", ("contacts:read",), None)
    await redis.set(KS.record(key_hash), records.encode(rec, version=1))


async def _ready(redis: Redis, store: KeyStore, key_hash: str) -> None:
    """Store a record for *key_hash*, check it once (connected, script loaded), zero the stats."""
    await _put(redis, key_hash, "k")
    assert await store.check(key_hash) is not None
    await redis.config_resetstat()


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
async def store(redis: Redis, redis_server: RedisServer) -> KeyStore:
    """Return a store of the session's Redis, emptied and marked loaded."""
    await redis.set(KS.loaded, 1)
    client = RespClient(redis_server.url, timeout=2)
    # A day's window: no allowance comes back while a test runs, however slow the machine,
    # so the counts the tests expect are exact.
    yield KeyStore(client, KS, RateLimit(1000, 86_400_000))  # type: ignore[misc]
    await client.aclose()


async def test_checks_of_one_tick_travel_in_one_call(redis: Redis, store: KeyStore) -> None:
    hashes = [f"{i:064x}" for i in range(50)]
    for i, h in enumerate(hashes[:25]):
        await _put(redis, h, f"key-{i}")
    assert await store.check(hashes[0]) is not None  # connected, script loaded
    await redis.config_resetstat()

    lookups = await asyncio.gather(*(store.check(h) for h in hashes))

    assert await _evalsha_calls(redis) == 1
    for i, lookup in enumerate(lookups):
        if i < 25:
            assert lookup is not None and lookup.allowed
            assert records.decode(lookup.raw).key_id == f"key-{i}"
        else:
            assert lookup is None


@pytest.mark.parametrize("mark", [None, b"0"])
async def test_a_missing_record_in_a_redis_without_a_finished_load_is_told_apart(
    redis: Redis, store: KeyStore, mark: bytes | None
) -> None:
    """The loaded mark absent (Redis lost its data) or 0 (the first load runs): a key not
    found may be a valid one not loaded yet.  A found key is answered and counted as ever,
    in the same single call."""
    found, missing = "9a" * 32, "9b" * 32
    await _ready(redis, store, found)
    if mark is None:
        await redis.delete(KS.loaded)
    else:
        await redis.set(KS.loaded, mark)

    lookups = await asyncio.gather(store.check(found), store.check(missing), store.check(found))

    assert await _evalsha_calls(redis) == 1
    first, absent, second = lookups
    assert absent is NOT_LOADED
    assert first is not None and first is not NOT_LOADED and first.remaining == 998
    assert second is not None and second is not NOT_LOADED and second.remaining == 997
    assert await redis.exists(KS.rate(missing)) == 0


async def test_a_missing_record_is_none_once_a_load_finished(redis: Redis, store: KeyStore) -> None:
    await redis.set(KS.loaded, 1_700_000_000_000)  # the version of a finished reconcile
    assert await store.check("9c" * 32) is None
    await redis.set(KS.loaded, 0)
    assert await store.check("9c" * 32) is NOT_LOADED


async def test_a_large_tick_is_split_into_calls_of_at_most_max_batch(
    redis: Redis, store: KeyStore
) -> None:
    h = "ab" * 32
    await _ready(redis, store, h)

    lookups = await asyncio.gather(*(store.check(h) for _ in range(MAX_BATCH * 2 + 1)))

    assert await _evalsha_calls(redis) == 3
    remaining = sorted(lk.remaining for lk in lookups if lk is not None)
    assert remaining == list(range(1000 - 2 - MAX_BATCH * 2, 1000 - 1))  # each one counted


async def test_a_flushed_script_cache_is_refilled(redis: Redis, store: KeyStore) -> None:
    h = "cd" * 32
    await _put(redis, h, "k")
    assert await store.check(h) is not None
    await redis.script_flush()

    lookups = await asyncio.gather(store.check(h), store.check("00" * 32))

    assert lookups[0] is not None and lookups[1] is None


async def test_every_check_of_a_failed_call_is_refused(
    redis: Redis, store: KeyStore, redis_server: RedisServer
) -> None:
    h = "ef" * 32
    await _put(redis, h, "k")
    assert await store.check(h) is not None
    redis_server.stop()
    try:
        results = await asyncio.gather(*(store.check(h) for _ in range(5)), return_exceptions=True)
    finally:
        redis_server.start()
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    # And the next check connects again.
    fresh = Redis.from_url(redis_server.url)
    try:
        await _put(fresh, h, "k")
        assert await store.check(h) is not None
    finally:
        await fresh.aclose()


async def test_checks_asked_while_a_call_is_in_flight_go_in_the_next(
    redis: Redis, store: KeyStore
) -> None:
    h = "12" * 32
    await _ready(redis, store, h)
    await redis.execute_command("CLIENT", "PAUSE", "300", "ALL")  # hold the first call

    first = store.check(h)
    later = []
    for _ in range(5):  # five more ticks while the first call waits in Redis
        await asyncio.sleep(0.02)
        later.append(store.check(h))
    lookups = await asyncio.gather(first, *later)

    assert all(lk is not None and lk.allowed for lk in lookups)
    assert await _evalsha_calls(redis) == 2


async def test_a_check_asked_after_a_deletion_never_sees_the_record(
    redis: Redis, store: KeyStore
) -> None:
    """Batching saves round trips, never a read: under a flood of checks, none asked after
    the record's deletion was acknowledged finds it."""
    h = "34" * 32
    await _put(redis, h, "k")
    stop = asyncio.Event()

    async def flood() -> int:
        seen = 0
        while not stop.is_set():
            seen += sum(
                lk is not None for lk in await asyncio.gather(*(store.check(h) for _ in range(20)))
            )
        return seen

    floods = [asyncio.create_task(flood()) for _ in range(4)]
    await asyncio.sleep(0.1)
    await redis.delete(KS.record(h))
    after = await asyncio.gather(*(store.check(h) for _ in range(50)))
    stop.set()
    assert sum(await asyncio.gather(*floods)) > 0  # the flood did see the record before
    assert after == [None] * 50


async def test_a_silent_redis_refuses_the_call_in_flight_and_the_checks_behind_it(
    silent_redis_url: str,
) -> None:
    """Redis accepts and never answers: the checks in flight and those queued behind them
    all fail as timeouts, within the timeout, and none hangs."""
    client = RespClient(silent_redis_url, timeout=0.3)
    store = KeyStore(client, KS, RateLimit(10, 1000))
    try:
        started = asyncio.get_running_loop().time()
        first = [store.check("56" * 32) for _ in range(3)]
        await asyncio.sleep(0.1)  # the first call is in flight; these wait behind it
        behind = [store.check("56" * 32) for _ in range(3)]
        results = await asyncio.gather(*first, *behind, return_exceptions=True)
        elapsed = asyncio.get_running_loop().time() - started
        assert [getattr(r, "kind", r) for r in results] == ["timeout"] * 6
        assert elapsed < 1.0
    finally:
        await client.aclose()


class _OddClient:
    """A client whose first reply has a shape the script never sends, then a good one."""

    connected = True
    cluster = None

    def __init__(self, good: list[object]) -> None:
        self.replies: list[object] = [RuntimeError("odd"), good]

    def send_encoded(self, command: bytes, *, flush: bool = False) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        reply = self.replies.pop(0)
        if isinstance(reply, TypeError):  # a fault in sending itself
            raise reply
        if isinstance(reply, Exception):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)
        return fut


async def test_an_unexpected_failure_refuses_its_batch_and_leaves_the_store_usable() -> None:
    store = KeyStore(_OddClient([None]), KS, None)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable) as refused:
        await asyncio.wait_for(store.check("78" * 32), 2)
    assert refused.value.kind == "reply"
    # The next batch goes out and is answered.
    assert await asyncio.wait_for(store.check("78" * 32), 2) is None


async def test_a_fault_in_sending_refuses_its_batch_and_leaves_the_store_usable() -> None:
    client = _OddClient([None])
    client.replies[0] = TypeError("cannot send")
    store = KeyStore(client, KS, None)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable) as refused:
        await asyncio.wait_for(store.check("78" * 32), 2)
    assert refused.value.kind == "reply"
    assert await asyncio.wait_for(store.check("78" * 32), 2) is None
