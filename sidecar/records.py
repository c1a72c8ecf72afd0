"""The Redis contract shared by the sidecar (reader) and the loader (writer).

Everything about how a key lives in Redis is decided here and nowhere else:

``{prefix}key:{<hash>}``
    The key's record: a JSON object (see `encode`), present exactly while the key is active.
    Revocation is the deletion of this Redis key.  A key with an expiry carries a Redis expiry
    at the same instant, so it vanishes on time even when no loader runs.
``{prefix}gone:{<hash>}``
    A tombstone: the version (Redis time in ms) at which the record was last deleted.  It keeps
    an older snapshot of the key table from writing a revoked key back (no resurrection).
``{prefix}rl:{<hash>}``
    The key's rate-limit state (GCRA: the theoretical arrival time, in microseconds).
``{prefix}loaded``
    ``0`` while the first full reconcile into this Redis runs, then the version of the last
    one completed.  Absent, Redis lost its data (or was never loaded): the loader reloads it.
    Absent or ``0``, Redis holds no finished load, so a key without a record may be a valid
    key not loaded yet: the sidecar refuses it with 503 (an outage), not 401.
``{prefix}loaded:{<tag>}``
    In a Redis Cluster, the same mark once for each of its 16,384 slots, *tag* being one that
    lands in the slot (`sidecar.slots.slot_tags`): a check reads the mark of its own key's
    slot in the same call as the record, the marks move with their slots when the Cluster is
    resharded, and a node that restarts empty loses the marks of exactly its own slots.
``{prefix}used``
    A sorted set: key id -> the last time (ms) a sidecar saw the key used.  The loader drains
    it into ``last_used_at``.
``{prefix}loader-lock``
    The token of the one ``loader run`` that does the work (the active loader), with a Redis
    expiry it keeps renewing; the other loaders stand by and take it once it is free (see
    `LOCK_SCRIPT`).  The sidecar never reads it.

``<hash>`` is the lowercase hex SHA-256 of the whole plaintext key.  The ``{...}`` hash tag puts
every per-key Redis key in one Redis Cluster slot, so a server-side script may touch them
together; so the prefix holds no ``{`` or ``}``.  The prefix lets several deployments share
one Redis.

Every write carries a *version*: the Redis server time, in milliseconds, taken *before* the
source was read.  A write or delete only applies when its version is not older than what Redis
already holds for that key (record or tombstone), so a slow snapshot can never undo a newer
change.  The version is the record's first field, so the scripts read it without a JSON parser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from sidecar.slots import slot_tags

DEFAULT_PREFIX = "wacrm:"
#: The length of a key hash: lowercase hex SHA-256.
HASH_LENGTH = 64
#: How long a tombstone outlives the deletion; it must exceed the longest full reconcile.
TOMBSTONE_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most *limit* requests per *window_ms*, refilled evenly (GCRA)."""

    limit: int
    window_ms: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse ``LIMIT/WINDOW`` such as ``120/60s``, ``10/1s``, ``1000/1h`` or ``500/5m``."""
        limit_text, sep, window_text = text.strip().partition("/")
        unit = window_text[-1:]
        if not sep or unit not in _UNITS_MS:
            raise ValueError(f"{text!r} is not LIMIT/WINDOW like 120/60s")
        limit, window = int(limit_text), int(window_text[:-1] or "1") * _UNITS_MS[unit]
        if limit < 1 or window < 1:
            raise ValueError(f"{text!r}: limit and window must be at least 1")
        return cls(limit, window)

    def __str__(self) -> str:
        return "off" if self.limit == 0 else f"{self.limit}/{self.window_ms // 1000}s"


_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000}

#: A key's own limit that lifts every limit from it.
UNLIMITED = RateLimit(0, 1)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the gate knows about an active key."""

    key_id: str
    account_id: str
    account_name: str | None
    key_prefix: str
    scopes: tuple[str, ...]
    #: Unix time in milliseconds after which the key is refused; None = never expires.
    expires_at_ms: int | None = None
    #: This key's own rate limit; None = the sidecar's default.
    rate_limit: RateLimit | None = None

    def is_expired(self, now_ms: int) -> bool:
        """Tell whether the key has expired at *now_ms*."""
        return self.expires_at_ms is not None and now_ms >= self.expires_at_ms


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Name the Redis keys of one deployment, all under *prefix*."""

    prefix: str = DEFAULT_PREFIX

    def record(self, key_hash: str) -> str:
        """Return the Redis key holding the record of *key_hash*."""
        return f"{self.prefix}key:{{{key_hash}}}"

    def tombstone(self, key_hash: str) -> str:
        """Return the Redis key holding the tombstone of *key_hash*."""
        return f"{self.prefix}gone:{{{key_hash}}}"

    @property
    def record_around(self) -> tuple[str, str]:
        """Return what stands before and after the hash in the Redis key of a record."""
        head, _, tail = self.record("\0").partition("\0")
        return head, tail

    @property
    def tombstone_around(self) -> tuple[str, str]:
        """Return what stands before and after the hash in the Redis key of a tombstone."""
        head, _, tail = self.tombstone("\0").partition("\0")
        return head, tail

    def record_keys(self, key_hashes: Iterable[str]) -> list[bytes]:
        """Return the Redis key of each record of *key_hashes*, as bytes (as SCAN returns)."""
        head, tail = self.record_around
        return [f"{head}{h}{tail}".encode() for h in key_hashes]

    def hashes_in(self, redis_keys: Iterable[bytes]) -> list[str]:
        """Return the key hash inside each of the Redis keys *redis_keys* of records."""
        return [self.hash_of(k) for k in redis_keys]

    def rate(self, key_hash: str) -> str:
        """Return the Redis key holding the rate-limit state of *key_hash*."""
        return f"{self.prefix}rl:{{{key_hash}}}"

    @property
    def used(self) -> str:
        """Return the Redis key of the sorted set of last-use times."""
        return f"{self.prefix}used"

    @property
    def loaded(self) -> str:
        """Return the Redis key that marks a completed full reconcile."""
        return f"{self.prefix}loaded"

    def loaded_in(self, slot: int) -> str:
        """Return the Redis key of the loaded mark of Redis Cluster slot *slot* (see above)."""
        return f"{self.prefix}loaded:{{{slot_tags()[slot]}}}"

    @property
    def lock(self) -> str:
        """Return the Redis key naming the active loader (see `LOCK_SCRIPT`)."""
        return f"{self.prefix}loader-lock"

    @property
    def record_pattern(self) -> str:
        """Return the SCAN pattern matching every record of this deployment."""
        return f"{_glob_escape(self.prefix)}key:{{*}}"

    def hash_of(self, redis_key: str | bytes) -> str:
        """Return the key hash inside a record's Redis key *redis_key*."""
        if isinstance(redis_key, bytes):
            redis_key = redis_key.decode()
        return redis_key[redis_key.rindex("{") + 1 : -1]


