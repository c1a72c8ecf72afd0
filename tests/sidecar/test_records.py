"""The Redis contract: key layout, record encoding, and the versioned scripts on real Redis."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
from redis.asyncio import Redis

from sidecar import records
from sidecar.records import KeyRecord, Keyspace, RateLimit

HASH = "ab" * 32
RECORD = KeyRecord("key-1", "acct-1", "Acme", "wacrm_live_abcdefgh", ("contacts:read",), None)


def test_layout_is_pinned() -> None:
    ks = Keyspace()
    assert ks.record(HASH) == f"wacrm:key:{{{HASH}}}"
    assert ks.tombstone(HASH) == f"wacrm:gone:{{{HASH}}}"
    assert ks.rate(HASH) == f"wacrm:rl:{{{HASH}}}"
    assert ks.loaded == "wacrm:loaded"
    assert Keyspace("t1:").record(HASH) == f"t1:key:{{{HASH}}}"
    assert ks.hash_of(ks.record(HASH).encode()) == HASH


def test_scan_pattern_escapes_glob_characters_in_the_prefix() -> None:
    assert Keyspace("a*b:").record_pattern == "a\\*b:key:{*}"


def test_encoding_is_pinned_and_round_trips() -> None:
    raw = records.encode(RECORD, version=1700000000123)
    assert raw == (
        b'{"v":1700000000123,"l":null,"k":"key-1","a":"acct-1","n":"Acme",'
        b'"p":"wacrm_live_abcdefgh","s":["contacts:read"],"e":null}'
    )
    assert records.decode(raw) == RECORD
    assert records.version_of(raw) == 1700000000123
    limited = replace(RECORD, rate_limit=RateLimit(10, 1000), expires_at_ms=5)
    raw = records.encode(limited, version=1)
    assert raw.startswith(b'{"v":1,"l":[10,1000],"k":"key-1"')
    assert records.decode(raw) == limited


def test_same_record_ignores_the_version() -> None:
    assert records.same_record(records.encode(RECORD, version=1), RECORD)
    assert records.same_record(records.encode(RECORD, version=1234567890123), RECORD)
    other = replace(RECORD, key_id="k1")
    assert not records.same_record(records.encode(other, version=1), RECORD)


#: Records whose encodings try the scripts' patterns: text that looks like a field, limits.
TRICKY = [
    RECORD,
    replace(RECORD, rate_limit=RateLimit(10, 1000), expires_at_ms=1_700_000_000_000),
    replace(RECORD, account_name='x","v":9,"l":[1,1]', key_prefix='{"v":1,"l":[2,2]}'),
    replace(RECORD, account_name=None, scopes=(), rate_limit=RateLimit(1, 3_600_000)),
    replace(RECORD, account_name="Ünïcødé 名前 \u2028", rate_limit=records.UNLIMITED),
]


@pytest.mark.parametrize("record", TRICKY)
def test_the_encoding_follows_the_field_list(record: KeyRecord) -> None:
    """FIELDS is the contract: the order encode writes, what body and VERSION_HEAD assume."""
    for version in (0, 7, 1_700_000_000_123):
        raw = records.encode(record, version=version)
        assert list(orjson.loads(raw)) == [name for name, _ in records.FIELDS]
        assert raw == records.VERSION_HEAD + b"%d" % version + records.body(record)
        assert records.body_of(raw) == records.body(record)
        assert records.decode(raw) == record and records.version_of(raw) == version


async def test_the_scripts_patterns_read_what_encode_writes(redis: Redis) -> None:
    """The Lua side of the contract, run by real Redis on every kind of record."""
    script = records.LUA_PATTERNS + (
        "local v = string.match(ARGV[1], VERSION_AT)\n"
        "local l, w = string.match(ARGV[1], LIMIT_AT)\n"
        "return {v or false, l or false, w or false}"
    )
    for record in TRICKY:
        for version in (0, 1_700_000_000_123):
            raw = records.encode(record, version=version)
            got = await redis.eval(script, 0, raw)
            limit = record.rate_limit
            want = [str(version).encode(), None, None]
            if limit is not None:
                want[1:] = [str(limit.limit).encode(), str(limit.window_ms).encode()]
            assert got == want, raw


def test_keyspace_parts_frame_the_hash() -> None:
    ks = Keyspace("wäcrm{x}:")
    head, tail = ks.record_around
    assert head + HASH + tail == ks.record(HASH)
    head, tail = ks.tombstone_around
    assert head + HASH + tail == ks.tombstone(HASH)
    assert ks.record_keys([HASH]) == [ks.record(HASH).encode()]
    assert ks.hashes_in(ks.record_keys([HASH, "cd" * 32])) == [HASH, "cd" * 32]


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("120/60s", RateLimit(120, 60_000)),
        ("10/s", RateLimit(10, 1000)),
        (" 1000/1h ", RateLimit(1000, 3_600_000)),
        ("500/5m", RateLimit(500, 300_000)),
    ],
)
def test_rate_limit_parses(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit


@pytest.mark.parametrize("text", ["120", "120/60", "0/60s", "120/0s", "x/60s", "120/60d", ""])
def test_rate_limit_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        RateLimit.parse(text)


@pytest.mark.parametrize("raw", [b"", b"{}", b"[1]", b'{"v":1,"k":"x"}', b"\xff"])
def test_decode_refuses_what_is_not_a_record(raw: bytes) -> None:
    with pytest.raises(ValueError):
        records.decode(raw)


def test_expiry() -> None:
    rec = KeyRecord("k", "a", None, "p", (), 1000)
    assert not rec.is_expired(999)
    assert rec.is_expired(1000)
    assert not RECORD.is_expired(2**62)


async def _put(r: Redis, record: KeyRecord, version: int, expires: int | str = "") -> int:
    ks = Keyspace()
    return int(
        await r.eval(
            records.PUT_SCRIPT,
            2,
            ks.record(HASH),
            ks.tombstone(HASH),
            records.encode(record, version=version),
            version,
            expires,
        )
    )


async def _delete(r: Redis, version: int) -> int:
    ks = Keyspace()
    return int(
        await r.eval(records.DELETE_SCRIPT, 2, ks.record(HASH), ks.tombstone(HASH), version, 60_000)
    )


async def test_older_write_never_replaces_a_newer_one(redis: Redis) -> None:
    newer = KeyRecord("key-1", "acct-1", "Acme", "p", ("webhooks:manage",))
    assert await _put(redis, newer, 200) == 1
    assert await _put(redis, RECORD, 100) == 0
    raw = await redis.get(Keyspace().record(HASH))
    assert raw is not None and records.decode(raw) == newer


async def test_a_deletion_keeps_older_snapshots_out(redis: Redis) -> None:
    """No resurrection: a write read before the revocation cannot bring the key back."""
    assert await _put(redis, RECORD, 100) == 1
    assert await _delete(redis, 200) == 1
    assert await redis.get(Keyspace().record(HASH)) is None
    assert await _put(redis, RECORD, 150) == 0
    assert await redis.get(Keyspace().record(HASH)) is None
    assert await _put(redis, RECORD, 250) == 1


async def test_a_deletion_older_than_the_record_is_ignored(redis: Redis) -> None:
    assert await _put(redis, RECORD, 300) == 1
    assert await _delete(redis, 200) == 0
    assert await redis.get(Keyspace().record(HASH)) is not None


async def test_put_sets_redis_expiry_at_the_keys_expiry(redis: Redis) -> None:
    at = (await redis.time())[0] * 1000 + 60_000
    assert await _put(redis, RECORD, 100, at) == 1
    assert await redis.pexpiretime(Keyspace().record(HASH)) == at
