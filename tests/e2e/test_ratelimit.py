"""Per-key rate limits through real nginx, and shared by two sidecar processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from demo import procs
from tests.conftest import RedisServer
from tests.e2e.conftest import Gate

RATE_LIMITED = {
    "error": {"code": "rate_limited", "message": "Rate limit exceeded for this API key"}
}


def test_allowed_responses_carry_rate_limit_headers(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", key=key)
    assert resp.status == 200
    assert resp.header("X-RateLimit-Limit") == "120"
    assert resp.header("X-RateLimit-Remaining") == "119"
    assert int(resp.header("X-RateLimit-Reset") or 0) >= int(time.time())
    me = gate.get("/api/v1/me", key=key)
    assert me.header("X-RateLimit-Remaining") == "118"


def test_the_121st_request_is_a_wacrm_429(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    statuses = [gate.get("/api/v1/contacts", key=key).status for _ in range(120)]
    assert statuses == [200] * 120
    resp = gate.get("/api/v1/contacts", key=key)
    assert resp.status == 429
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == RATE_LIMITED
    assert int(resp.header("Retry-After") or 0) >= 1
    assert resp.header("X-RateLimit-Limit") == "120"
    assert resp.header("X-RateLimit-Remaining") == "0"
    assert int(resp.header("X-RateLimit-Reset") or 0) > time.time()
    assert resp.all("WWW-Authenticate") == []
    # The limit is per key: another key of the same account is unaffected.
    assert gate.get("/api/v1/contacts", key=gate.put_key(["contacts:read"])).status == 200


def test_403s_count_and_401s_do_not(gate: Gate) -> None:
    key = gate.put_key([])
    assert all(gate.get("/api/v1/contacts", key=key).status == 403 for _ in range(120))
    assert gate.get("/api/v1/me", key=key).status == 429


async def test_two_sidecars_share_one_limit_exactly(tmp_path: Path, gate: Gate) -> None:
    """200 concurrent requests against a budget of 120, split over two processes: 120 pass."""
    key = gate.put_key(["contacts:read"])
    redis_server: RedisServer = gate.redis_server
    # 120 an hour: no request is earned back while the test runs, however slow the machine.
    env = {"WACRM_RATE_LIMIT": "120/1h"}
    sidecars = [
        procs.sidecar(tmp_path, redis_url=redis_server.url, extra_env=env) for _ in range(2)
    ]
    for s in sidecars:
        s.start()
    try:
        headers = {
            "X-Original-URI": "/api/v1/contacts",
            "X-Original-Method": "GET",
            "Authorization": f"Bearer {key}",
        }
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> str:
                port = sidecars[i % 2].port
                async with session.get(f"http://127.0.0.1:{port}/auth", headers=headers) as r:
                    return r.headers.get("X-Wacrm-Status", str(r.status))

            results = await asyncio.gather(*(one(i) for i in range(200)))
        assert results.count("200") == 120
        assert results.count("429") == 80
    finally:
        for s in sidecars:
            s.stop()
