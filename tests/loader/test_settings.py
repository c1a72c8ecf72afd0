"""The loader's settings: environment, flags, defaults and errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.settings import Settings
from sidecar.options import SettingError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.source is None
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.redis_prefix == "wacrm:"
    assert s.reconcile_interval == 300.0
    assert s.poll_interval == 0.2
    assert s.batch_size == 5000


def test_environment_and_flags() -> None:
    env = {
        "WACRM_SOURCE": "sqlite:///keys.db",
        "WACRM_ROUTES": "/etc/wacrm.routes",
        "WACRM_RECONCILE_INTERVAL": "60",
        "WACRM_BATCH_SIZE": "100",
    }
    s = Settings.from_env(env, ["--source", "postgresql://db/wacrm", "--poll-interval", "0.5"])
    assert s.source == "postgresql://db/wacrm"
    assert s.routes == Path("/etc/wacrm.routes")
    assert s.reconcile_interval == 60.0
    assert s.poll_interval == 0.5
    assert s.batch_size == 100


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WACRM_SOURCE": "mysql://x"}, "WACRM_SOURCE"),
        ({"WACRM_SOURCE": "sqlite:///"}, "WACRM_SOURCE"),
        ({"WACRM_RECONCILE_INTERVAL": "0"}, "WACRM_RECONCILE_INTERVAL"),
        ({"WACRM_BATCH_SIZE": "lots"}, "WACRM_BATCH_SIZE"),
        ({"WACRM_LOG_LEVEL": "chatty"}, "WACRM_LOG_LEVEL"),
        ({"WACRM_REDIS_URL": "foo://x"}, "WACRM_REDIS_URL"),
        ({"WACRM_REDIS_URL": "redis://x:99999/0"}, "WACRM_REDIS_URL"),
        ({"WACRM_REDIS_URL": "unix://"}, "WACRM_REDIS_URL"),
        ({"WACRM_REDIS_PREFIX": "{gate}:"}, "WACRM_REDIS_PREFIX"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError, match=named):
        Settings.from_env(env)


def test_a_missing_source_is_named() -> None:
    with pytest.raises(SettingError, match="WACRM_SOURCE"):
        Settings().require_source()
    assert Settings(source="sqlite:///k.db").require_source() == "sqlite:///k.db"
