"""The sidecar as a process: start-up errors, workers, and stopping on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo import procs
from sidecar.settings import OPTIONS
from tests.conftest import RedisServer
from tests.e2e import rawhttp


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_option_and_its_variable() -> None:
    out = run(["--help"]).stdout
    for opt in OPTIONS:
        assert opt.flag in out
        assert opt.env in out


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([], {"WACRM_PORT": "eighty"}, "WACRM_PORT"),
        (["--redis-timeout", "-1"], {}, "--redis-timeout"),
        ([], {"WACRM_WORKERS": "0"}, "WACRM_WORKERS"),
        ([], {"WACRM_ROUTES": "/nonexistent/routes"}, "/nonexistent/routes"),
    ],
)
def test_bad_setting_stops_start_up_naming_it(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run(args, env)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def _ready(port: int) -> int:
    return rawhttp.request(port, "/healthz").status


def test_workers_share_the_port_and_stop_on_sigterm(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    sidecar = procs.sidecar(tmp_path, redis_url=redis_server.url, extra_env={"WACRM_WORKERS": "2"})
    sidecar.start()
    assert sidecar.proc is not None
    try:
        assert all(_ready(sidecar.port) == 200 for _ in range(20))
        children = subprocess.run(
            ["pgrep", "-P", str(sidecar.proc.pid), "-f", "spawn_main"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            now = subprocess.run(
                ["pgrep", "-P", str(sidecar.proc.pid), "-f", "spawn_main"],
                capture_output=True,
                text=True,
            ).stdout.split()
            if len(now) == 2 and children[0] not in now:
                break
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        assert all(_ready(sidecar.port) == 200 for _ in range(20))
        started = time.monotonic()
        assert sidecar.stop(signal.SIGTERM, timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        sidecar.stop(signal.SIGKILL)
