"""The verifier's HTTP answers, through aiohttp's test client, against the session's Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from redis.asyncio import Redis

from demo import procs
from sidecar import apikeys, records
from sidecar.app import HANDLER_ARGS, Gate
from sidecar.records import KeyRecord, Keyspace, RateLimit
from sidecar.settings import Settings
from tests.conftest import RedisServer

Client = TestClient[web.BaseRequest, web.Server]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return Settings(redis_url=redis_server.url)


@pytest.fixture
async def fake(redis: Redis) -> Redis:
    """The session's real Redis, emptied and marked loaded: where the tests put records."""
    await redis.set(Keyspace().loaded, 1)
    return redis


@pytest.fixture
async def make_client(
    aiohttp_raw_server: Callable[..., Awaitable[RawTestServer]],
    aiohttp_client: Callable[[RawTestServer], Awaitable[Client]],
) -> AsyncIterator[MakeClient]:
    """Serve a `Gate` for the settings given, as the sidecar does; close it afterwards."""
    gates: list[Gate] = []

    async def make(settings: Settings) -> Client:
        gate = Gate(settings)
        gates.append(gate)
        return await aiohttp_client(await aiohttp_raw_server(gate, **HANDLER_ARGS))

    yield make
    for gate in gates:
        await gate.close()


@pytest.fixture
async def client(make_client: MakeClient, settings: Settings) -> Client:
    return await make_client(settings)


async def put(fake: Any, scopes: tuple[str, ...] = (), expires_at_ms: int | None = None) -> str:
    minted = apikeys.mint()
    rec = KeyRecord("key-1", "acct-1", "Acme", minted.key_prefix, scopes, expires_at_ms)
    await fake.set(Keyspace().record(minted.key_hash), records.encode(rec, version=1))
    return minted.plaintext


def nginx(uri: str, key: str | None = None, method: str = "GET") -> dict[str, str]:
    h = {"X-Original-URI": uri, "X-Original-Method": method}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def forwarded(uri: str, key: str, method: str | None = None) -> dict[str, str]:
    """The headers a forward-auth proxy sends; no X-Forwarded-Method unless *method*."""
    h = {"X-Forwarded-Uri": uri, "Authorization": f"Bearer {key}"}
    if method is not None:
        h["X-Forwarded-Method"] = method
    return h


async def test_allow_carries_identity(client: Client, fake: Any) -> None:
    key = await put(fake, ("contacts:read", "contacts:write"))
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts/1", key, "PATCH"))
    assert resp.status == 200
    assert resp.headers["X-Wacrm-Account-Id"] == "acct-1"
    assert resp.headers["X-Wacrm-Key-Id"] == "key-1"
    assert resp.headers["X-Wacrm-Scopes"] == "contacts:read contacts:write"


async def test_redis_over_a_unix_socket(
    make_client: MakeClient, redis_server: RedisServer, fake: Any
) -> None:
    client = await make_client(Settings(redis_url=redis_server.socket_url))
    key = await put(fake, ("contacts:read",))
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.status == 200
    assert resp.headers["X-Wacrm-Key-Id"] == "key-1"
    assert (await client.get("/readyz")).status == 200


async def test_subrequest_keeps_the_clients_method(client: Client, fake: Any) -> None:
    """nginx sends the auth subrequest with the client's method: /auth answers any."""
    key = await put(fake, ("messages:send",))
    resp = await client.post("/auth", headers=nginx("/api/v1/messages", key, "POST"))
    assert resp.status == 200


async def test_nginx_refusal_carries_status_body_and_challenge(client: Client, fake: Any) -> None:
    key = await put(fake, ())
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.status == 403
    assert resp.headers["X-Wacrm-Status"] == "403"
    assert resp.headers["X-Wacrm-Error"] == (
        '{"error":{"code":"forbidden",'
        '"message":"This API key is missing the \'contacts:read\' scope"}}'
    )
    assert resp.headers["X-Wacrm-Challenge"].endswith('scope="contacts:read"')
    assert "WWW-Authenticate" not in resp.headers


async def test_nginx_400_travels_as_403_with_the_real_status(client: Client) -> None:
    resp = await client.get("/auth", headers=nginx("/api/%zz"))
    assert resp.status == 403
    assert resp.headers["X-Wacrm-Status"] == "400"


async def test_expired_record_is_refused(client: Client, fake: Any) -> None:
    key = await put(fake, ("contacts:read",), expires_at_ms=int(time.time() * 1000) - 1)
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.status == 401


