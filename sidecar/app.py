"""The sidecar's HTTP face: ``/auth`` for the proxy, ``/api/v1/me``, health and readiness."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web

from sidecar import decision
from sidecar.apikeys import key_from_authorization
from sidecar.decision import Denial
from sidecar.records import KeyRecord, Keyspace, decode, hash_key
from sidecar.resp import RespClient
from sidecar.routes import BadPath, Policy, load_policy, normalise
from sidecar.settings import Settings
from sidecar.store import KeyStore, StoreUnavailable

log = logging.getLogger(__name__)

ACCOUNT_HEADER = "X-Wacrm-Account-Id"
KEY_HEADER = "X-Wacrm-Key-Id"
SCOPES_HEADER = "X-Wacrm-Scopes"
#: On a refusal to nginx: the status the client must get and the exact body to send.
STATUS_HEADER = "X-Wacrm-Status"
ERROR_HEADER = "X-Wacrm-Error"
CHALLENGE_HEADER = "X-Wacrm-Challenge"

settings_key = web.AppKey("settings", Settings)
policy_key = web.AppKey("policy", Policy)
store_key = web.AppKey("store", KeyStore)


@dataclass(frozen=True, slots=True)
class Original:
    """The request the proxy is asking about, and whether it speaks nginx's auth_request."""

    method: str
    uri: str
    nginx: bool


def create_app(settings: Settings) -> web.Application:
    """Build the sidecar for *settings*."""
    app = web.Application(handler_args={"max_field_size": 32768, "max_line_size": 32768})
    app[settings_key] = settings
    app[policy_key] = load_policy(settings.routes)
    app.cleanup_ctx.append(_redis_ctx)
    app.router.add_route("*", "/auth", auth)
    app.router.add_route("*", "/forward-auth", forward_auth)
    app.router.add_route("*", "/api/v1/me", me)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def auth(request: web.Request) -> web.Response:
    """Answer nginx's auth_request: 200 with identity headers, or a refusal it can render."""
    original = _nginx_original(request)
    if original is None:
        log.error("auth request without X-Original-URI or X-Original-URL; check the nginx snippet")
        return _refuse(decision.MISCONFIGURED, nginx=True)
    return await _verify(request, original)


async def forward_auth(request: web.Request) -> web.Response:
    """Answer a forward-auth proxy (Traefik, Caddy): the refusal is sent to the client as is.

    A separate endpoint, so that a header a client may send (X-Original-URI reaches a
    forward-auth server untouched) can never choose which route is checked.
    """
    original = _forwarded_original(request)
    if original is None:
        log.error("forward-auth request without X-Forwarded-Uri; check the proxy's settings")
        return _refuse(decision.MISCONFIGURED, nginx=False)
    return await _verify(request, original)


async def _verify(request: web.Request, original: Original) -> web.Response:
    denial, record = await _check(request, original)
    if denial is not None:
        return _refuse(denial, nginx=original.nginx)
    assert record is not None
    return web.Response(
        headers={
            ACCOUNT_HEADER: record.account_id,
            KEY_HEADER: record.key_id,
            SCOPES_HEADER: " ".join(record.scopes),
        }
    )


async def me(request: web.Request) -> web.Response:
    """Answer ``GET /api/v1/me`` in Wacrm's shape for any valid key."""
    if request.method not in ("GET", "HEAD"):
        return _json(
            405,
            b'{"error":{"code":"method_not_allowed","message":"Method not allowed"}}',
            {"Allow": "GET, HEAD"},
        )
    denial, record = await _check(request, Original("GET", "/api/v1/me", nginx=False))
    if denial is not None:
        return _refuse(denial, nginx=False)
    assert record is not None
    body = orjson.dumps(
        {
            "data": {
                "account": {"id": record.account_id, "name": record.account_name},
                "key": {"id": record.key_id, "scopes": record.scopes},
            }
        }
    )
    return _json(200, body, {})


