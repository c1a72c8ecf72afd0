"""Envoy's own ways, beyond the contract every front holds (`tests.e2e.test_fronts`).

The shipped ``deploy/envoy/envoy.yaml`` asks the sidecar's ``/forward-auth`` with
X-Forwarded-Method and X-Forwarded-Uri that Envoy sets itself.  A client that sends those
headers, or any other header a server reads as "the route" (X-Original-URI, X-Original-URL,
X-Envoy-Original-Path, X-Forwarded-Prefix...), can neither change the route the sidecar
checks nor get it to the upstream; and Envoy passes the path on as sent, so the sidecar sees
what the upstream will serve.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import verifier
from tests.conftest import RedisServer
from tests.e2e import front_envoy
from tests.e2e.fronts import require
from tests.e2e.rawhttp import Response, request
from tests.e2e.test_fronts import (
    Stack,
    assert_refused,
    assert_unavailable,
    stopped,
    upstream_saw,
)

#: Every header some server or framework reads as the route or method to run.
ROUTING = (*sorted(verifier.ROUTING_HEADERS), "x-envoy-original-path")


def missing_scope(scope: str) -> dict[str, object]:
    return {
        "error": {"code": "forbidden", "message": f"This API key is missing the '{scope}' scope"}
    }


def bad_request(message: str) -> dict[str, object]:
    return {"error": {"code": "bad_request", "message": message}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    require("envoy")
    s = Stack("envoy", tmp_path_factory.mktemp("envoy"), redis_server)
    s.start()
    yield s
    s.stop()


def test_a_client_cannot_choose_the_route_the_sidecar_checks(stack: Stack) -> None:
    """Each request names the contacts route (and GET) in every routing header, the
    X-Forwarded-* ones twice and in other letter cases; the sidecar still checks the request
    line Envoy routes."""
    claims = [
        ("X-Forwarded-Uri", "/api/v1/contacts"),
        ("x-forwarded-uri", "/api/v1/contacts"),
        ("X-FORWARDED-METHOD", "GET"),
        ("X-Forwarded-Method", "GET"),
        ("X-Original-URI", "/api/v1/contacts"),
        ("X-Original-URL", "http://localhost/api/v1/contacts"),
        ("X-Original-Method", "GET"),
        ("X-Envoy-Original-Path", "/api/v1/contacts"),
        ("X-Forwarded-Prefix", "/api/v1/contacts"),
        ("X-Rewrite-URL", "/api/v1/contacts"),
    ]
    webhooks = stack.get("/api/v1/webhooks", key=stack.key("contacts:read"), headers=claims)
    assert_refused(webhooks, 403, missing_scope("webhooks:manage"))
    # The method too: a POST that claims to be a GET needs the POST's scope.
    post = stack.get(
        "/api/v1/contacts", method="POST", key=stack.key("contacts:read"), headers=claims
    )
    assert_refused(post, 403, missing_scope("contacts:write"))
    # An absolute-form target is routed, and checked, by its path.
    absolute = stack.get(
        "http://localhost/api/v1/webhooks", key=stack.key("contacts:read"), headers=claims
    )
    assert_refused(absolute, 403, missing_scope("webhooks:manage"))


def test_the_upstream_gets_the_target_checked_and_no_routing_header(stack: Stack) -> None:
    key = stack.key("contacts:read")
    headers = [(name, "/api/v1/webhooks") for name in ROUTING]
    for target in ("/api/v1/contacts/caf%C3%A9?q=a%2Fb", "http://localhost/api/v1/contacts/x"):
        resp = stack.get(target, key=key, headers=headers)
        seen = upstream_saw(resp)
        assert resp.json()["path"] == target.removeprefix("http://localhost")  # type: ignore[index]
        assert not set(seen) & {"authorization", *ROUTING}, seen
        assert seen["x-wacrm-scopes"] == "contacts:read"


def test_envoy_hands_the_path_to_the_sidecar_as_sent(stack: Stack) -> None:
    """The refusal is the sidecar's, naming its rule: Envoy neither resolved the dot segment,
    merged the slashes, nor decoded or rejected the %2F (normalize_path, merge_slashes and
    path_with_escaped_slashes_action are off).  So what the sidecar checks is what the
    upstream would get."""
    key = stack.key("contacts:read")
    for target, rule in [
        ("/api/v1/contacts/../webhooks", "empty or dot segment, or a trailing '/'"),
        ("/api/v1//webhooks", "empty or dot segment, or a trailing '/'"),
        ("/api/v1/contacts/x%2F..%2F..%2Fwebhooks", "escaped '/'"),
    ]:
        resp = stack.get(target, key=key)
        assert_refused(resp, 400, bad_request(f"Malformed request path: {rule}"))


def test_underscore_spellings_are_refused_by_the_sidecar(stack: Stack) -> None:
    """Envoy passes headers with '_' (headers_with_underscores_action: ALLOW, its default) to
    the sidecar, which refuses them before an upstream that folds '_' into '-' could read
    them."""
    key = stack.key("contacts:read")
    routing = stack.get("/api/v1/webhooks", key=key, headers=[("X_Forwarded_Uri", "/x")])
    spelled = "Request carries a routing header spelled with a separator other than '-'"
    assert_refused(routing, 400, bad_request(spelled))
    spoofed = stack.get(
        "/api/v1/contacts", key=key, headers=[("X_Wacrm_Scopes", "webhooks:manage")]
    )
    assert_refused(spoofed, 400, bad_request("Request carries reserved X-Wacrm-* headers"))


def test_the_sidecar_counts_the_headers(stack: Stack) -> None:
    """Envoy's limit (200) is above the sidecar's 100, so the 431 is the sidecar's."""
    many = [(f"X-Header-{i}", "v") for i in range(101)]
    resp = stack.get("/api/v1/contacts", key=stack.key("contacts:read"), headers=many)
    assert_refused(resp, 431, bad_request("Too many request headers"))


