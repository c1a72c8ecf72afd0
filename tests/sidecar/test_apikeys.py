"""Wacrm's key format."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.apikeys import is_well_formed, key_from_authorization, mint


def test_minted_key_has_wacrms_shape_and_hash() -> None:
    k = mint()
    assert k.plaintext.startswith("wacrm_live_")
    assert len(k.plaintext) == 54
    assert k.key_hash == hashlib.sha256(k.plaintext.encode()).hexdigest()
    assert k.key_prefix == k.plaintext[:19]
    assert is_well_formed(k.plaintext)
    assert mint().plaintext != k.plaintext


KEY = "wacrm_live_" + "A" * 42 + "-"


@pytest.mark.parametrize(
    "value",
    [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer   {KEY}", f"Bearer {KEY}  ", KEY],
)
def test_key_is_read_from_bearer_or_bare_value(value: str) -> None:
    assert key_from_authorization(value) == KEY


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY[:-1]}=",
        "Bearer wacrm_test_" + "A" * 43,
        f"Bearer {KEY} extra",
        f" {KEY}",
        f"{KEY} ",
        f"Bearer\t{KEY}",
        "Bearer wacrm_live_" + "é" * 43,
        "x" * 9000,
    ],
)
def test_values_that_cannot_be_a_key_are_refused(value: str | None) -> None:
    assert key_from_authorization(value) is None


def _read_plainly(value: str | None) -> str | None:
    """The rules of key_from_authorization, spelt out step by step."""
    if not value:
        return None
    scheme, sep, rest = value.partition(" ")
    candidate = rest.strip(" ") if sep and scheme.lower() == "bearer" else value
    return candidate if is_well_formed(candidate) else None


_SCHEMES = st.sampled_from(["", "Bearer", "bearer", "BEARER", "bEaReR", "Bearerx", "Basic", "é"])
_SPACES = st.sampled_from(["", " ", "   ", "\t", " \t"])
_KEYS = st.sampled_from([KEY, KEY[:-1], KEY + "=", KEY.upper(), "wacrm_test_" + "A" * 43, ""])
_VALUES = st.tuples(_SCHEMES, _SPACES, _KEYS, _SPACES).map("".join) | st.text(max_size=80)


@settings(max_examples=1000)
@given(_VALUES)
def test_key_is_read_as_the_plain_rules_say(value: str) -> None:
    assert key_from_authorization(value) == _read_plainly(value)
