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
