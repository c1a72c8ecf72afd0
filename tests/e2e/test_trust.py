"""What the upstream trusts: identity headers no client can forge, in any spelling.

The gate here runs with ``underscores_in_headers on`` (which the README says is handled), in
front of the echo upstream, whose headers the tests read as a WSGI server would: lower-cased,
with '_' folded into '-'.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo import procs
from tests.conftest import RedisServer
from tests.e2e.conftest import Gate

ACCOUNT = "7a1d6c1e-0000-4000-8000-000000000001"
KEY_ID = "5b0e9f7c-0000-4000-8000-000000000002"
#: Wacrm's table and one route any valid key may call, so a scopeless key reaches the upstream.
ROUTES = (Path(procs.ROOT) / "sidecar" / "wacrm.routes").read_text() + "GET /api/v1/ping -\n"


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Gate]:
    workdir = tmp_path_factory.mktemp("underscores")
    routes = workdir / "routes"
    routes.write_text(ROUTES)
    gate = Gate(
        workdir,
        redis_server,
        sidecar_env={"WACRM_ROUTES": str(routes), "WACRM_RATE_LIMIT": "off"},
        server_lines="underscores_in_headers on;",
    )
    gate.start()
    yield gate
    gate.stop()


@pytest.fixture
def gate(trusted: Gate) -> Gate:
    trusted.redis_server.start()
    with trusted.redis() as r:
        r.flushdb()
    trusted.mark_loaded()  # Redis holds a finished load
    return trusted


def wsgi_view(resp: object) -> list[tuple[str, str]]:
    """Return the headers the upstream got, named as a WSGI server names them."""
    pairs = resp.json()["header_list"]  # type: ignore[attr-defined]
    return [(k.lower().replace("_", "-"), v) for k, v in pairs]


def identity(resp: object) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in wsgi_view(resp) if k.startswith("x-wacrm-"))


def test_the_upstream_gets_exactly_the_three_identity_headers(gate: Gate) -> None:
    key = gate.put_key(["contacts:read", "contacts:write"])
    resp = gate.get("/api/v1/contacts", key=key)
    assert resp.status == 200
    assert identity(resp) == [
        ("x-wacrm-account-id", ACCOUNT),
        ("x-wacrm-key-id", KEY_ID),
        ("x-wacrm-scopes", "contacts:read contacts:write"),
    ]
    assert all(k != "authorization" for k, _ in wsgi_view(resp))


def test_a_scopeless_key_is_sent_as_scopes_dash_never_as_a_missing_header(gate: Gate) -> None:
    resp = gate.get("/api/v1/ping", key=gate.put_key([]))
    assert resp.status == 200
    assert identity(resp) == [
        ("x-wacrm-account-id", ACCOUNT),
        ("x-wacrm-key-id", KEY_ID),
        ("x-wacrm-scopes", "-"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "X-Wacrm-Scopes",
        "X-Wacrm_Scopes",
        "X_Wacrm-Account-Id",
        "X_Wacrm_Scopes",
        "x_wacrm_key_id",
        "X-WACRM_ANYTHING",
    ],
)
def test_a_client_identity_header_in_any_spelling_is_refused(gate: Gate, name: str) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", key=key, headers=[(name, "webhooks:manage")])
    assert resp.status == 400
    assert resp.json() == {
        "error": {"code": "bad_request", "message": "Request carries reserved X-Wacrm-* headers"}
    }


@pytest.mark.parametrize(
    "name", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X_HTTP_Method"]
)
def test_a_method_override_is_refused(gate: Gate, name: str) -> None:
    """An upstream that honours one would run DELETE where POST was checked."""
    key = gate.put_key(["contacts:write"])
    resp = gate.get("/api/v1/contacts", method="POST", key=key, headers=[(name, "DELETE")])
    assert resp.status == 400
    assert resp.json() == {
        "error": {"code": "bad_request", "message": "Method override headers are not accepted"}
    }


@pytest.mark.parametrize("name", ["X_Original_URI", "X-Original_Method", "X_Forwarded_Uri"])
def test_a_routing_header_spelled_with_underscores_is_refused(gate: Gate, name: str) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", key=key, headers=[(name, "/api/v1/webhooks")])
    assert resp.status == 400
    assert resp.json()["error"]["code"] == "bad_request"  # type: ignore[index]


def test_too_many_headers_are_a_counted_json_4xx(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    few = [(f"X-Extra-{i}", "v") for i in range(50)]
    assert gate.get("/api/v1/contacts", key=key, headers=few).status == 200
    many = [(f"X-Extra-{i}", "v") for i in range(300)]
    resp = gate.get("/api/v1/contacts", key=key, headers=many)
    assert resp.status == 431
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == {"error": {"code": "bad_request", "message": "Too many request headers"}}
    with urllib.request.urlopen(f"http://127.0.0.1:{gate.sidecar.port}/metrics") as page:
        text = page.read().decode()
    assert 'wacrm_gate_decisions_total{outcome="bad_request",reason="too_many_headers"} 1.0' in text
