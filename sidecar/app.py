"""The sidecar's HTTP face: ``/auth`` for nginx, ``/forward-auth``, ``/api/v1/me``, health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import lru_cache

import orjson
from aiohttp import web

from sidecar import decision
from sidecar.decision import Denial
from sidecar.metrics import Metrics
from sidecar.records import Keyspace, decode
from sidecar.resp import RespClient
from sidecar.routes import Policy, load_policy
from sidecar.settings import Settings
from sidecar.store import KeyStore
from sidecar.verifier import Verdict, Verifier

log = logging.getLogger(__name__)

ACCOUNT_HEADER = "X-Wacrm-Account-Id"
KEY_HEADER = "X-Wacrm-Key-Id"
SCOPES_HEADER = "X-Wacrm-Scopes"
#: On a refusal to nginx: the status the client must get, the exact body, the challenge.
STATUS_HEADER = "X-Wacrm-Status"
ERROR_HEADER = "X-Wacrm-Error"
CHALLENGE_HEADER = "X-Wacrm-Challenge"

settings_key = web.AppKey("settings", Settings)
metrics_key = web.AppKey("metrics", Metrics)
policy_key = web.AppKey("policy", Policy)
verifier_key = web.AppKey("verifier", Verifier)

#: aiohttp's request parser limits: large enough for any header nginx lets through.
HANDLER_ARGS = {"max_field_size": 32768, "max_line_size": 32768}


def create_app(settings: Settings) -> web.Application:
    """Build the sidecar for *settings*; raise PolicyError for a bad route file."""
    app = web.Application(handler_args=HANDLER_ARGS)
    app[settings_key] = settings
    app[policy_key] = load_policy(settings.routes)  # a bad route file is refused here
    app[metrics_key] = Metrics()
    app.cleanup_ctx.append(_verifier_ctx)
    app.router.add_route("*", "/auth", auth)
    app.router.add_route("*", "/forward-auth", forward_auth)
    app.router.add_route("*", "/api/v1/me", me)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def auth(request: web.Request) -> web.Response:
    """Answer nginx's auth_request: 200 with identity headers, or a refusal it can render.

    The original request comes as X-Original-Method and X-Original-URI (nginx), or
    X-Original-URL, a full URL (ingress-nginx).
    """
    h = request.headers
    uri = h.get("X-Original-URI")
    if uri is None and (url := h.get("X-Original-URL")) is not None:
        uri = _target_of(url)
    if uri is None:
        log.error("auth request without X-Original-URI or X-Original-URL; check the nginx snippet")
        return _nginx_refusal(decision.MISCONFIGURED, {})
    verdict = await request.app[verifier_key].verify(h, h.get("X-Original-Method", "GET"), uri)
    if verdict.denial is not None:
        return _nginx_refusal(verdict.denial, verdict.rate_headers())
    return web.Response(headers=_identity(verdict))


async def forward_auth(request: web.Request) -> web.Response:
    """Answer a forward-auth proxy (Traefik, Caddy), which relays a refusal to the client as is.

    The original request comes as X-Forwarded-Method and X-Forwarded-Uri.  This is a separate
    endpoint so that a header a client can send (X-Original-URI reaches a forward-auth server
    untouched) can never choose the route that is checked.
    """
    h = request.headers
    uri = h.get("X-Forwarded-Uri")
    if uri is None:
        log.error("forward-auth request without X-Forwarded-Uri; check the proxy's settings")
        return _refusal(Verdict(decision.MISCONFIGURED))
    verdict = await request.app[verifier_key].verify(h, h.get("X-Forwarded-Method", "GET"), uri)
    if verdict.denial is not None:
        return _refusal(verdict)
    return web.Response(headers=_identity(verdict))


async def me(request: web.Request) -> web.Response:
    """Answer ``GET /api/v1/me`` in Wacrm's shape for any valid key."""
    if request.method not in ("GET", "HEAD"):
        return _json(
            405,
            b'{"error":{"code":"method_not_allowed","message":"Method not allowed"}}',
            {"Allow": "GET, HEAD"},
        )
    verdict = await request.app[verifier_key].verify(request.headers, "GET", "/api/v1/me")
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


async def healthz(request: web.Request) -> web.Response:
    """Tell that the process is up."""
    return _json(200, b'{"status":"ok"}', {})


async def readyz(request: web.Request) -> web.Response:
    """Tell whether Redis answers, so the sidecar can take traffic."""
    if await request.app[verifier_key].store.ping():
        return _json(200, b'{"status":"ready"}', {})
    return _json(503, b'{"status":"redis unavailable"}', {"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    """Expose the metrics in Prometheus's text format."""
    return web.Response(
        body=request.app[metrics_key].exposition(),
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def _identity(verdict: Verdict) -> dict[str, str]:
    assert verdict.lookup is not None
    return {**_identity_of(verdict.lookup.raw), **verdict.rate_headers()}


@lru_cache(maxsize=16384)
def _identity_of(raw: bytes) -> dict[str, str]:
    # Cached by the stored bytes, as the verifier caches records: a changed record is a new
    # entry.  Never mutate the result.
    record = decode(raw)
    return {
        ACCOUNT_HEADER: record.account_id,
        KEY_HEADER: record.key_id,
        SCOPES_HEADER: " ".join(record.scopes),
    }


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
    return _json(denial.status, denial.body, {**dict(denial.headers), **verdict.rate_headers()})


def _nginx_refusal(denial: Denial, rate_headers: dict[str, str]) -> web.Response:
    """Squeeze *denial* into what auth_request passes on: 401 or 403, plus the real status."""
    status, headers = _nginx_form(denial)
    return web.Response(status=status, headers={**headers, **rate_headers})


@lru_cache(maxsize=1024)
def _nginx_form(denial: Denial) -> tuple[int, dict[str, str]]:
    """Return the status and headers that carry *denial* through auth_request.

    Any status but 2xx, 401 and 403 becomes nginx's 500, which the shipped snippets turn into
    503; so 400 and 429 travel as 403, with the real status in X-Wacrm-Status.  nginx copies
    WWW-Authenticate from a 401 by itself; on a 403 the snippet adds it from X-Wacrm-Challenge.
    The result is shared: never mutate it.
    """
    status = denial.status if denial.status in (401, 403, 500, 503) else 403
    headers = {
        **dict(denial.headers),
        STATUS_HEADER: str(denial.status),
        ERROR_HEADER: denial.body.decode(),
    }
    if status != 401 and "WWW-Authenticate" in headers:
        headers[CHALLENGE_HEADER] = headers.pop("WWW-Authenticate")
    return status, headers


def _json(status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


async def _verifier_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    client = RespClient(settings.redis_url, timeout=settings.redis_timeout)
    store = KeyStore(client, Keyspace(settings.redis_prefix), settings.rate_limit)
    app[verifier_key] = Verifier(
        store,
        app[policy_key],
        app[metrics_key],
        allow_unlisted=settings.unknown_routes == "allow",
        touch_interval=settings.last_used_interval,
    )
    yield
    await client.aclose()
