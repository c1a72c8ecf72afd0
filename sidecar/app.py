"""The sidecar's HTTP face: ``/auth`` for nginx, ``/forward-auth``, ``/api/v1/me``, health."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from sidecar import decision
from sidecar.decision import Denial
from sidecar.metrics import Metrics
from sidecar.records import Keyspace
from sidecar.resp import RespClient
from sidecar.routes import load_policy
from sidecar.settings import Settings
from sidecar.store import KeyStore
from sidecar.verifier import Headers, Verdict, Verifier, decode_record

log = logging.getLogger(__name__)

# Header names as istr: multidict then skips folding their case on every request.
ACCOUNT_HEADER = istr("X-Wacrm-Account-Id")
KEY_HEADER = istr("X-Wacrm-Key-Id")
SCOPES_HEADER = istr("X-Wacrm-Scopes")
#: X-Wacrm-Scopes of a key without scopes: proxies drop an empty header, and a missing one
#: must mean "not through the gate".  "-" is the route file's own word for no scope.
NO_SCOPES = "-"
#: On a refusal to nginx: the status the client must get, the exact body, the challenge.
STATUS_HEADER = istr("X-Wacrm-Status")
ERROR_HEADER = istr("X-Wacrm-Error")
CHALLENGE_HEADER = istr("X-Wacrm-Challenge")
ORIGINAL_URI = istr("X-Original-URI")
ORIGINAL_URL = istr("X-Original-URL")
ORIGINAL_METHOD = istr("X-Original-Method")
FORWARDED_URI = istr("X-Forwarded-Uri")
FORWARDED_METHOD = istr("X-Forwarded-Method")

#: aiohttp's request parser limits: large enough for any request nginx lets through, so that
#: the gate, not the parser, refuses what is too large (the verifier's MAX_HEADERS).
HANDLER_ARGS: dict[str, Any] = {
    "max_field_size": 32768,
    "max_line_size": 32768,
    "max_headers": 16384,
}

NOT_FOUND_BODY = b'{"error":{"code":"not_found","message":"Not found"}}'
METHOD_NOT_ALLOWED_BODY = b'{"error":{"code":"method_not_allowed","message":"Method not allowed"}}'

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Gate:
    """The sidecar's endpoints for *settings*, as one aiohttp low-level request handler.

    A request costs little more than aiohttp's own parsing and writing: its path is looked up
    in a dict, then the endpoint answers.  The fixed paths here need none of what
    `web.Application` adds per request (router, match info, signals).  Serve it with
    `web.Server`, and `close` it once the server has stopped.

    Raise PolicyError for a bad route file.
    """

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics()
        self.client = RespClient(settings.redis_url, timeout=settings.redis_timeout)
        self.verifier = Verifier(
            KeyStore(self.client, Keyspace(settings.redis_prefix), settings.rate_limit),
            load_policy(settings.routes),
            self.metrics,
            allow_unlisted=settings.unknown_routes == "allow",
            encoded_slashes=settings.encoded_slashes == "keep",
            touch_interval=settings.last_used_interval,
        )
        self._routes: dict[str, tuple[Handler, frozenset[str] | None]] = {
            "/auth": (self.auth, None),
            "/forward-auth": (self.forward_auth, None),
            "/api/v1/me": (self.me, _GET),
            "/healthz": (self.healthz, _GET),
            "/readyz": (self.readyz, _GET),
            "/metrics": (self.metrics_page, _GET),
        }

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer *request* from the endpoint at its path."""
        route = self._routes.get(request.path)
        if route is None:
            return _json(404, NOT_FOUND_BODY, ())
        handler, methods = route
        if methods is not None and request.method not in methods:
            return _json(405, METHOD_NOT_ALLOWED_BODY, (("Allow", "GET, HEAD"),))
        return await handler(request)

    async def close(self) -> None:
        """Close the connection to Redis."""
        await self.client.aclose()

    async def auth(self, request: web.BaseRequest) -> web.Response:
        """Answer nginx's auth_request: 200 with identity headers, or a refusal it can render.

        The original request comes as X-Original-Method and X-Original-URI (nginx), or
        X-Original-URL, a full URL (ingress-nginx).
        """
        h = request.headers
        uri = h.get(ORIGINAL_URI)
        if uri is None and (url := h.get(ORIGINAL_URL)) is not None:
            uri = _target_of(url)
        if uri is None:
            log.error(
                "auth request without X-Original-URI or X-Original-URL; check the nginx snippet"
            )
            return _nginx_refusal(decision.MISCONFIGURED, ())
        verdict = await self.verifier.verify(h, h.get(ORIGINAL_METHOD, "GET"), uri)
        if verdict.denial is not None:
            return _nginx_refusal(verdict.denial, verdict.rate_headers())
        return _allowed(verdict)

    async def forward_auth(self, request: web.BaseRequest) -> web.Response:
        """Answer a forward-auth proxy (Traefik, Caddy), which relays a refusal as is.

        The original request comes as X-Forwarded-Method and X-Forwarded-Uri.  This is a
        separate endpoint so that a header a client can send (X-Original-URI reaches a
        forward-auth server untouched) can never choose the route that is checked.
        """
        h = request.headers
        uri = h.get(FORWARDED_URI)
        if uri is None:
            log.error("forward-auth request without X-Forwarded-Uri; check the proxy's settings")
            return _refusal(Verdict(decision.MISCONFIGURED))
        verdict = await self.verifier.verify(h, h.get(FORWARDED_METHOD, "GET"), uri)
        if verdict.denial is not None:
            return _refusal(verdict)
        return _allowed(verdict)

    async def me(self, request: web.BaseRequest) -> web.Response:
        """Answer ``GET /api/v1/me`` in Wacrm's shape for any valid key."""
        # The path as sent: the same rules as every other route (no "/api/v1/./me").
        verdict = await self.verifier.verify(request.headers, "GET", request.raw_path)
        if verdict.denial is not None:
            return _refusal(verdict)
        record = verdict.record
        assert record is not None
        body = orjson.dumps(
            {
                "data": {
                    "account": {"id": record.account_id, "name": record.account_name},
                    "key": {"id": record.key_id, "scopes": record.scopes},
                }
            }
        )
        return _json(200, body, verdict.rate_headers())

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        """Tell that the process is up."""
        return _json(200, b'{"status":"ok"}', ())

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        """Tell whether Redis answers, so the sidecar can take traffic."""
        if await self.verifier.store.ping():
            return _json(200, b'{"status":"ready"}', ())
        return _json(503, b'{"status":"redis unavailable"}', (("Retry-After", "1"),))

    async def metrics_page(self, request: web.BaseRequest) -> web.Response:
        """Expose the metrics in Prometheus's text format."""
        return web.Response(
            body=self.metrics.exposition(),
            content_type="text/plain",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )


