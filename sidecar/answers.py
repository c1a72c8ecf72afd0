"""How a verdict becomes an HTTP answer: the one place the gate's response headers are made.

Three faces answer a verdict: nginx's ``auth_request`` (`to_nginx`), which passes on only a
2xx, 401 or 403; a client or forward-auth proxy that relays the answer as it is (`to_client`);
and ``/api/v1/me`` (`me`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import orjson
from aiohttp import web
from multidict import istr

from sidecar import identity
from sidecar.decision import Denial
from sidecar.records import KeyRecord
from sidecar.store import Lookup
from sidecar.verifier import Verdict

#: Response headers as (name, value) pairs: cheaper to build and to hand to aiohttp than dicts.
Headers = tuple[tuple[str, str], ...]

# Header names as istr: multidict then skips folding their case on every request.
ACCOUNT_HEADER = istr("X-Wacrm-Account-Id")
KEY_HEADER = istr("X-Wacrm-Key-Id")
SCOPES_HEADER = istr("X-Wacrm-Scopes")
SIGNATURE_HEADER = istr(identity.SIGNATURE_HEADER)
#: X-Wacrm-Scopes of a key without scopes: proxies drop an empty header, and a missing one
#: must mean "not through the gate".  "-" is the route file's own word for no scope.
NO_SCOPES = identity.NO_SCOPES
#: On a refusal to nginx: the status the client must get, the exact body, the challenge.
STATUS_HEADER = istr("X-Wacrm-Status")
ERROR_HEADER = istr("X-Wacrm-Error")
CHALLENGE_HEADER = istr("X-Wacrm-Challenge")
LIMIT_HEADER = istr("X-RateLimit-Limit")
REMAINING_HEADER = istr("X-RateLimit-Remaining")
RESET_HEADER = istr("X-RateLimit-Reset")
AUTHENTICATE_HEADER = istr("WWW-Authenticate")
RETRY_AFTER_HEADER = istr("Retry-After")


@dataclass(frozen=True, slots=True)
class Signing:
    """What an allowed answer's X-Wacrm-Signature signs besides the identity, and the key.

    *method* and *target* are the request the gate checked, which the upstream is served.
    """

    key: bytes
    method: str
    target: str


def to_nginx(verdict: Verdict, signing: Signing | None = None) -> web.Response:
    """Answer nginx's auth_request: 200 with the identity headers, or a refusal it can relay.

    With *signing*, the identity is signed (X-Wacrm-Signature).
    """
    denial = verdict.denial
    if denial is None:
        return _allowed(verdict, signing)
    status, headers = _nginx_form(denial)
    return web.Response(status=status, headers=(*headers, *rate_headers(verdict.lookup)))


def to_client(verdict: Verdict, signing: Signing | None = None) -> web.Response:
    """Answer a proxy that relays the answer as is (forward-auth): 200, or Wacrm's refusal.

    With *signing*, the identity is signed (X-Wacrm-Signature).
    """
    if verdict.denial is None:
        return _allowed(verdict, signing)
    return _refusal(verdict)


def me(verdict: Verdict) -> web.Response:
    """Answer ``GET /api/v1/me`` in Wacrm's shape: the key's account and scopes, or a refusal."""
    record = verdict.record
    if verdict.denial is not None or record is None:
        return _refusal(verdict)
    body = orjson.dumps(
        {
            "data": {
                "account": {"id": record.account_id, "name": record.account_name},
                "key": {"id": record.key_id, "scopes": record.scopes},
            }
        }
    )
    return json(200, body, rate_headers(verdict.lookup))


def json(status: int, body: bytes, headers: Headers = ()) -> web.Response:
    """Return a JSON response."""
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


def identity_headers(record: KeyRecord) -> Headers:
    """Return the headers that tell the upstream whose key this is."""
    return (
        (ACCOUNT_HEADER, record.account_id),
        (KEY_HEADER, record.key_id),
        (SCOPES_HEADER, scopes_value(record)),
    )


def scopes_value(record: KeyRecord) -> str:
    """Return the X-Wacrm-Scopes value of *record*: its scopes, space-separated, or `NO_SCOPES`."""
    return " ".join(record.scopes) or NO_SCOPES


def rate_headers(lookup: Lookup | None) -> Headers:
    """Return the X-RateLimit-* headers of a counted request (none for an unlimited key)."""
    if lookup is None or lookup.remaining < 0:
        return ()
    return (
        (LIMIT_HEADER, str(lookup.limit)),
        (REMAINING_HEADER, str(lookup.remaining)),
        (RESET_HEADER, str(lookup.reset)),
    )


def signature_headers(record: KeyRecord, signing: Signing) -> Headers:
    """Return X-Wacrm-Signature for *record* and the request of *signing*, signed now."""
    value = identity.sign(
        signing.key,
        timestamp=int(time.time()),
        method=signing.method,
        target=signing.target,
        account_id=record.account_id,
        key_id=record.key_id,
        scopes=scopes_value(record),
    )
    return ((SIGNATURE_HEADER, value),)


def _allowed(verdict: Verdict, signing: Signing | None) -> web.Response:
    record = verdict.record
    assert record is not None
    granted = identity_headers(record)
    if signing is not None:
        granted += signature_headers(record, signing)
    return web.Response(headers=(*granted, *rate_headers(verdict.lookup)))


def _refusal(verdict: Verdict) -> web.Response:
    denial = verdict.denial
    assert denial is not None
    return json(
        denial.status, denial.body, (*_denial_headers(denial), *rate_headers(verdict.lookup))
    )


@lru_cache(maxsize=1024)
def _denial_headers(denial: Denial) -> Headers:
    headers: Headers = ()
    if denial.challenge is not None:
        headers += ((AUTHENTICATE_HEADER, denial.challenge),)
    if denial.retry_after is not None:
        headers += ((RETRY_AFTER_HEADER, str(denial.retry_after)),)
    return headers


@lru_cache(maxsize=1024)
def _nginx_form(denial: Denial) -> tuple[int, Headers]:
    """Return the status and headers that carry *denial* through auth_request.

    Any status but 2xx, 401 and 403 becomes nginx's 500, which the shipped snippets turn into
    503; so 400 and 429 travel as 403, with the real status in X-Wacrm-Status.  nginx copies
    WWW-Authenticate from a 401 by itself; on a 403 the snippet adds it from X-Wacrm-Challenge.
    """
    status = denial.status if denial.status in (401, 403, 500, 503) else 403
    carried: Headers = ((STATUS_HEADER, str(denial.status)), (ERROR_HEADER, denial.body.decode()))
    own = tuple(
        (CHALLENGE_HEADER if name == AUTHENTICATE_HEADER and status != 401 else name, value)
        for name, value in _denial_headers(denial)
    )
    return status, (*carried, *own)
