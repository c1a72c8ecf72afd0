"""The rate limit inside the lookup script, on real Redis, with the clock in the test's hands."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis

from sidecar import records
from sidecar.records import KeyRecord, Keyspace, RateLimit

KS = Keyspace()
HASH = "cd" * 32
SECOND = 1_000_000  # the script's clock counts microseconds


@pytest.fixture(autouse=True)
async def loaded(redis: Redis) -> None:
    """Mark the emptied Redis loaded: the script then answers nil for a missing record."""
    await redis.set(KS.loaded, 1)


async def _store(redis: Redis, limit: RateLimit | None = None) -> None:
    rec = KeyRecord("k", "a", None, "p", (), None, limit)
    await redis.set(KS.record(HASH), records.encode(rec, version=1))


async def _check(redis: Redis, now_us: int, default: tuple[int, int] = (120, 60_000)) -> list:  # type: ignore[type-arg]
    reply = await redis.eval(
        records.CHECK_SCRIPT, 3, KS.record(HASH), KS.rate(HASH), KS.loaded, *default, now_us
    )
    assert len(reply) == 1
    assert reply[0] is None or len(reply[0]) == 6
    return reply[0]  # type: ignore[no-any-return]


async def test_missing_record_is_not_counted(redis: Redis) -> None:
    assert await _check(redis, 10 * SECOND) is None
    assert await redis.exists(KS.rate(HASH)) == 0


async def test_burst_up_to_the_limit_then_refused_with_retry_after(redis: Redis) -> None:
    await _store(redis)
    t = 1_000 * SECOND
    replies = [await _check(redis, t) for _ in range(121)]
    assert [r[1] for r in replies] == [1] * 120 + [0]
    assert [r[2] for r in replies[:3]] == [119, 118, 117]
    assert replies[119][2] == 0
    refused = replies[120]
    assert refused[4] == 1  # one request is earned every 0.5 s: retry after 1 s
    assert refused[5] == 120
    assert refused[3] == 1_000 + 60  # full again a minute later
    # Half a second later exactly one more is earned.
    assert (await _check(redis, t + SECOND // 2))[1] == 1
    assert (await _check(redis, t + SECOND // 2))[1] == 0


async def test_record_limit_overrides_the_default(redis: Redis) -> None:
    await _store(redis, RateLimit(3, 1000))
    t = 5_000 * SECOND
    assert [(await _check(redis, t))[1] for _ in range(4)] == [1, 1, 1, 0]
    assert (await _check(redis, t))[5] == 3


async def test_limit_zero_means_unlimited(redis: Redis) -> None:
    await _store(redis)
    for _ in range(300):
        reply = await _check(redis, 7 * SECOND, default=(0, 1))
        assert reply[1] == 1 and reply[2] == -1


async def test_rate_state_expires_once_refilled(redis: Redis) -> None:
    await _store(redis, RateLimit(10, 1000))
    await _check(redis, 9 * SECOND)
    assert 0 < await redis.pttl(KS.rate(HASH)) <= 100


@pytest.mark.parametrize("seed", range(5))
async def test_no_window_admits_twice_the_limit(redis: Redis, seed: int) -> None:
    """The bound a fixed window breaks: over any span t, admitted <= limit * (1 + t/window)."""
    await _store(redis, RateLimit(20, 10_000))
    rng = random.Random(seed)
    t = 100_000 * SECOND
    admitted: list[int] = []
    # Hammer in bursts at random moments, heaviest around multiples of the window.
    for _ in range(600):
        t += rng.choice([0, 1, 10, 1_000, 100_000, 2 * SECOND, 9_999_999])
        if (await _check(redis, t))[1] == 1:
            admitted.append(t)
    assert len(admitted) > 20
    window = 10 * SECOND
    for i, start in enumerate(admitted):
        for span in (SECOND // 10, SECOND, window // 2, window):
            count = sum(1 for a in admitted[i:] if a < start + span)
            assert count <= 20 * (1 + span / window) + 1, (start, span, count)
        # The fixed-window failure: 2x the limit within a tenth of the window.
        assert sum(1 for a in admitted[i:] if a < start + window // 10) <= 20 + 2 + 1


async def _check_many(redis: Redis, hashes: list[str], now_us: int) -> list:  # type: ignore[type-arg]
    keys = [k for h in hashes for k in (KS.record(h), KS.rate(h))] + [KS.loaded]
    reply = await redis.eval(records.CHECK_SCRIPT, len(keys), *keys, 120, 60_000, now_us)
    assert len(reply) == len(hashes)
    assert all(r is None or len(r) == 6 for r in reply)
    return reply  # type: ignore[no-any-return]


async def test_one_call_answers_each_check_in_order(redis: Redis) -> None:
    await _store(redis, RateLimit(3, 1000))
    other = "ef" * 32
    replies = await _check_many(redis, [HASH, other, HASH, HASH, HASH, other], 50 * SECOND)
    assert replies[1] is None and replies[5] is None
    assert await redis.exists(KS.rate(other)) == 0
    # The same key four times in one call: four requests, counted in order.
    mine = [replies[i] for i in (0, 2, 3, 4)]
    assert [r[1] for r in mine] == [1, 1, 1, 0]
    assert [r[2] for r in mine[:3]] == [2, 1, 0]
    assert mine[3][4] == 1


@pytest.mark.parametrize("seed", range(3))
async def test_batched_checks_count_as_the_same_checks_one_by_one(redis: Redis, seed: int) -> None:
    rng = random.Random(seed)
    hashes = [f"{i:02x}" * 32 for i in range(4)]
    plan: list[tuple[int, list[str]]] = []
    t = 1_000 * SECOND
    for _ in range(60):
        t += rng.choice([0, 10, 50_000, 300_000])
        plan.append((t, [rng.choice(hashes) for _ in range(rng.randint(1, 8))]))

    async def run(batched: bool) -> list:  # type: ignore[type-arg]
        await redis.flushdb()
        await redis.set(KS.loaded, 1)
        for i, h in enumerate(hashes):
            rec = KeyRecord(f"k{i}", "a", None, "p", (), None, RateLimit(5, 1000))
            await redis.set(KS.record(h), records.encode(rec, version=1))
        out = []
        for now, batch in plan:
            if batched:
                out += await _check_many(redis, batch, now)
            else:
                for h in batch:
                    out += await _check_many(redis, [h], now)
        return out

    one_by_one = await run(batched=False)
    assert sum(r[1] for r in one_by_one) < len(one_by_one)  # some refused: the limit bites
    assert await run(batched=True) == one_by_one
