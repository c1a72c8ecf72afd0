"""The gate end to end: real nginx, the sidecar, real Redis, an echo upstream."""

from __future__ import annotations

import time

import pytest

from sidecar import apikeys
from tests.e2e.conftest import Gate

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Missing or invalid API key"}}
ACCOUNT = "7a1d6c1e-0000-4000-8000-000000000001"
KEY_ID = "5b0e9f7c-0000-4000-8000-000000000002"


def echoed(resp: object) -> dict[str, str]:
    """Return the headers the upstream received, lower-cased."""
    data = resp.json()  # type: ignore[attr-defined]
    return {k.lower(): v for k, v in data["header_list"]}


def test_valid_key_reaches_upstream_with_identity_and_without_the_key(gate: Gate) -> None:
    key = gate.put_key(["contacts:read", "messages:send"])
    resp = gate.get("/api/v1/contacts?page=2", key=key)
    assert resp.status == 200
    seen = echoed(resp)
    assert seen["x-wacrm-account-id"] == ACCOUNT
    assert seen["x-wacrm-key-id"] == KEY_ID
    assert seen["x-wacrm-scopes"] == "contacts:read messages:send"
    assert "authorization" not in seen
    assert resp.json()["path"] == "/api/v1/contacts?page=2"  # type: ignore[index]


def test_post_with_body_reaches_upstream(gate: Gate) -> None:
    key = gate.put_key(["messages:send"])
    resp = gate.get("/api/v1/messages", method="POST", key=key, body=b'{"to":"+1"}')
    assert resp.status == 200
    assert resp.json()["method"] == "POST"  # type: ignore[index]


def _assert_unauthorized(resp: object, *, credential_sent: bool) -> None:
    assert resp.status == 401  # type: ignore[attr-defined]
    assert resp.header("Content-Type") == "application/json"  # type: ignore[attr-defined]
    assert resp.json() == UNAUTHORIZED  # type: ignore[attr-defined]
    challenges = resp.all("WWW-Authenticate")  # type: ignore[attr-defined]
    expected = (
        'Bearer realm="wacrm", error="invalid_token"' if credential_sent else 'Bearer realm="wacrm"'
    )
    assert challenges == [expected]


def test_missing_key_is_401_without_error_code(gate: Gate) -> None:
    _assert_unauthorized(gate.get("/api/v1/contacts"), credential_sent=False)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer wacrm_live_short",
        "Bearer " + "wacrm_test_" + "a" * 43,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer " + "wacrm_live_" + "a" * 42 + "!",
    ],
)
def test_malformed_key_is_401(gate: Gate, value: str) -> None:
    _assert_unauthorized(
        gate.get("/api/v1/contacts", headers=[("Authorization", value)]), credential_sent=True
    )


def test_unknown_revoked_and_expired_keys_get_the_identical_401(gate: Gate) -> None:
    unknown = apikeys.mint().plaintext
    revoked = gate.put_key(["contacts:read"])
    assert gate.get("/api/v1/contacts", key=revoked).status == 200
    gate.delete_key(revoked)
    expired = gate.put_key(["contacts:read"], expires_at_ms=int(time.time() * 1000) + 300)
    assert gate.get("/api/v1/contacts", key=expired).status == 200
    time.sleep(0.4)
    bodies = set()
    for key in (unknown, revoked, expired):
        resp = gate.get("/api/v1/contacts", key=key)
        _assert_unauthorized(resp, credential_sent=True)
        bodies.add(resp.body)
    assert len(bodies) == 1


