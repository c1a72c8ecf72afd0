"""The rate-limits file."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.limits import NO_LIMITS, LimitsError, load_limits, parse_limits
from sidecar.records import UNLIMITED, RateLimit


def test_parses_accounts_keys_and_off() -> None:
    limits = parse_limits(
        "# overrides\naccount a1 600/60s\nkey k1 10/1s  # a chatty integration\nkey k2 off\n"
    )
    assert limits.of("a1", "kx") == RateLimit(600, 60_000)
    assert limits.of("a1", "k1") == RateLimit(10, 1000)
    assert limits.of("a9", "k2") == UNLIMITED
    assert limits.of("a9", "k9") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("account a1", "expected"),
        ("user u1 10/1s", "expected"),
        ("key k1 ten/1s", "k1|ten/1s|LIMIT"),
        ("key k1 10/1s\nkey k1 20/1s", "listed twice"),
    ],
)
def test_malformed_lines_are_refused_with_their_line(text: str, message: str) -> None:
    with pytest.raises(LimitsError, match=r":\d+: "):
        parse_limits(text, source="f")


def test_no_file_means_no_overrides(tmp_path: Path) -> None:
    assert load_limits(None) is NO_LIMITS
    with pytest.raises(LimitsError, match="cannot read"):
        load_limits(tmp_path / "missing")


def test_unlimited_override_reaches_the_script_as_limit_zero() -> None:
    from sidecar.records import KeyRecord, encode

    raw = encode(KeyRecord("k", "a", None, "p", (), None, UNLIMITED), version=1)
    assert raw.startswith(b'{"v":1,"l":[0,1],')
