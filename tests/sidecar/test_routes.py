"""Path normalisation and the route policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.routes import NO_SCOPE, BadPath, PolicyError, load_policy, normalise, parse_policy

WACRM = load_policy()


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/api/v1/me", NO_SCOPE),
        ("POST", "/api/v1/messages", "messages:send"),
        ("GET", "/api/v1/contacts", "contacts:read"),
        ("POST", "/api/v1/contacts", "contacts:write"),
        ("GET", "/api/v1/contacts/42", "contacts:read"),
        ("PATCH", "/api/v1/contacts/42", "contacts:write"),
        ("GET", "/api/v1/conversations", "conversations:read"),
        ("GET", "/api/v1/conversations/7", "conversations:read"),
        ("GET", "/api/v1/conversations/7/messages", "messages:read"),
        ("POST", "/api/v1/broadcasts", "broadcasts:send"),
        ("GET", "/api/v1/broadcasts/9", "broadcasts:send"),
        ("GET", "/api/v1/webhooks", "webhooks:manage"),
        ("POST", "/api/v1/webhooks", "webhooks:manage"),
        ("GET", "/api/v1/webhooks/1", "webhooks:manage"),
        ("PATCH", "/api/v1/webhooks/1", "webhooks:manage"),
        ("DELETE", "/api/v1/webhooks/1", "webhooks:manage"),
        ("HEAD", "/api/v1/contacts", "contacts:read"),
    ],
)
def test_wacrm_table_is_the_default(method: str, path: str, scope: str) -> None:
    route = WACRM.match(method, path)
    assert route is not None
    assert route.scope == scope


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/contacts/42"),
        ("GET", "/api/v1/contacts/42/extra"),
        ("GET", "/api/v2/contacts"),
        ("POST", "/api/v1/me"),
        ("GET", "/"),
    ],
)
def test_unlisted_routes_match_nothing(method: str, path: str) -> None:
    assert WACRM.match(method, path) is None


def test_default_scopes_are_wacrms_seven() -> None:
    assert WACRM.scopes == {
        "messages:send",
        "messages:read",
        "contacts:read",
        "contacts:write",
        "conversations:read",
        "broadcasts:send",
        "webhooks:manage",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api/v1/me", "/api/v1/me"),
        ("/api/v1/contacts?x=/../webhooks", "/api/v1/contacts"),
        ("/api/v1/contacts#frag", "/api/v1/contacts"),
        ("/api/v1/me/../webhooks", "/api/v1/webhooks"),
        ("/api/v1/me/%2e%2e/webhooks", "/api/v1/webhooks"),
        ("/api/v1/me%2f..%2fwebhooks", "/api/v1/webhooks"),
        ("//api///v1/./contacts/", "/api/v1/contacts"),
        ("/api/v1/contacts/caf%C3%A9", "/api/v1/contacts/café"),
        ("/", "/"),
    ],
)
def test_normalise_resolves_what_a_server_would(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "api/v1/me",
        "/api/%zz",
        "/api/%2",
        "/api/%252e%252e/x",
        "/api/%ff",
        "/api/a%00b",
        "/api/a\x01b",
        "/api\\v1",
        "/..",
        "/api/../../etc",
        "http://host/api",
    ],
)
def test_normalise_refuses_what_no_honest_client_sends(raw: str) -> None:
    with pytest.raises(BadPath):
        normalise(raw)


@given(st.text(alphabet="/.%2eEfF5ca-?", max_size=30))
def test_normalised_paths_are_fixed_points_without_dot_segments(raw: str) -> None:
    try:
        path = normalise("/" + raw)
    except BadPath:
        return
    assert path.startswith("/")
    assert "//" not in path
    assert all(seg not in (".", "..") for seg in path.split("/"))
    # A literal '%' (sent as %25) stays decoded: the fixed point is of the re-escaped path.
    assert normalise(path.replace("%", "%25")) == path


def test_policy_file_with_custom_routes(tmp_path: Path) -> None:
    f = tmp_path / "routes"
    f.write_text("# ours\nGET,PUT /v2/things/{id}  things:write\nGET /v2/ping -\n")
    policy = load_policy(f)
    assert policy.match("PUT", "/v2/things/1").scope == "things:write"  # type: ignore[union-attr]
    assert policy.match("GET", "/v2/ping").scope == NO_SCOPE  # type: ignore[union-attr]
    assert policy.scopes == {"things:write"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("GET /x", "expected 'METHODS PATH SCOPE'"),
        ("get /x s", "not an HTTP method"),
        ("GET x s", "not a normalised path"),
        ("GET /a/../b s", "not a normalised path"),
        ("GET /x s\nGET /x t", "listed twice"),
        ('GET /x sc"ope', "has characters other than"),
        ("# nothing", "no routes"),
    ],
)
def test_malformed_policy_is_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text, source="r")


def test_missing_policy_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read route file"):
        load_policy(tmp_path / "nope")


@pytest.mark.parametrize("method", ["get", "Get", "post", "head"])
def test_methods_match_in_any_case(method: str) -> None:
    """A lower-case method is the same method: it can never slip past its route's scope."""
    assert WACRM.match(method, "/api/v1/webhooks") == WACRM.match(
        method.upper(), "/api/v1/webhooks"
    )
    assert WACRM.match(method, "/api/v1/webhooks") is not None
