"""Settings from the environment and flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sidecar.options import SettingError
from sidecar.settings import OPTIONS, Settings


def test_defaults_match_the_documented_options() -> None:
    assert Settings.from_env({}) == Settings()
    for opt in OPTIONS:
        assert getattr(Settings(), opt.name) == opt.default, opt.name
    assert {f.name for f in dataclasses.fields(Settings)} == {o.name for o in OPTIONS}


def test_environment_and_flags_set_values_flags_winning() -> None:
    env = {"WACRM_PORT": "9000", "WACRM_REDIS_URL": "redis://r:1/2", "WACRM_ROUTES": "/x"}
    s = Settings.from_env(env, ["--port", "9001", "--unknown-routes", "ALLOW"])
    assert s.port == 9001
    assert s.redis_url == "redis://r:1/2"
    assert s.routes == Path("/x")
    assert s.unknown_routes == "allow"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WACRM_PORT": "http"}, "WACRM_PORT"),
        ({"WACRM_PORT": "70000"}, "WACRM_PORT"),
        ({"WACRM_REDIS_TIMEOUT": "0"}, "WACRM_REDIS_TIMEOUT"),
        ({"WACRM_REDIS_TIMEOUT": "nan"}, "WACRM_REDIS_TIMEOUT"),
        ({"WACRM_UNKNOWN_ROUTES": "maybe"}, "WACRM_UNKNOWN_ROUTES"),
        ({"WACRM_LOG_LEVEL": "loud"}, "WACRM_LOG_LEVEL"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError, match=named):
        Settings.from_env(env)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(SettingError, match="--port"):
        Settings.from_env({}, ["--port", "x"])


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://redis",
        "redis://redis/",
        "rediss://user:secret@redis.example:6380/2",
        "redis://:secret@[::1]:6379/15",
        "redis://redis?db=3",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=1",
        "unix://:secret@/run/redis/redis.sock?db=0",
    ],
)
def test_redis_urls_the_clients_read_are_accepted(url: str) -> None:
    assert Settings.from_env({"WACRM_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("foo://x", "must be redis://HOST"),
        ("REDIS://x", "must be redis://HOST"),
        ("127.0.0.1:6379", "must be redis://HOST"),
        ("redis://", "names no host"),
        ("redis://:secret@/0", "names no host"),
        ("redis://x:0", "port must be a number from 1 to 65535"),
        ("redis://x:65536", "port must be a number from 1 to 65535"),
        ("redis://x:port", "port must be a number from 1 to 65535"),
        ("redis://x/zero", "database must be a whole number, not 'zero'"),
        ("redis://x/-1", "database must be a whole number"),
        ("redis://x/0/1", "database must be a whole number"),
        ("rediss://x?db=one", "database must be a whole number, not 'one'"),
        ("unix://", "unix:///PATH"),
        ("unix://redis.sock", "unix:///PATH"),
        ("unix:///run/redis.sock?db=x", "database must be a whole number"),
    ],
)
def test_a_bad_redis_url_is_refused_naming_the_variable(url: str, why: str) -> None:
    with pytest.raises(SettingError, match="WACRM_REDIS_URL") as refused:
        Settings.from_env({"WACRM_REDIS_URL": url})
    assert why in str(refused.value)
    with pytest.raises(SettingError, match="--redis-url"):
        Settings.from_env({}, ["--redis-url", url])


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"WACRM_REDIS_URL": "redis://gate:s3cret@host:99999/0"})
    message = str(caught.value)
    assert message.startswith("WACRM_REDIS_URL='redis://***@host:99999/0':")
    assert "s3cret" not in message