async def test_corrupt_record_fails_closed(client: Client, fake: Any) -> None:
    minted = apikeys.mint()
    await fake.set(Keyspace().record(minted.key_hash), b"garbage")
    resp = await client.get("/auth", headers=nginx("/api/v1/me", minted.plaintext))
    assert resp.status == 401


async def test_auth_without_original_uri_fails_closed(client: Client, fake: Any) -> None:
    key = await put(fake, ("contacts:read",))
    resp = await client.get("/auth", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 500


async def test_ingress_nginx_full_url_is_understood(client: Client, fake: Any) -> None:
    key = await put(fake, ("contacts:read",))
    headers = {
        "X-Original-URL": "https://api.example.com/api/v1/contacts?x=1",
        "X-Original-Method": "GET",
        "Authorization": f"Bearer {key}",
    }
    assert (await client.get("/auth", headers=headers)).status == 200
    headers["X-Original-URL"] = "https://api.example.com/api/v1/webhooks"
    assert (await client.get("/auth", headers=headers)).status == 403


async def test_an_x_original_uri_that_contradicts_x_original_url_is_refused(
    client: Client, fake: Any
) -> None:
    """ingress-nginx sets X-Original-URL, and passes a client's X-Original-URI on unless
    auth-method is set: the two disagreeing, the request is refused, not checked by either."""
    key = await put(fake, ("contacts:read",))
    headers = {
        "X-Original-URL": "https://api.example.com/api/v1/webhooks",
        "X-Original-URI": "/api/v1/contacts",
        "Authorization": f"Bearer {key}",
    }
    resp = await client.get("/auth", headers=headers)
    assert (resp.status, resp.headers["X-Wacrm-Status"]) == (403, "400")  # nginx's form of a 400
    assert "different requests" in resp.headers["X-Wacrm-Error"]
    headers["X-Original-URI"] = "/api/v1/webhooks"  # agreeing: checked (and refused) as one
    resp = await client.get("/auth", headers=headers)
    assert (resp.status, resp.headers["X-Wacrm-Status"]) == (403, "403")  # the missing scope
    agreeing = {**headers, "X-Original-URL": "https://h/api/v1/contacts?x=1"}
    agreeing["X-Original-URI"] = "/api/v1/contacts?x=1"
    assert (await client.get("/auth", headers=agreeing)).status == 200


async def test_forward_auth_sends_real_status_and_body(client: Client, fake: Any) -> None:
    key = await put(fake, ("contacts:read",))
    resp = await client.get("/forward-auth", headers=forwarded("/api/v1/contacts", key, "POST"))
    assert resp.status == 403
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == "forbidden"


async def test_forward_auth_ignores_x_original_uri_from_the_client(
    client: Client, fake: Any
) -> None:
    key = await put(fake, ())
    headers = {**forwarded("/api/v1/webhooks", key), "X-Original-URI": "/api/v1/me"}
    assert (await client.get("/forward-auth", headers=headers)).status == 403


async def test_me_answers_in_wacrms_shape(client: Client, fake: Any) -> None:
    key = await put(fake, ("messages:send",))
    resp = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert await resp.json() == {
        "data": {
            "account": {"id": "acct-1", "name": "Acme"},
            "key": {"id": "key-1", "scopes": ["messages:send"]},
        }
    }


async def test_me_refuses_other_methods(client: Client, fake: Any) -> None:
    key = await put(fake, ())
    resp = await client.post("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD"


async def test_other_paths_get_a_json_404(client: Client) -> None:
    for path in ("/", "/authx", "/auth/", "/api/v1/contacts"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert await resp.json() == {"error": {"code": "not_found", "message": "Not found"}}


async def test_health_pages_answer_get_and_head_only(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.head(path)).status == 200, path
        resp = await client.post(path)
        assert resp.status == 405, path
        assert resp.headers["Allow"] == "GET, HEAD"
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_unknown_routes_can_be_allowed(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    client = await make_client(replace(settings, unknown_routes="allow"))
    key = await put(fake, ())
    assert (await client.get("/auth", headers=nginx("/internal/x", key))).status == 200
    assert (await client.get("/auth", headers=nginx("/api/v1/webhooks", key))).status == 403


async def test_a_lower_case_method_is_held_to_its_routes_scope(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    client = await make_client(replace(settings, unknown_routes="allow"))
    key = await put(fake, ())
    headers = forwarded("/api/v1/webhooks", key, "get")
    assert (await client.get("/forward-auth", headers=headers)).status == 403


async def test_redis_unreachable_fails_closed(make_client: MakeClient) -> None:
    closed = f"redis://127.0.0.1:{procs.free_port()}/0"
    client = await make_client(Settings(redis_url=closed))
    key = apikeys.mint().plaintext
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_ready_when_redis_answers(client: Client) -> None:
    assert (await client.get("/readyz")).status == 200


async def test_redis_prefix_is_honoured(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    client = await make_client(replace(settings, redis_prefix="t2:"))
    await fake.set(Keyspace("t2:").loaded, 1)
    key = await put(fake, ())  # stored under the default prefix: another deployment's key
    assert (await client.get("/auth", headers=nginx("/api/v1/me", key))).status == 401


async def test_allowed_requests_carry_rate_limit_headers(client: Client, fake: Redis) -> None:
    key = await put(fake, ("contacts:read",))
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.headers["X-RateLimit-Limit"] == "120"
    assert resp.headers["X-RateLimit-Remaining"] == "119"
    assert int(resp.headers["X-RateLimit-Reset"]) > time.time()


async def _exhaust(
    make_client: MakeClient, settings: Settings, fake: Redis, headers: dict[str, str]
) -> Client:
    client = await make_client(replace(settings, rate_limit=RateLimit(2, 60_000)))
    for _ in range(2):
        assert (await client.get("/auth", headers=headers)).status == 200
    return client


async def test_over_the_limit_travels_to_nginx_as_403_with_429(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    key = await put(fake, ("contacts:read",))
    headers = nginx("/api/v1/contacts", key)
    client = await _exhaust(make_client, settings, fake, headers)
    resp = await client.get("/auth", headers=headers)
    assert resp.status == 403
    assert resp.headers["X-Wacrm-Status"] == "429"
    assert resp.headers["X-Wacrm-Error"] == (
        '{"error":{"code":"rate_limited","message":"Rate limit exceeded for this API key"}}'
    )
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["X-RateLimit-Remaining"] == "0"


async def test_scope_refusals_count_against_the_limit(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    key = await put(fake, ())
    headers = nginx("/api/v1/contacts", key)
    client = await make_client(replace(settings, rate_limit=RateLimit(2, 60_000)))
    statuses = [
        (await client.get("/auth", headers=headers)).headers["X-Wacrm-Status"] for _ in range(3)
    ]
    assert statuses == ["403", "403", "429"]


async def test_unknown_keys_do_not_count(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    client = await make_client(replace(settings, rate_limit=RateLimit(1, 60_000)))
    unknown = apikeys.mint().plaintext
    for _ in range(3):
        assert (await client.get("/auth", headers=nginx("/api/v1/me", unknown))).status == 401
    assert await fake.keys("wacrm:rl:*") == []


async def test_forward_auth_sends_a_real_429(
    make_client: MakeClient, settings: Settings, fake: Redis
) -> None:
    key = await put(fake, ())
    headers = forwarded("/api/v1/me", key)
    client = await make_client(replace(settings, rate_limit=RateLimit(1, 60_000)))
    assert (await client.get("/forward-auth", headers=headers)).status == 200
    resp = await client.get("/forward-auth", headers=headers)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "rate_limited"
    assert resp.headers["X-RateLimit-Limit"] == "1"


async def test_rate_limit_off(make_client: MakeClient, settings: Settings, fake: Redis) -> None:
    key = await put(fake, ())
    client = await make_client(replace(settings, rate_limit=None))
    for _ in range(5):
        resp = await client.get("/auth", headers=nginx("/api/v1/me", key))
        assert resp.status == 200
        assert "X-RateLimit-Limit" not in resp.headers


async def test_use_is_noted_once_per_interval(client: Client, fake: Redis) -> None:
    key = await put(fake, ("contacts:read",))
    before = time.time() * 1000
    assert (await client.get("/auth", headers=nginx("/api/v1/contacts", key))).status == 200
    score = await fake.zscore("wacrm:used", "key-1")
    assert score is not None and score >= before - 1
    await fake.delete("wacrm:used")
    for _ in range(5):
        await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    assert await fake.zscore("wacrm:used", "key-1") is None


async def test_refused_requests_are_not_noted_as_use(client: Client, fake: Redis) -> None:
    key = await put(fake, ())
    assert (await client.get("/auth", headers=nginx("/api/v1/contacts", key))).status == 403
    assert await fake.zscore("wacrm:used", "key-1") is None


async def test_metrics_count_decisions_by_outcome_and_reason(client: Client, fake: Redis) -> None:
    key = await put(fake, ())
    await client.get("/auth", headers=nginx("/api/v1/me", key))
    await client.get("/auth", headers=nginx("/api/v1/contacts", key))
    await client.get("/auth", headers=nginx("/api/v1/me", apikeys.mint().plaintext))
    text = await (await client.get("/metrics")).text()
    assert 'wacrm_gate_decisions_total{outcome="allowed",reason="ok"} 1.0' in text
    assert 'wacrm_gate_decisions_total{outcome="forbidden",reason="missing_scope"} 1.0' in text
    assert 'wacrm_gate_decisions_total{outcome="unauthorized",reason="unknown"} 1.0' in text
    assert "wacrm_gate_verify_seconds_count 3.0" in text


UNAVAILABLE_BODY = '{"error":{"code":"internal","message":"Rate limit service unavailable"}}'


@pytest.mark.parametrize("mark", [None, b"0"])
async def test_without_a_finished_load_an_unknown_key_is_503_not_401(
    client: Client, fake: Redis, mark: bytes | None
) -> None:
    """Redis emptied (mark absent) or being loaded for the first time (mark 0): a key it does
    not hold may be valid, so it gets the outage's 503; a key it holds is judged as ever."""
    key = await put(fake, ("contacts:read",))
    if mark is None:
        await fake.delete(Keyspace().loaded)
    else:
        await fake.set(Keyspace().loaded, mark)
    unknown = apikeys.mint().plaintext

    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", unknown))
    assert resp.status == 503
    assert resp.headers["X-Wacrm-Status"] == "503"
    assert resp.headers["X-Wacrm-Error"] == UNAVAILABLE_BODY
    assert resp.headers["Retry-After"] == "1"
    assert "WWW-Authenticate" not in resp.headers
    direct = await client.get("/forward-auth", headers=forwarded("/api/v1/contacts", unknown))
    assert direct.status == 503
    assert await direct.text() == UNAVAILABLE_BODY
    assert direct.headers["Retry-After"] == "1"
    me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {unknown}"})
    assert me.status == 503
    assert (await client.get("/auth", headers=nginx("/api/v1/contacts", key))).status == 200
    malformed = await client.get("/auth", headers=nginx("/api/v1/contacts", unknown[:-1]))
    assert malformed.status == 401
    text = await (await client.get("/metrics")).text()
    assert 'wacrm_gate_decisions_total{outcome="unavailable",reason="not_loaded"} 3.0' in text
    assert 'wacrm_gate_decisions_total{outcome="unauthorized",reason="malformed"} 1.0' in text
    assert 'wacrm_gate_redis_errors_total{kind="connection"} 0.0' in text


async def test_a_malformed_key_is_401_without_asking_redis(client: Client, fake: Redis) -> None:
    await fake.delete(Keyspace().loaded)
    await fake.config_resetstat()
    resp = await client.get("/auth", headers=nginx("/api/v1/contacts", "wacrm_live_short"))
    assert resp.status == 401
    stats = await fake.info("commandstats")
    assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats


async def test_a_finished_load_makes_an_unknown_key_a_401_again(
    client: Client, fake: Redis
) -> None:
    await fake.set(Keyspace().loaded, 0)
    unknown = apikeys.mint().plaintext
    assert (await client.get("/auth", headers=nginx("/api/v1/me", unknown))).status == 503
    await fake.set(Keyspace().loaded, 1_700_000_000_000)
    resp = await client.get("/auth", headers=nginx("/api/v1/me", unknown))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="wacrm", error="invalid_token"'


async def test_metrics_count_redis_failures(make_client: MakeClient) -> None:
    closed = f"redis://127.0.0.1:{procs.free_port()}/0"
    client = await make_client(Settings(redis_url=closed))
    await client.get("/auth", headers=nginx("/api/v1/me", apikeys.mint().plaintext))
    text = await (await client.get("/metrics")).text()
    assert 'wacrm_gate_redis_errors_total{kind="connection"} 1.0' in text
    assert 'wacrm_gate_decisions_total{outcome="unavailable",reason="unavailable"} 1.0' in text