def hash_key(plaintext: str) -> str:
    """Return the lowercase hex SHA-256 of the whole *plaintext* key, as Wacrm stores it."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


#: The fields of a stored record, in the order `encode` writes them: (JSON name, what it holds).
#: The version comes first and the rate limit second: the scripts read both with a pattern
#: (see `LUA_PATTERNS`), without a JSON parser.  The SQL that builds records
#: (``loader.postgres``) and the tests are checked against this list.
FIELDS = (
    ("v", "the version: Redis time in ms of the write"),
    ("l", "the key's own rate limit as [limit, window ms], or null"),
    ("k", "the key's id"),
    ("a", "the account's id"),
    ("n", "the account's name, or null"),
    ("p", "the key's display prefix"),
    ("s", "the key's scopes, a list"),
    ("e", "when the key expires, Unix ms, or null"),
)
#: How every stored record starts: the version's number follows, then `body`.
VERSION_HEAD = b'{"%s":' % FIELDS[0][0].encode()

_V, _L = FIELDS[0][0], FIELDS[1][0]
#: Lua patterns, defined at the top of every script that reads a record: VERSION_AT captures
#: its version, LIMIT_AT its own rate limit and window (no capture for a null limit).
LUA_PATTERNS = (
    f"local VERSION_AT = '^{{\"{_V}\":(%d+)'\n"
    f'local LIMIT_AT = \'^{{"{_V}":%d+,"{_L}":%[(%d+),(%d+)%]\'\n'
)


def encode(record: KeyRecord, *, version: int) -> bytes:
    """Serialise *record* at *version* into the bytes stored in Redis."""
    return encode_fields(
        version,
        record.key_id,
        record.account_id,
        record.account_name,
        record.key_prefix,
        record.scopes,
        record.expires_at_ms,
        record.rate_limit,
    )


def encode_fields(
    version: int,
    key_id: str,
    account_id: str,
    account_name: str | None,
    key_prefix: str,
    scopes: tuple[str, ...],
    expires_at_ms: int | None,
    rate_limit: RateLimit | None,
) -> bytes:
    """Return `encode` of a `KeyRecord` of these fields, without building one (cheaper)."""
    return orjson.dumps(
        {
            "v": version,
            "l": None if rate_limit is None else (rate_limit.limit, rate_limit.window_ms),
            "k": key_id,
            "a": account_id,
            "n": account_name,
            "p": key_prefix,
            "s": scopes,
            "e": expires_at_ms,
        }
    )


_VERSION_0 = len(VERSION_HEAD) + 1

#: A record's fields in `KeyRecord`'s order, as `encode_fields` takes them after the version
#: (a tuple is much cheaper to build than a `KeyRecord`).
Fields = tuple[str, str, str | None, str, tuple[str, ...], int | None, RateLimit | None]


def body(record: KeyRecord) -> bytes:
    """Return what follows the version in every stored copy of *record*, whatever its version.

    ``encode(record, version=v) == VERSION_HEAD + b"%d" % v + body(record)``.
    """
    return encode(record, version=0)[_VERSION_0:]


def body_of_fields(fields: Fields) -> bytes:
    """Return `body` of a `KeyRecord` of these *fields*, without building one (cheaper)."""
    return encode_fields(0, *fields)[_VERSION_0:]


def body_of(stored: bytes) -> bytes:
    """Return the `body` of the *stored* bytes of a record, without its version."""
    return stored[stored.find(b",") :]


def same_record(stored: bytes, record: KeyRecord) -> bool:
    """Tell whether *stored* holds *record*, whatever version it was written at."""
    return body_of(stored) == body(record)


def decode(raw: bytes | str) -> KeyRecord:
    """Parse the bytes *raw* of a stored record; raise ValueError when they are not one."""
    try:
        d = orjson.loads(raw)
        limit = d.get("l")
        return KeyRecord(
            key_id=d["k"],
            account_id=d["a"],
            account_name=d["n"],
            key_prefix=d["p"],
            scopes=tuple(d["s"]),
            expires_at_ms=d["e"],
            rate_limit=None if limit is None else RateLimit(limit[0], limit[1]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"not a key record: {e}") from None


def version_of(raw: bytes | str) -> int:
    """Return the version a stored record was written at."""
    return int(orjson.loads(raw)["v"])


# KEYS: record, tombstone.  ARGV: payload, version, expires_at_ms ("" = never).
# Returns 1 when written, 0 when a newer record or tombstone kept it out.
PUT_SCRIPT = (
    LUA_PATTERNS
    + """
