"""The path rule and the route policy."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.routes import (
    NO_SCOPE,
    BadPath,
    PolicyError,
    checked_path,
    load_policy,
    parse_policy,
)

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
        ("POST", "/api/v1/flows/f1/runs", "flows:execute"),
        ("GET", "/api/v1/flows/f1/runs/r1", "flows:execute"),
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


def test_default_scopes_are_wacrms_eight() -> None:
    assert WACRM.scopes == {
        "flows:execute",
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
        ("/api/v1/contacts?", "/api/v1/contacts"),
        ("/api/v1/contacts/caf%C3%A9", "/api/v1/contacts/caf%C3%A9"),
        ("/api/v1/contacts/user%40example.com", "/api/v1/contacts/user%40example.com"),
        ("/api/v1/contacts/a%20b", "/api/v1/contacts/a%20b"),
        ("/api/v1/contacts/a:b@c!$&'()*+,=", "/api/v1/contacts/a:b@c!$&'()*+,="),
        ("/api/v1/contacts/.well", "/api/v1/contacts/.well"),
        ("/api/v1/contacts/...", "/api/v1/contacts/..."),
        ("/", "/"),
    ],
)
def test_checked_path_is_the_path_as_sent(raw: str, expected: str) -> None:
    assert checked_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        # Spellings the issue found routed elsewhere by a real upstream router.
        ("/api/v1/contacts/x%2F..%2F..%2Fme%2F", "escaped '/'"),
        ("/api/v1/webhooks/w1%2f..%2f..%2fcontacts%2fc1", "escaped '/'"),
        ("/api/v1/contacts;/../messages", "';' in the path"),
        ("/api/v1/contacts;jsessionid=1", "';' in the path"),
        ("/api/v1/contacts%3f/../messages", "escaped '?'"),
        ("/api/v1/contacts%23/../messages", "escaped '#'"),
        ("/api/v1/contacts%3B", "escaped ';'"),
        ("/api/v1/messages#/../contacts", "'#' in the request target"),
        ("/api/v1/contacts?q#x", "'#' in the request target"),
        ("/api/v1/me/", "trailing '/'"),
        ("/api/v1/me/.", "dot segment"),
        ("/api/v1/me/../webhooks", "dot segment"),
        ("//api/v1/me", "empty"),
        ("/api//v1/me", "empty"),
        ("/api/v1/%2e%2e/webhooks", "needs no escape"),
        ("/api/v1/.%2E/webhooks", "needs no escape"),
        ("/api/v1/%63ontacts", "needs no escape"),
        ("/api/v1/contacts/a%5Cb", "escaped '\\'"),
        ("/api\\v1", "'\\' in the path"),
        ("/api/%252F", "escaped '%'"),
        ("/api/%zz", "broken percent-escape"),
        ("/api/%2", "broken percent-escape"),
        ("/api/%ff", "not UTF-8"),
        ("/api/%C3x%A9", "not UTF-8"),
        ("/api/a%00b", "control character"),
        ("/api/a\x01b", "control or non-ASCII"),
        ("/api/caf\u00e9", "control or non-ASCII"),
        ("/api/a{b}", "must be percent-encoded"),
        ("api/v1/me", "must start with '/'"),
        ("http://host/api/v1/me", "must start with '/'"),
        ("*", "must start with '/'"),
    ],
)
def test_checked_path_refuses_what_two_servers_could_read_two_ways(raw: str, why: str) -> None:
    with pytest.raises(BadPath, match=re.escape(why)):
        checked_path(raw)


def test_encoded_slashes_can_be_kept_as_data_inside_their_segment() -> None:
    raw = "/api/v1/contacts/a%2Fb"
    assert checked_path(raw, encoded_slashes=True) == raw
    route = WACRM.match("GET", checked_path(raw, encoded_slashes=True))
    assert route is not None and route.template == "/api/v1/contacts/{id}"
    # Only '/' is let through: the other delimiters and climbs stay refused.
    for still_bad in ("/api/v1/contacts/a%5Cb", "/api/v1/contacts/a%3Fb", "/api/v1/x/../me"):
        with pytest.raises(BadPath):
            checked_path(still_bad, encoded_slashes=True)


def _decoding_router_path(path: str) -> str:
    """The path a router that percent-decodes before matching (Starlette, Werkzeug) sees."""
    return unquote(path, errors="strict")


@given(
    st.sampled_from(["GET", "POST", "PATCH", "DELETE"]),
    st.lists(
        st.text(alphabet="aAcm.%2eEfF5C3A9;:@+~-_", min_size=0, max_size=8), min_size=1, max_size=5
    ),
)
def test_an_accepted_path_routes_the_same_for_raw_and_decoding_routers(
    method: str, segments: list[str]
) -> None:
    """Whatever a path's spelling, a router matching it raw and one matching it decoded agree."""
    for base in ("/api/v1/contacts/", "/api/v1/conversations/", "/api/v1/"):
        raw = base + "/".join(segments)
        try:
            path = checked_path(raw)
        except BadPath:
            continue
        decoded = _decoding_router_path(path)
        assert decoded.count("/") == path.count("/")
        assert all(s not in ("", ".", "..") for s in decoded.split("/")[1:])
        assert WACRM.match(method, path) == WACRM.match(method, decoded)


@given(st.text(alphabet="/.%2eEfF5ca-?;#\\", max_size=30))
def test_checked_path_never_raises_anything_but_badpath(raw: str) -> None:
    try:
        path = checked_path("/" + raw)
    except BadPath:
        return
    assert path == ("/" + raw).partition("?")[0]


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
        ("GET x s", "is not '/' and segments of"),
        ("GET /a/../b s", "is not '/' and segments of"),
        ("GET /a/ s", "is not '/' and segments of"),
        ("GET /a%41 s", "is not '/' and segments of"),
        ("GET /a:b s", "is not '/' and segments of"),
        ("GET /a/{id s", "is not '/' and segments of"),
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
