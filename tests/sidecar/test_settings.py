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
        # A brace would make the prefix, not the key hash, a Cluster's hash tag.
        ({"WACRM_REDIS_PREFIX": "gate{a}:"}, "WACRM_REDIS_PREFIX"),
        ({"WACRM_REDIS_PREFIX": "gate}"}, "WACRM_REDIS_PREFIX"),
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
        "redis+sentinel://127.0.0.1:26379,127.0.0.2:26379,127.0.0.3:26379/gate",
        "redis+sentinel://:secret@sentinel-1,sentinel-2/gate/2?sentinel_password=other",
        "rediss+sentinel://gate:s%2Fcret@[::1]:26379/main?db=3&sentinel_username=u&sentinel_password=p",
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
        ("REDIS+SENTINEL://h/gate", "must be redis://HOST"),
        ("redis+sentinel://h1,h2", "names no master"),
        ("redis+sentinel://h1,h2/", "names no master"),
        ("redis+sentinel:///gate", "names no sentinel host"),
        ("redis+sentinel://:secret@/gate", "names no sentinel host"),
        ("redis+sentinel://h1,,h2/gate", "names an empty sentinel host"),
        ("redis+sentinel://h1:0/gate", "port must be a number from 1 to 65535"),
        ("redis+sentinel://h1,h2:26379x/gate", "port must be a number from 1 to 65535"),
        ("redis+sentinel://h1:65536/gate", "port must be a number from 1 to 65535"),
        ("redis+sentinel://::1/gate", "an IPv6 address goes in brackets"),
        ("redis+sentinel://[::1/gate", "IPv6 address is not [ADDRESS][:PORT]"),
        ("redis+sentinel://h/gate/one", "database must be a whole number, not 'one'"),
        ("redis+sentinel://h/gate/0/1", "database must be a whole number, not '0/1'"),
        ("redis+sentinel://h/gate?db=x", "database must be a whole number, not 'x'"),
        ("redis+sentinel://h/gate/1?db=1", "gives the database twice"),
        ("redis+sentinel://h/gate?sentinel_pasword=x", "query parameter the gate does not read"),
        ("redis+sentinel://h/gate?sentinel_password=a&sentinel_password=b", "twice"),
        ("redis+sentinel://h/gate?sentinel_password=a+b", "write + as %2B"),
        ("redis+sentinel://secret@h/gate", "give the master's password as :PASSWORD@"),
        ("redis+sentinel://h/ga te", "must not hold spaces"),
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


def test_a_bad_sentinel_url_is_named_without_its_passwords() -> None:
    url = "redis+sentinel://:m-s3cret@h1:99999,h2/gate?sentinel_password=s-s3cret&db=0"
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"WACRM_REDIS_URL": url})
    message = str(caught.value)
    shown = "redis+sentinel://***@h1:99999,h2/gate?sentinel_password=***"
    assert (
        message == f"WACRM_REDIS_URL={shown!r}: a sentinel's port must be a number from 1 to 65535"
    )
    assert "s3cret" not in message


def test_a_password_holding_a_slash_is_never_repeated_in_the_error() -> None:
    """A raw / in the password cuts the URL early: the error must not show the rest."""
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"WACRM_REDIS_URL": "redis+sentinel://:k7q/zq9x@h1/gate"})
    message = str(caught.value)
    assert "k7q" not in message and "zq9x" not in message
    assert message.endswith("write '/' in a password as %2F")