def test_missing_scope_is_403_naming_it(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/webhooks/abc", method="DELETE", key=key)
    assert resp.status == 403
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == {
        "error": {
            "code": "forbidden",
            "message": "This API key is missing the 'webhooks:manage' scope",
        }
    }
    assert resp.all("WWW-Authenticate") == [
        'Bearer realm="wacrm", error="insufficient_scope", scope="webhooks:manage"'
    ]


def test_unlisted_route_is_denied_by_default(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v2/secret", key=key)
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "forbidden"  # type: ignore[index]


def test_scopeless_key_calls_me(gate: Gate) -> None:
    key = gate.put_key([])
    resp = gate.get("/api/v1/me", key=key)
    assert resp.status == 200
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == {
        "data": {
            "account": {"id": ACCOUNT, "name": "Acme Inc"},
            "key": {"id": KEY_ID, "scopes": []},
        }
    }


def test_me_with_bad_key_is_wacrm_401(gate: Gate) -> None:
    _assert_unauthorized(gate.get("/api/v1/me", key=apikeys.mint().plaintext), credential_sent=True)


def test_me_with_null_account_name(gate: Gate) -> None:
    key = gate.put_key(["messages:send"], account_name=None)
    resp = gate.get("/api/v1/me", key=key)
    assert resp.json()["data"]["account"]["name"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    "name",
    [
        "X-Wacrm-Account-Id",
        "x-wacrm-account-id",
        "X-WACRM-KEY-ID",
        "X-Wacrm-Scopes",
        "X-Wacrm-Anything",
    ],
)
def test_spoofed_identity_headers_never_reach_upstream(gate: Gate, name: str) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", key=key, headers=[(name, "evil")])
    assert resp.status == 400
    assert resp.json()["error"]["code"] == "bad_request"  # type: ignore[index]


def test_underscore_identity_headers_are_dropped(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get(
        "/api/v1/contacts",
        key=key,
        headers=[("X_Wacrm_Account_Id", "evil"), ("X_Wacrm_Scopes", "webhooks:manage")],
    )
    assert resp.status == 200
    seen = echoed(resp)
    assert seen["x-wacrm-account-id"] == ACCOUNT
    assert "x_wacrm_account_id" not in seen and "x_wacrm_scopes" not in seen
    assert "evil" not in resp.body.decode()


def test_lowercase_bearer_is_accepted(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", headers=[("Authorization", "bearer " + key)])
    assert resp.status == 200


def test_bare_key_is_accepted_like_wacrm(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    assert gate.get("/api/v1/contacts", headers=[("Authorization", key)]).status == 200


def test_two_authorization_headers_are_refused(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get(
        "/api/v1/contacts",
        headers=[("Authorization", "Bearer " + key), ("Authorization", "Bearer " + key)],
    )
    assert resp.status == 400
    assert resp.json() == {"error": {"code": "bad_request", "message": "Bad request"}}


def test_8kb_authorization_header_is_a_clean_4xx(gate: Gate) -> None:
    resp = gate.get("/api/v1/contacts", headers=[("Authorization", "Bearer " + "a" * 8192)])
    assert resp.status == 400
    assert resp.header("Content-Type") == "application/json"


def test_7kb_authorization_header_is_401(gate: Gate) -> None:
    resp = gate.get("/api/v1/contacts", headers=[("Authorization", "Bearer " + "a" * 7000)])
    _assert_unauthorized(resp, credential_sent=True)


def test_non_ascii_authorization_is_401(gate: Gate) -> None:
    resp = gate.get(
        "/api/v1/contacts", headers=[(b"Authorization", "Bearer wacrm_live_ünïcødé".encode())]
    )
    _assert_unauthorized(resp, credential_sent=True)


def test_non_utf8_bytes_in_path_are_a_clean_4xx(gate: Gate) -> None:
    key = gate.put_key(["contacts:read", "webhooks:manage"])
    resp = gate.get(b"/api/v1/contacts/\xff\xfe", key=key)
    assert resp.status == 400
    assert resp.json() == {
        "error": {
            "code": "bad_request",
            "message": "Malformed request path: control or non-ASCII character in the path",
        }
    }


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/me/../webhooks",
        "/api/v1/contacts/../webhooks",
        "/api/v1/contacts/%2e%2e/webhooks",
        "/api/v1/contacts%2F..%2Fwebhooks",
        "/api/v1/contacts/x/..%2F..%2Fwebhooks",
        "/api/v1//webhooks",
        "/api/v1/./webhooks",
        "/api/v1/contacts/%252e%252e/webhooks",
        "/api/v1/contacts/x%00/../../webhooks",
        "/api/v1/contacts\\..\\webhooks",
    ],
)
def test_path_tricks_never_borrow_a_weaker_scope(gate: Gate, target: str) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get(target, key=key)
    assert 400 <= resp.status < 500, resp
    assert resp.status != 200
    assert "x-wacrm-account-id" not in resp.body.decode().lower()


def test_redis_down_is_503_json_and_recovers(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    assert gate.get("/api/v1/contacts", key=key).status == 200
    gate.redis_server.stop()
    try:
        resp = gate.get("/api/v1/contacts", key=key)
        assert resp.status == 503
        assert resp.header("Content-Type") == "application/json"
        assert resp.header("Retry-After") == "1"
        assert resp.json()["error"]["code"] == "internal"  # type: ignore[index]
        assert gate.get("/api/v1/me", key=key).status == 503
    finally:
        gate.redis_server.start()
    key = gate.put_key(["contacts:read"])  # the restarted Redis is empty
    deadline = time.monotonic() + 5
    while gate.get("/api/v1/contacts", key=key).status != 200:
        assert time.monotonic() < deadline, "gate did not recover after Redis came back"
        time.sleep(0.1)


def test_sidecar_down_is_503_json(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    gate.sidecar.stop()
    try:
        resp = gate.get("/api/v1/contacts", key=key)
        assert resp.status == 503
        assert resp.header("Content-Type") == "application/json"
        assert resp.header("Retry-After") == "1"
        assert resp.json() == {
            "error": {"code": "internal", "message": "Rate limit service unavailable"}
        }
        assert gate.get("/api/v1/me", key=key).status == 503
    finally:
        gate.sidecar.start()
    assert gate.get("/api/v1/contacts", key=key).status == 200


def test_absolute_form_request_target_is_checked_by_its_path(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    assert gate.get("http://localhost/api/v1/contacts", key=key).status == 200
    resp = gate.get("http://localhost/api/v1/me/../webhooks", key=key)
    assert resp.status == 400
    assert resp.json()["error"]["message"].endswith("dot segment, or a trailing '/'")  # type: ignore[index]
