"""The verifier's own checks, before any Redis lookup."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import decision
from sidecar.verifier import MAX_HEADERS, _inspect, _refused_header

KEY = "wacrm_live_" + "a" * 43


def _headers(*names: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("Host", "h"), *((n, "v") for n in names)]))


@pytest.mark.parametrize(
    "name",
    [
        "X-Wacrm-Account-Id",
        "x-wacrm-scopes",
        "X-WACRM-KEY-ID",
        "X_Wacrm_Account_Id",
        "x-wacrm-",
        # Mixed spellings: an upstream that folds '_' into '-' (WSGI) reads X-Wacrm-Scopes.
        "X-Wacrm_Scopes",
        "X_Wacrm-Account-Id",
        "x_WACRM_key-id",
        # Other separators: PHP folds '.', and an upstream may fold any of them.
        "X.Wacrm.Scopes",
        "X~Wacrm~Account~Id",
        "x-wacrm.key-id",
        "X|Wacrm|Scopes",
    ],
)
def test_reserved_headers_are_found_in_any_spelling(name: str) -> None:
    assert _refused_header(_headers("Accept", name, "User-Agent")) is decision.SPOOFED
    assert _refused_header(_headers(name)) is decision.SPOOFED


@pytest.mark.parametrize(
    "name",
    [
        "X-HTTP-Method-Override",
        "x-http-method",
        "X-Method-Override",
        "X_HTTP_Method_Override",
        "X-Http_Method",
        "X.HTTP.Method.Override",
    ],
)
def test_method_overrides_are_refused_in_any_spelling(name: str) -> None:
    assert _refused_header(_headers("Accept", name)) is decision.METHOD_OVERRIDE


@pytest.mark.parametrize(
    "name",
    [
        "X_Original_URI",
        "X-Original_URL",
        "x_original-method",
        "X_Forwarded_Uri",
        "X_Rewrite_URL",
        "X.Forwarded.Uri",
        "X~Original~URI",
    ],
)
def test_routing_headers_spelled_with_underscores_are_refused(name: str) -> None:
    assert _refused_header(_headers(name)) is decision.ROUTING_HEADER


@pytest.mark.parametrize(
    "name",
    [
        "X-Wacrm",
        "X-Wacrmx-Id",
        "My-X-Wacrm-Id",
        # Set by the proxy itself on the way to the sidecar: dashes only.
        "X-Original-URI",
        "X-Forwarded-Uri",
        "X-Forwarded-Method",
        "X-HTTP-Methods",
        "My_Header",
        "My.Header",
        "X.Wacrm",
    ],
)
def test_other_headers_are_not_refused(name: str) -> None:
    assert _refused_header(_headers(name)) is None
    assert _refused_header(CIMultiDictProxy(CIMultiDict())) is None


def test_more_headers_than_the_limit_are_refused_before_the_key_is_read() -> None:
    many = [f"X-Extra-{i}" for i in range(MAX_HEADERS)]
    headers = CIMultiDict([("Host", "h"), ("Authorization", f"Bearer {KEY}")])
    assert _inspect(CIMultiDictProxy(headers), "/api/v1/me", False) != decision.TOO_MANY_HEADERS
    headers.extend((n, "v") for n in many)
    assert _inspect(CIMultiDictProxy(headers), "/api/v1/me", False) is decision.TOO_MANY_HEADERS


def test_a_bad_path_names_what_is_wrong() -> None:
    denial = _inspect(_headers(), "/api/v1/contacts;x", False)
    assert isinstance(denial, decision.Denial)
    assert denial.status == 400
    assert denial.body == (
        b'{"error":{"code":"bad_request","message":"Malformed request path: \';\' in the path"}}'
    )
