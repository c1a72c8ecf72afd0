"""Every shipped front (nginx, Caddy, Traefik, Envoy) holds the same contract, end to end.

Each runs its shipped configuration in front of the real sidecar, real Redis and the echo
upstream (see `tests.e2e.fronts`).  The upstream receives exactly the identity the sidecar
granted and never the client's key; every refusal is Wacrm's JSON; a stopped sidecar or
Redis is a 503 JSON with Retry-After; and no spelling of a path reaches a route with a scope
the key lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e.conftest import store_key
from tests.e2e.fronts import NAMES, front, require
from tests.e2e.rawhttp import Response, request
from tests.e2e.test_outage import UNAVAILABLE

ACCOUNT = "7a1d6c1e-0000-4000-8000-000000000001"
KEY_ID = "5b0e9f7c-0000-4000-8000-000000000002"
UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Missing or invalid API key"}}
FORBIDDEN = "This API key is missing the 'webhooks:manage' scope"
#: Requests a key may make in the tests' rate window: the 4th is refused.
LIMIT = 3


class Stack:
    """The echo upstream and the sidecar, with *name*'s front before them."""

    def __init__(self, name: str, workdir: Path, redis_server: RedisServer) -> None:
        self.name = name
        self.redis_server = redis_server
        self.keyspace = Keyspace(f"{name}:")
        self.upstream = procs.upstream(workdir)
        self.sidecar = procs.sidecar(
            workdir,
            redis_url=redis_server.url,
            extra_env={
                "WACRM_REDIS_PREFIX": self.keyspace.prefix,
                "WACRM_REDIS_TIMEOUT": "0.3",
                "WACRM_RATE_LIMIT": f"{LIMIT}/1h",
            },
        )
        self.front = front(name).start(
            workdir, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def start(self) -> None:
        for p in (self.upstream, self.sidecar, self.front):
            p.start()

    def stop(self) -> None:
        for p in (self.front, self.sidecar, self.upstream):
            p.stop()

    def key(self, *scopes: str) -> str:
        """Store a new key with *scopes* as the loader would; return its plaintext."""
        self.redis_server.start()
        with redis_sync.Redis.from_url(self.redis_server.url) as r:
            r.set(self.keyspace.loaded, 1)
            return store_key(
                r, self.keyspace, scopes, account_id=ACCOUNT, account_name="Acme", key_id=KEY_ID
            )

    def get(self, target: str, **kw: object) -> Response:
        return request(self.front.port, target, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=NAMES)
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
) -> Iterator[Stack]:
    name: str = request.param
    require(name)
    s = Stack(name, tmp_path_factory.mktemp(name), redis_server)
    s.start()
    yield s
    s.stop()


def upstream_saw(resp: Response) -> dict[str, str]:
    """Return the headers the echo upstream received, lower-cased."""
    assert resp.status == 200, resp
    data = resp.json()
    assert isinstance(data, dict)
    return {k.lower(): v for k, v in data["header_list"]}


def assert_refused(resp: Response, status: int, body: object) -> None:
    assert resp.status == status, resp
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp
    assert resp.json() == body
    assert "header_list" not in resp.body.decode(errors="replace")  # not the upstream's


def assert_unavailable(resp: Response) -> None:
    """Assert that *resp* is the outage's answer: Wacrm's 503 JSON with ``Retry-After: 1``."""
    assert_refused(resp, 503, UNAVAILABLE)
    assert resp.header("Retry-After") == "1"


@contextlib.contextmanager
def stopped(server: procs.Process | RedisServer) -> Iterator[None]:
    """Stop *server* for the block, and start it again after."""
    server.stop()
    try:
        yield
    finally:
        server.start()


def test_a_valid_key_reaches_the_upstream_with_its_identity_and_without_itself(
    stack: Stack,
) -> None:
    key = stack.key("contacts:read", "messages:send")
    for authorization in (f"Bearer {key}", f"bearer {key}", key):
        resp = stack.get("/api/v1/contacts?page=2", headers=[("Authorization", authorization)])
        seen = upstream_saw(resp)
        assert {k: v for k, v in seen.items() if k.startswith("x-wacrm-")} == {
            "x-wacrm-account-id": ACCOUNT,
            "x-wacrm-key-id": KEY_ID,
            "x-wacrm-scopes": "contacts:read messages:send",
        }
        assert "authorization" not in seen
        assert resp.json()["path"] == "/api/v1/contacts?page=2"  # type: ignore[index]


def test_refusals_are_wacrms_json(stack: Stack) -> None:
    key = stack.key("contacts:read")
    missing = stack.get("/api/v1/contacts")
    assert_refused(missing, 401, UNAUTHORIZED)
    assert missing.all("WWW-Authenticate") == ['Bearer realm="wacrm"']
    unknown = stack.get("/api/v1/contacts", key="wacrm_live_" + "A" * 43)
    assert_refused(unknown, 401, UNAUTHORIZED)
    assert unknown.all("WWW-Authenticate") == ['Bearer realm="wacrm", error="invalid_token"']
    assert_refused(
        stack.get("/api/v1/webhooks", key=key),
        403,
        {"error": {"code": "forbidden", "message": FORBIDDEN}},
    )
    assert_refused(
        stack.get("/api/v1/contacts", key=key, headers=[("X-Wacrm-Scopes", "webhooks:manage")]),
        400,
        {"error": {"code": "bad_request", "message": "Request carries reserved X-Wacrm-* headers"}},
    )


def test_the_request_past_the_limit_is_a_wacrm_429(stack: Stack) -> None:
    key = stack.key("contacts:read")
    for _ in range(LIMIT):
        assert stack.get("/api/v1/contacts", key=key).status == 200
    resp = stack.get("/api/v1/contacts", key=key)
    assert_refused(
        resp,
        429,
        {"error": {"code": "rate_limited", "message": "Rate limit exceeded for this API key"}},
    )
    assert int(resp.header("Retry-After") or 0) >= 1


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/contacts/../webhooks",
        "/api/v1/./webhooks",
        "/api/v1//webhooks",
        "/api/v1/contacts/%2e%2e/webhooks",
        "/api/v1/contacts/%252e%252e/webhooks",
        "/api/v1/contacts%2F..%2Fwebhooks",
        "/api/v1/contacts\\..\\webhooks",
        "/api/v1/contacts/x%00/../../webhooks",
        "/api/v1/WEBHOOKS",
    ],
)
def test_no_spelling_of_a_path_reaches_a_route_the_key_lacks(stack: Stack, target: str) -> None:
    """The key may read contacts only; each target is, or may be read as, the webhooks
    route.  Whether the proxy cleans the path itself or passes it on, it is refused."""
    key = stack.key("contacts:read")
    resp = stack.get(target, key=key)
    assert 400 <= resp.status < 500, (target, resp)
    assert "header_list" not in resp.body.decode(errors="replace")


def test_a_stopped_sidecar_is_a_503_json(stack: Stack) -> None:
    key = stack.key("contacts:read")
    with stopped(stack.sidecar):
        assert_unavailable(stack.get("/api/v1/contacts", key=key))
    assert stack.get("/api/v1/contacts", key=key).status == 200


def test_a_stopped_redis_is_a_503_json(stack: Stack) -> None:
    key = stack.key("contacts:read")
    with stopped(stack.redis_server):
        assert_unavailable(stack.get("/api/v1/contacts", key=key))
    # Redis came back empty: a key stored again is served again.
    assert stack.get("/api/v1/contacts", key=stack.key("contacts:read")).status == 200