async def healthz(request: web.Request) -> web.Response:
    """Tell that the process is up."""
    return _json(200, b'{"status":"ok"}', {})


async def readyz(request: web.Request) -> web.Response:
    """Tell whether Redis answers, so the sidecar can take traffic."""
    if await request.app[store_key].ping():
        return _json(200, b'{"status":"ready"}', {})
    return _json(503, b'{"status":"redis unavailable"}', {"Retry-After": "1"})


async def _check(
    request: web.Request, original: Original
) -> tuple[Denial | None, KeyRecord | None]:
    if _carries_reserved_headers(request):
        return decision.SPOOFED, None
    try:
        path = normalise(original.uri)
    except BadPath:
        return decision.BAD_PATH, None
    values = request.headers.getall("Authorization", ())
    if not values:
        return decision.NO_CREDENTIAL, None
    key = key_from_authorization(values[0]) if len(values) == 1 else None
    if key is None:
        return decision.MALFORMED, None
    try:
        raw = await request.app[store_key].fetch(hash_key(key))
    except StoreUnavailable as e:
        log.warning("redis unavailable, refusing: %s", e)
        return decision.UNAVAILABLE, None
    if raw is None:
        return decision.UNKNOWN, None
    try:
        record = decode(raw)
    except ValueError:
        log.error("unreadable record in redis; refusing the key")
        return decision.UNKNOWN, None
    if record.is_expired(int(time.time() * 1000)):
        return decision.EXPIRED, None
    settings = request.app[settings_key]
    route = request.app[policy_key].match(original.method, path)
    denial = decision.authorize(record, route, allow_unlisted=settings.unknown_routes == "allow")
    return denial, record


def _nginx_original(request: web.Request) -> Original | None:
    """Read what nginx's auth_request (or ingress-nginx, with a full URL) says it asks about."""
    h = request.headers
    method = h.get("X-Original-Method", "GET").upper()
    uri = h.get("X-Original-URI")
    if uri is not None:
        return Original(method, uri, nginx=True)
    url = h.get("X-Original-URL")
    if url is not None:
        return Original(method, _path_of(url), nginx=True)
    return None


def _forwarded_original(request: web.Request) -> Original | None:
    """Read what a forward-auth proxy (Traefik, Caddy) says it asks about."""
    h = request.headers
    uri = h.get("X-Forwarded-Uri")
    if uri is None:
        return None
    return Original(h.get("X-Forwarded-Method", "GET").upper(), uri, nginx=False)


def _path_of(url: str) -> str:
    """Return the request target of the absolute *url* (scheme://host/target)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return url
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def _carries_reserved_headers(request: web.Request) -> bool:
    return any(name[:8].lower() in ("x-wacrm-", "x_wacrm_") for name in request.headers)


def _refuse(denial: Denial, *, nginx: bool) -> web.Response:
    """Render *denial*: as is for forward-auth, squeezed into 401/403 for nginx."""
    if not nginx:
        return _json(denial.status, denial.body, denial.headers)
    # auth_request passes only 2xx, 401 and 403; anything else becomes nginx's 500, which
    # the shipped snippets turn into 503.  So 400 and 429 travel as 403 plus the real status.
    # nginx copies WWW-Authenticate from a 401 by itself; on any other status the snippet
    # adds it from X-Wacrm-Challenge.
    status = denial.status if denial.status in (401, 403, 500, 503) else 403
    headers = {
        **denial.headers,
        STATUS_HEADER: str(denial.status),
        ERROR_HEADER: denial.body.decode(),
    }
    if status != 401 and "WWW-Authenticate" in headers:
        headers[CHALLENGE_HEADER] = headers.pop("WWW-Authenticate")
    return web.Response(status=status, headers=headers)


def _json(status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    client = RespClient(settings.redis_url, timeout=settings.redis_timeout)
    app[store_key] = KeyStore(client, Keyspace(settings.redis_prefix))
    yield
    await client.aclose()