def test_me_is_answered_by_the_sidecar(stack: Stack) -> None:
    key = stack.key("contacts:read")
    resp = stack.get("/api/v1/me", key=key)
    assert resp.status == 200, resp
    assert resp.json() == {
        "data": {
            "account": {"id": "7a1d6c1e-0000-4000-8000-000000000001", "name": "Acme"},
            "key": {"id": "5b0e9f7c-0000-4000-8000-000000000002", "scopes": ["contacts:read"]},
        }
    }
    missing = stack.get("/api/v1/me")
    assert missing.status == 401
    assert missing.all("WWW-Authenticate") == ['Bearer realm="wacrm"']
    with stopped(stack.sidecar):
        assert_unavailable(stack.get("/api/v1/me", key=key))


def test_envoys_own_errors_are_json(stack: Stack) -> None:
    assert_refused(
        stack.get("/elsewhere"), 404, {"error": {"code": "not_found", "message": "Not found"}}
    )
    assert_refused(
        stack.get("/api/v1/contacts#/../webhooks", key=stack.key("contacts:read")),
        400,
        bad_request("Bad request"),
    )
    assert_refused(
        stack.get("/api/v1/contacts", headers=[("X-Big", "v" * 62 * 1024)]),
        431,
        bad_request("Request header fields too large"),
    )
    # The upstream down is not the gate's outage.
    stack.upstream.stop()
    try:
        resp = stack.get("/api/v1/contacts", key=stack.key("contacts:read"))
        assert_refused(
            resp, 503, {"error": {"code": "service_unavailable", "message": "Service unavailable"}}
        )
        assert resp.header("Retry-After") is None
    finally:
        stack.upstream.start()


def test_a_stalled_sidecar_is_a_503_json_within_two_seconds(stack: Stack, tmp_path: Path) -> None:
    """A sidecar that accepts and never answers: ext_authz's 2 s timeout, then fail closed."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts the connections; nothing ever answers
        envoy = front_envoy.start(
            tmp_path, sidecar_port=silent.getsockname()[1], upstream_port=stack.upstream.port
        )
        envoy.start()
        try:
            started = time.monotonic()
            resp: Response = request(envoy.port, "/api/v1/contacts", key=stack.key("contacts:read"))
            took = time.monotonic() - started
        finally:
            envoy.stop()
    assert_unavailable(resp)
    assert 1.5 < took < 4, took
