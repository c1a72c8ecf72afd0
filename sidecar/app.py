"""The sidecar's HTTP face: ``/auth`` for nginx, ``/forward-auth``, ``/api/v1/me``, health."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import istr

from sidecar import answers, decision
from sidecar.metrics import Metrics
from sidecar.options import redact_url
from sidecar.records import Keyspace
from sidecar.resp import RedisUnavailable, ReplyError, RespClient
from sidecar.routes import Policy, load_policy
from sidecar.settings import Settings
from sidecar.store import KeyStore
from sidecar.verifier import Verdict, Verifier

log = logging.getLogger(__name__)

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

    *policy* is the route policy of *settings*, when the caller has loaded it already;
    otherwise it is loaded here (raising PolicyError for a bad route file).
    """

    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.metrics = Metrics()
        self.client = RespClient(settings.redis_url, timeout=settings.redis_timeout)
        self.verifier = Verifier(
            KeyStore(self.client, Keyspace(settings.redis_prefix), settings.rate_limit),
            load_policy(settings.routes) if policy is None else policy,
            self.metrics,
            allow_unlisted=settings.unknown_routes == "allow",
            encoded_slashes=settings.encoded_slashes == "keep",
            touch_interval=settings.last_used_interval,
        )
        #: The key that signs the identity of allowed requests, if any (WACRM_IDENTITY_SECRET).
        self.identity_key = settings.identity_key
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
            return answers.json(404, NOT_FOUND_BODY)
        handler, methods = route
        if methods is not None and request.method not in methods:
            return answers.json(405, METHOD_NOT_ALLOWED_BODY, (("Allow", "GET, HEAD"),))
        return await handler(request)

    async def close(self) -> None:
        """Close the connection to Redis."""
        await self.client.aclose()

    async def check_redis(self) -> None:
        """Log what the sidecar finds at its Redis URL; it serves either way (failing closed)."""
        where = redact_url(self.client.url)
        try:
            info = await self.client.execute("INFO", "server")
        except (RedisUnavailable, ReplyError) as e:
            log.warning("Redis not usable yet, requests get 503 until it is: %s", e)
            return
        version = re.search(rb"redis_version:([^\r\n]+)", info)
        found = version.group(1).decode() if version else "unknown"
        log.info("Redis at %s answers, version %s", where, found)

    async def auth(self, request: web.BaseRequest) -> web.Response:
        """Answer nginx's auth_request: 200 with identity headers, or a refusal it can render.

        The original request comes as X-Original-Method and X-Original-URI (nginx), or
        X-Original-URL, a full URL (ingress-nginx).  Both present, they must name the same
        request target, each once: otherwise one came from the client.
        """
        h = request.headers
        uris, urls = h.getall(ORIGINAL_URI, ()), h.getall(ORIGINAL_URL, ())
        uri = uris[0] if uris else None
        if urls:
            target = _target_of(urls[0])
            if len(uris) > 1 or len(urls) > 1 or uri not in (None, target):
                return answers.to_nginx(Verdict(decision.ORIGINALS_DISAGREE))
            uri = target
        if uri is None:
            log.error(
                "auth request without X-Original-URI or X-Original-URL; check the nginx snippet"
            )
            return answers.to_nginx(Verdict(decision.MISCONFIGURED))
        method = h.get(ORIGINAL_METHOD, "GET")
        verdict = await self.verifier.verify(h, method, uri)
        return answers.to_nginx(verdict, self._signing(verdict, method, uri))

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
            return answers.to_client(Verdict(decision.MISCONFIGURED))
        method = h.get(FORWARDED_METHOD, "GET")
        verdict = await self.verifier.verify(h, method, uri)
        return answers.to_client(verdict, self._signing(verdict, method, uri))

    async def me(self, request: web.BaseRequest) -> web.Response:
        """Answer ``GET /api/v1/me`` in Wacrm's shape for any valid key."""
        # The path as sent: the same rules as every other route (no "/api/v1/./me").
        return answers.me(await self.verifier.verify(request.headers, "GET", request.raw_path))

    def _signing(self, verdict: Verdict, method: str, target: str) -> answers.Signing | None:
        """Return what signs the identity of an allowed *verdict* for *method* and *target*."""
        if self.identity_key is None or verdict.denial is not None:
            return None
        return answers.Signing(self.identity_key, method, target)

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        """Tell that the process is up."""
        return answers.json(200, b'{"status":"ok"}')

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        """Tell whether Redis answers (a Cluster: all of it), so the sidecar can take traffic."""
        if await self.verifier.store.problem() is None:
            return answers.json(200, b'{"status":"ready"}')
        return answers.json(503, b'{"status":"redis unavailable"}', (("Retry-After", "1"),))

    async def metrics_page(self, request: web.BaseRequest) -> web.Response:
        """Expose the metrics in Prometheus's text format."""
        return web.Response(
            body=self.metrics.exposition(),
            content_type="text/plain",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )


_GET = frozenset({"GET", "HEAD"})


def _target_of(url: str) -> str:
    """Return the request target of the absolute *url* (scheme://host/target)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return url
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"