local ver = tonumber(ARGV[2])
local gone = redis.call('GET', KEYS[2])
if gone and tonumber(gone) > ver then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local cv = tonumber(string.match(cur, VERSION_AT))
  if cv and cv > ver then return 0 end
  if cur == ARGV[1] then return 1 end
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
end
return 1
"""
)

# PUT_SCRIPT for many keys at once: what PUT_SCRIPT does to each, in one atomic step, at a
# fraction of the cost (one call, one MGET, one MSET).  Every key of one call must live on
# the same server: fine for one Redis and its replicas, not for a Redis Cluster.
# KEYS: record and tombstone of each key, in pairs.  ARGV: version, then the payload and
# expires_at_ms ("" = never) of each key.  Returns {written or already held, kept out}.
PUT_MANY_SCRIPT = (
    LUA_PATTERNS
    + """
local ver = tonumber(ARGV[1])
local held = redis.call('MGET', unpack(KEYS))
local plain = {}
local applied, kept = 0, 0
for i = 1, #KEYS, 2 do
  local cur, gone = held[i], held[i + 1]
  local payload, exp = ARGV[i + 1], ARGV[i + 2]
  local keep = gone and tonumber(gone) > ver
  if cur and not keep then
    local cv = tonumber(string.match(cur, VERSION_AT))
    keep = cv and cv > ver
  end
  if keep then
    kept = kept + 1
  else
    applied = applied + 1
    if cur ~= payload then
      if exp == '' then
        plain[#plain + 1] = KEYS[i]
        plain[#plain + 1] = payload
      else
        redis.call('SET', KEYS[i], payload, 'PXAT', exp)
      end
    end
  end
end
if #plain > 0 then redis.call('MSET', unpack(plain)) end
return {applied, kept}
"""
)

# KEYS: record, tombstone.  ARGV: version, tombstone ttl ms.
# Returns 1 when the record is gone (deleted now or absent), 0 when a newer record kept it.
DELETE_SCRIPT = (
    LUA_PATTERNS
    + """
local ver = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur then
  local cv = tonumber(string.match(cur, VERSION_AT))
  if cv and cv > ver then return 0 end
  redis.call('DEL', KEYS[1])
end
local gone = redis.call('GET', KEYS[2])
if (not gone) or tonumber(gone) < ver then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
)


# The request path's one round trip, for a batch of checks at once: each key's record, and
# its rate limit counted in the same step (only when the record exists, so 401s never count).
# KEYS: record 1, rate 1, record 2, rate 2, ...  (a key may appear more than once: each
# occurrence is one request, counted in order), then the loaded mark.  ARGV: default limit,
# default window ms, [now in us, for tests].  Returns one entry a pair: nil when there is no
# record, 0 when there is none and Redis holds no finished load (the mark absent or 0), else
# {record, allowed 0/1, remaining, reset (Unix s), retry after (s), limit}; remaining is -1
# for a key without a limit.  GCRA: a key may burst up to its limit,
# then earns one request every window/limit; over any span of t the admitted count is at
# most limit * (1 + t/window).  A key's new state is written once, after its last check.
CHECK_SCRIPT = (
    LUA_PATTERNS
    + """
local floor, ceil, tonumber = math.floor, math.ceil, tonumber
local vals = redis.call('MGET', unpack(KEYS))
local now = tonumber(ARGV[3])
local dlim, dwin = tonumber(ARGV[1]), tonumber(ARGV[2])
local mark = vals[#KEYS]
local none = false
if not mark or mark == '0' then none = 0 end
local tats = {}
local out = {}
local n = 0
for i = 1, #KEYS - 1, 2 do
  local rec = vals[i]
  n = n + 1
  if not rec then
    out[n] = none
  else
    local lim, win = dlim, dwin
    local l, w = string.match(rec, LIMIT_AT)
    if l then lim, win = tonumber(l), tonumber(w) end
    if lim <= 0 then
      out[n] = {rec, 1, -1, 0, 0, 0}
    else
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000000 + tonumber(t[2])
      end
      local rk = KEYS[i + 1]
      local window = win * 1000
      local interval = floor(window / lim)
      if interval < 1 then interval = 1 end
      local tat = tats[rk] or tonumber(vals[i + 1]) or now
      if tat < now then tat = now end
      local new_tat = tat + interval
      local allow_at = new_tat - window
      if allow_at > now then
        out[n] = {rec, 0, 0, ceil(tat / 1000000), ceil((allow_at - now) / 1000000), lim}
      else
        tats[rk] = new_tat
        local remaining = floor((now + window - new_tat) / interval)
        out[n] = {rec, 1, remaining, ceil(new_tat / 1000000), 0, lim}
      end
    end
  end
end
for rk, tat in pairs(tats) do
  redis.call('SET', rk, tat, 'PX', ceil((tat - now) / 1000))
end
return out
"""
)

# KEYS: used.  Returns every (key id, ms) pair and empties the set, atomically.
DRAIN_USED_SCRIPT = """
local out = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
redis.call('DEL', KEYS[1])
return out
"""

# The loader's lock.  KEYS: lock.  ARGV: token, ttl ms.  Takes the lock for *token* when it is
# free (as SET NX PX would), or extends it when *token* holds it already; never touches
# another token's.  Returns the token that holds the lock now.
LOCK_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

# KEYS: lock.  ARGV: token.  Frees the lock only while *token* holds it: returns 1 when it
# did, 0 when another token (or none) holds it.
UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
