"""The verifier's own checks, before any Redis lookup."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.verifier import _carries_reserved_headers


def _headers(*names: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("Host", "h"), *((n, "v") for n in names)]))


@pytest.mark.parametrize(
    "name",
    ["X-Wacrm-Account-Id", "x-wacrm-scopes", "X-WACRM-KEY-ID", "X_Wacrm_Account_Id", "x-wacrm-"],
)
def test_reserved_headers_are_found_in_any_spelling(name: str) -> None:
    assert _carries_reserved_headers(_headers("Accept", name, "User-Agent"))
    assert _carries_reserved_headers(_headers(name))


@pytest.mark.parametrize("name", ["X-Wacrm", "X-Wacrmx-Id", "My-X-Wacrm-Id", "X-Original-URI"])
def test_other_headers_are_not_reserved(name: str) -> None:
    assert not _carries_reserved_headers(_headers(name))
    assert not _carries_reserved_headers(CIMultiDictProxy(CIMultiDict()))
