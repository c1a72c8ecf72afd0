"""The check every request pays for: key, record and rate limit in one round trip, then scope."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import NamedTuple

from aiohttp.hdrs import AUTHORIZATION
from multidict import CIMultiDictProxy

from sidecar import decision
from sidecar.apikeys import key_from_authorization
from sidecar.decision import Denial
from sidecar.metrics import Metrics
from sidecar.outage import OutageLog
from sidecar.records import KeyRecord, decode, hash_key
from sidecar.routes import BadPath, Policy, checked_path
from sidecar.store import NOT_LOADED, Found, KeyStore, Lookup, StoreUnavailable

log = logging.getLogger(__name__)

#: Past this many keys, the memory of when each was last noted is forgotten and starts anew.
_MAX_TOUCHED = 100_000


class Verdict(NamedTuple):
    """What the gate decided: a refusal, or the key's record; and its rate-limit standing.

    `sidecar.answers` turns it into HTTP.
    """

    denial: Denial | None
    record: KeyRecord | None = None
    lookup: Lookup | None = None


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
        encoded_slashes: bool = False,
    ) -> None:
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.allow_unlisted = allow_unlisted
        self.encoded_slashes = encoded_slashes
        self.touch_interval = touch_interval
        self._touched: dict[str, float] = {}
        self.outage = OutageLog(log)

    async def verify(self, headers: CIMultiDictProxy[str], method: str, uri: str) -> Verdict:
        """Decide the request for *method* and *uri* that carries *headers*."""
        started = time.perf_counter()
        inspected = _inspect(headers, uri, self.encoded_slashes)
        if isinstance(inspected, Denial):
            verdict = Verdict(inspected)
        else:
            path, key_hash = inspected
            try:
                lookup = await self.store.check(key_hash)
            except StoreUnavailable as e:
                self.outage.refused(e.kind, str(e))
                self.metrics.redis_error(e.kind)
                verdict = Verdict(decision.UNAVAILABLE)
            else:
                if self.outage.active:
                    self.outage.answered()
                verdict = self._decide(lookup, method, path)
        d = verdict.denial
        status, reason = (200, "ok") if d is None else (d.status, d.reason)
        self.metrics.decided(status, reason, time.perf_counter() - started)
        return verdict

    def _decide(self, lookup: Found, method: str, path: str) -> Verdict:
        """Decide from what Redis holds for the key: record, expiry, rate limit, scope."""
        if lookup is None:
            return Verdict(decision.UNKNOWN)
        if lookup is NOT_LOADED:
            return Verdict(decision.NOT_LOADED)
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


def _inspect(
    headers: CIMultiDictProxy[str], uri: str, encoded_slashes: bool
) -> Denial | tuple[str, str]:
    """Check what the request carries by itself: the path and key hash, or why it is refused."""
    if len(headers) > MAX_HEADERS:
        return decision.TOO_MANY_HEADERS
    if (refused := _refused_header(headers)) is not None:
        return refused
    try:
        path = checked_path(uri, encoded_slashes=encoded_slashes)
    except BadPath as e:
        return decision.bad_path(str(e))
    values = headers.getall(AUTHORIZATION, ())
    if not values:
        return decision.NO_CREDENTIAL
    key = key_from_authorization(values[0]) if len(values) == 1 else None
    if key is None:
        return decision.MALFORMED
    return path, hash_key(key)


#: Most request headers the gate accepts, as Apache's LimitRequestFields (the sidecar sees the
#: client's headers and the few its proxy adds).
MAX_HEADERS = 100

#: Headers with which an upstream may be told to run another method than the one checked.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
_METHOD_OVERRIDES = tuple(f"\n{name}\n" for name in sorted(METHOD_OVERRIDES))
#: Headers a proxy sets to tell which request is checked, or an upstream reads to pick a route.
#: Sent with '_' for '-', they pass the proxy's overwriting and reach a server that folds '_'.
ROUTING_HEADERS = frozenset(
    {
        "x-original-uri",
        "x-original-url",
        "x-original-method",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-forwarded-prefix",
        "x-rewrite-url",
    }
)


def _refused_header(headers: CIMultiDictProxy[str]) -> Denial | None:
    """Refuse a header the upstream could read as identity or routing, in any spelling.

    Names are compared lower-cased and with every separator a header name may hold read as
    '-': WSGI and CGI servers fold '_' (and PHP '.' and ' '), so ``X_Wacrm-Scopes`` and
    ``X.Wacrm.Scopes`` are ``X-Wacrm-Scopes`` to such an upstream.
    """
    names = "\n" + "\n".join(headers).lower() + "\n"
    folded = names.translate(_ALIASES)
    if "\nx-wacrm-" in folded:
        return decision.SPOOFED
    if any(name in folded for name in _METHOD_OVERRIDES):
        return decision.METHOD_OVERRIDE
    if folded != names and any(
        (f := name.lower().translate(_ALIASES)) != name.lower() and f in ROUTING_HEADERS
        for name in headers
    ):
        return decision.ROUTING_HEADER
    return None


#: The characters besides '-' that a header name may hold (RFC 9110's tchar, letters and
#: digits aside), each read as '-'.
_ALIASES = str.maketrans(dict.fromkeys("!#$%&'*+.^_`|~", "-"))


#: `decode`, cached by the stored bytes, version included: a rewritten record is a new entry,
#: and every request still reads Redis, so this saves parsing only, never a lookup.
decode_record = lru_cache(maxsize=16384)(decode)
