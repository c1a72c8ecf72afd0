"""Decide a request from what it carries and what Redis holds: no I/O here.

The order is Wacrm's: the key (401), then the scope the route needs (403).  Every 401 has one
body whatever the cause, so a revoked key cannot be told from an unknown one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import orjson

from sidecar.records import KeyRecord
from sidecar.routes import NO_SCOPE, Route

REALM = 'Bearer realm="wacrm"'


@dataclass(frozen=True, slots=True)
class Denial:
    """A refusal: its status, Wacrm's JSON body, and what its headers say (`sidecar.answers`)."""

    status: int
    body: bytes
    #: Why, for metrics and debug logs; never shown to the client.
    reason: str
    #: The WWW-Authenticate challenge, if the refusal has one.
    challenge: str | None = None
    #: Seconds after which the client may try again (Retry-After), if it may.
    retry_after: int | None = None


def _error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


UNAUTHORIZED_BODY = _error("unauthorized", "Missing or invalid API key")
INTERNAL_BODY = _error("internal", "Internal server error")
UNAVAILABLE_BODY = _error("internal", "Rate limit service unavailable")
RATE_LIMITED_BODY = _error("rate_limited", "Rate limit exceeded for this API key")

#: No credential at all: RFC 6750 asks for the challenge without an error code.
NO_CREDENTIAL = Denial(401, UNAUTHORIZED_BODY, "missing", REALM)


def invalid_credential(reason: str) -> Denial:
    """Refuse a credential that is malformed, unknown, revoked or expired, all alike."""
    return Denial(401, UNAUTHORIZED_BODY, reason, f'{REALM}, error="invalid_token"')


MALFORMED = invalid_credential("malformed")
UNKNOWN = invalid_credential("unknown")
EXPIRED = invalid_credential("expired")
UNAVAILABLE = Denial(503, UNAVAILABLE_BODY, "unavailable", retry_after=1)
MISCONFIGURED = Denial(500, INTERNAL_BODY, "misconfigured")
SPOOFED = Denial(
    400, _error("bad_request", "Request carries reserved X-Wacrm-* headers"), "spoofed_headers"
)
METHOD_OVERRIDE = Denial(
    400, _error("bad_request", "Method override headers are not accepted"), "method_override"
)
ROUTING_HEADER = Denial(
    400,
    _error(
        "bad_request", "Request carries a routing header spelled with a separator other than '-'"
    ),
    "routing_header",
)
#: An auth request whose X-Original-URI and X-Original-URL name different requests: one of
#: them came from the client (ingress-nginx passes a client's X-Original-URI on unless told
#: the method), and the gate cannot tell which one the upstream will serve.
ORIGINALS_DISAGREE = Denial(
    400,
    _error("bad_request", "X-Original-URI and X-Original-URL name different requests"),
    "routing_header",
)
TOO_MANY_HEADERS = Denial(
    431, _error("bad_request", "Too many request headers"), "too_many_headers"
)


@lru_cache(maxsize=64)
def bad_path(why: str) -> Denial:
    """Refuse a request path that is malformed, or that two servers could read two ways."""
    return Denial(400, _error("bad_request", f"Malformed request path: {why}"), "bad_path")


UNLISTED_ROUTE = Denial(
    403,
    _error("forbidden", "This route is not available to API keys"),
    "unlisted_route",
    f'{REALM}, error="insufficient_scope"',
)


@lru_cache(maxsize=1024)
def rate_limited(retry_after: int) -> Denial:
    """Refuse a key over its rate limit; it may try again in *retry_after* seconds."""
    return Denial(429, RATE_LIMITED_BODY, "rate_limited", retry_after=max(1, retry_after))


@lru_cache(maxsize=512)
def missing_scope(scope: str) -> Denial:
    """Refuse a key that lacks *scope*."""
    return Denial(
        403,
        _error("forbidden", f"This API key is missing the '{scope}' scope"),
        "missing_scope",
        f'{REALM}, error="insufficient_scope", scope="{scope}"',
    )


def authorize(record: KeyRecord, route: Route | None, *, allow_unlisted: bool) -> Denial | None:
    """Return why *record* may not call *route*, or None when it may.

    *route* is None for a path the policy does not list; *allow_unlisted* lets any valid key
    through there.
    """
    if route is None:
        return None if allow_unlisted else UNLISTED_ROUTE
    if route.scope == NO_SCOPE or route.scope in record.scopes:
        return None
    return missing_scope(route.scope)


#: No record, in a Redis that holds no finished load (it restarted empty, say, and the loader
#: is filling it): the key may be valid and not loaded yet, so this is an outage, not a 401.
NOT_LOADED = Denial(503, UNAVAILABLE_BODY, "not_loaded", retry_after=1)