_GET = frozenset({"GET", "HEAD"})


def _allowed(verdict: Verdict) -> web.Response:
    """Let the request through: the key's identity, and where it stands on its rate limit."""
    assert verdict.lookup is not None
    return web.Response(headers=(*_identity_of(verdict.lookup.raw), *verdict.rate_headers()))


@lru_cache(maxsize=16384)
def _identity_of(raw: bytes) -> Headers:
    # Cached by the stored bytes, like the record the verifier decoded from them.
    record = decode_record(raw)
    return (
        (ACCOUNT_HEADER, record.account_id),
        (KEY_HEADER, record.key_id),
        (SCOPES_HEADER, " ".join(record.scopes) or NO_SCOPES),
    )


def _target_of(url: str) -> str:
    """Return the request target of the absolute *url* (scheme://host/target)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return url
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def _refusal(verdict: Verdict) -> web.Response:
    denial = verdict.denial
    assert denial is not None
    return _json(denial.status, denial.body, (*denial.headers, *verdict.rate_headers()))


def _nginx_refusal(denial: Denial, rate_headers: Headers) -> web.Response:
    """Squeeze *denial* into what auth_request passes on: 401 or 403, plus the real status."""
    status, headers = _nginx_form(denial)
    return web.Response(status=status, headers=(*headers, *rate_headers))


@lru_cache(maxsize=1024)
def _nginx_form(denial: Denial) -> tuple[int, Headers]:
    """Return the status and headers that carry *denial* through auth_request.

    Any status but 2xx, 401 and 403 becomes nginx's 500, which the shipped snippets turn into
    503; so 400 and 429 travel as 403, with the real status in X-Wacrm-Status.  nginx copies
    WWW-Authenticate from a 401 by itself; on a 403 the snippet adds it from X-Wacrm-Challenge.
    """
    status = denial.status if denial.status in (401, 403, 500, 503) else 403
    headers = {
        **dict(denial.headers),
        STATUS_HEADER: str(denial.status),
        ERROR_HEADER: denial.body.decode(),
    }
    if status != 401 and "WWW-Authenticate" in headers:
        headers[CHALLENGE_HEADER] = headers.pop("WWW-Authenticate")
    return status, tuple(headers.items())


def _json(status: int, body: bytes, headers: Headers) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")
