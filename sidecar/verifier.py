"""The check every request pays for: key, record and rate limit in one round trip, then scope."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import NamedTuple

from aiohttp.hdrs import AUTHORIZATION
from multidict import CIMultiDictProxy, istr

from sidecar import decision
from sidecar.apikeys import key_from_authorization
from sidecar.decision import Denial
from sidecar.metrics import Metrics
from sidecar.records import KeyRecord, decode, hash_key
from sidecar.routes import BadPath, Policy, normalise
from sidecar.store import KeyStore, Lookup, StoreUnavailable

log = logging.getLogger(__name__)

#: Response headers as (name, value) pairs: cheaper to build and to hand to aiohttp than dicts.
Headers = tuple[tuple[str, str], ...]

LIMIT_HEADER = istr("X-RateLimit-Limit")
REMAINING_HEADER = istr("X-RateLimit-Remaining")
RESET_HEADER = istr("X-RateLimit-Reset")

#: Past this many keys, the memory of when each was last noted is forgotten and starts anew.
_MAX_TOUCHED = 100_000


class Verdict(NamedTuple):
    """What the gate decided: a refusal, or the key's record; and its rate-limit standing."""

    denial: Denial | None
    record: KeyRecord | None = None
    lookup: Lookup | None = None

    def rate_headers(self) -> Headers:
        """Return the X-RateLimit-* headers of a counted request (none for an unlimited key)."""
        lk = self.lookup
        if lk is None or lk.remaining < 0:
            return ()
        return (
            (LIMIT_HEADER, str(lk.limit)),
            (REMAINING_HEADER, str(lk.remaining)),
            (RESET_HEADER, str(lk.reset)),
        )


class Verifier:
    """Decide requests against *store* and *policy*, noting key use every *touch_interval* s."""

    def __init__(
        self,
        store: KeyStore,
        policy: Policy,
        metrics: Metrics,
        *,
        allow_unlisted: bool,
        touch_interval: float,
    ) -> None:
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.allow_unlisted = allow_unlisted
        self.touch_interval = touch_interval
        self._touched: dict[str, float] = {}

    async def verify(self, headers: CIMultiDictProxy[str], method: str, uri: str) -> Verdict:
        """Decide the request for *method* and *uri* that carries *headers*."""
        started = time.perf_counter()
        inspected = _inspect(headers, uri)
        if isinstance(inspected, Denial):
            verdict = Verdict(inspected)
        else:
            path, key_hash = inspected
            try:
                lookup = await self.store.check(key_hash)
            except StoreUnavailable as e:
                log.warning("redis unavailable, refusing: %s", e)
                self.metrics.redis_error(e.kind)
                verdict = Verdict(decision.UNAVAILABLE)
            else:
                verdict = self._judge(lookup, method, path)
        d = verdict.denial
        status, reason = (200, "ok") if d is None else (d.status, d.reason)
        self.metrics.decided(status, reason, time.perf_counter() - started)
        return verdict

    def _judge(self, lookup: Lookup | None, method: str, path: str) -> Verdict:
        """Decide from what Redis holds for the key: record, expiry, rate limit, scope."""
        if lookup is None:
            return Verdict(decision.UNKNOWN)
        try:
            record = decode_record(lookup.raw)
        except ValueError:
            log.error("unreadable record in redis; refusing the key")
            return Verdict(decision.UNKNOWN)
        now = time.time()
        if record.is_expired(int(now * 1000)):
            return Verdict(decision.EXPIRED)
        if not lookup.allowed:
            return Verdict(decision.rate_limited(lookup.retry_after), record, lookup)
        route = self.policy.match(method, path)
        denial = decision.authorize(record, route, allow_unlisted=self.allow_unlisted)
        if denial is None:
            self._touch(record.key_id, now)
        return Verdict(denial, record, lookup)

    def _touch(self, key_id: str, now: float) -> None:
        last = self._touched.get(key_id)
        if last is not None and now - last < self.touch_interval:
            return
        if len(self._touched) >= _MAX_TOUCHED:
            self._touched.clear()
        self._touched[key_id] = now
        self.store.touch(key_id, int(now * 1000))


def _inspect(headers: CIMultiDictProxy[str], uri: str) -> Denial | tuple[str, str]:
    """Check what the request carries by itself: the path and key hash, or why it is refused."""
    if _carries_reserved_headers(headers):
        return decision.SPOOFED
    try:
        path = normalise(uri)
    except BadPath:
        return decision.BAD_PATH
    values = headers.getall(AUTHORIZATION, ())
    if not values:
        return decision.NO_CREDENTIAL
    key = key_from_authorization(values[0]) if len(values) == 1 else None
    if key is None:
        return decision.MALFORMED
    return path, hash_key(key)


def _carries_reserved_headers(headers: CIMultiDictProxy[str]) -> bool:
    names = "\n" + "\n".join(headers).lower()
    return "\nx-wacrm-" in names or "\nx_wacrm_" in names


#: `decode`, cached by the stored bytes, version included: a rewritten record is a new entry,
#: and every request still reads Redis, so this saves parsing only, never a lookup.
decode_record = lru_cache(maxsize=16384)(decode)
