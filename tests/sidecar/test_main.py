"""The sidecar as a process: start-up errors, workers, and stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import redis as redis_sync

from demo import procs
from sidecar import apikeys
from sidecar.metrics import Metrics
from sidecar.records import Keyspace
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
        ([], {"WACRM_LISTEN": "unix:"}, "WACRM_LISTEN"),
        (["--listen", "unix:/nonexistent/sidecar.sock"], {}, "--listen"),
    ],
)
def test_bad_setting_stops_start_up_naming_it(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run(args, env)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["foo://x", "redis://x:99999/0", "redis://x/zero", "unix://"])
def test_a_bad_redis_url_stops_start_up_with_one_line_naming_it(url: str) -> None:
    result = run([], {"WACRM_REDIS_URL": url})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"wacrm-sidecar: WACRM_REDIS_URL={url!r}: "), line


@pytest.mark.parametrize(
    "value",
    ["unix:", "unix:relative/sidecar.sock", "/tmp/sidecar.sock", "tcp:127.0.0.1:9180",
     "unix://tmp/sidecar.sock", "unix:/tmp/", "unix:/" + "x" * 110, "unix:/nonexistent/s.sock"],
)  # fmt: skip
def test_a_bad_listen_value_stops_start_up_with_one_line_naming_it(value: str) -> None:
    result = run([], {"WACRM_LISTEN": value})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"wacrm-sidecar: WACRM_LISTEN={value!r}: "), line


def test_a_file_that_is_not_a_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.sock"
    path.write_text("not a socket\n")
    result = run([], {"WACRM_LISTEN": f"unix:{path}"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line == (
        f"wacrm-sidecar: WACRM_LISTEN='unix:{path}': {path} exists and is not a socket;"
        " refusing to replace it"
    )
    assert path.read_text() == "not a socket\n"


def test_an_empty_listen_keeps_tcp(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.start()
    sidecar = procs.sidecar(tmp_path, redis_url=redis_server.url, extra_env={"WACRM_LISTEN": ""})
    sidecar.start()
    try:
        assert _ready(sidecar.port) == 200
    finally:
        sidecar.stop()


def _ready(port: int) -> int:
    return rawhttp.request(port, "/healthz").status


def test_workers_share_the_port_and_stop_on_sigterm(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    # A folder of the operator's for the counts, holding an earlier run's: they start anew.
    counts = tmp_path / "counts"
    counts.mkdir()
    stale = Metrics(counts)
    for _ in range(1000):
        stale.decided(401, "missing", 0.001)
    del stale
    assert list(counts.glob("counter_*.db"))
    sidecar = procs.sidecar(
        tmp_path,
        redis_url=redis_server.url,
        extra_env={"WACRM_WORKERS": "2", "WACRM_METRICS_DIR": str(counts)},
    )
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
        # While the new worker joins the port, a connection may be refused for a moment.
        time.sleep(2)
        assert all(_ready(sidecar.port) == 200 for _ in range(20))
        for _ in range(10):
            rawhttp.request(sidecar.port, "/auth", headers=[("X-Original-URI", "/api/v1/me")])
        # Whichever worker answers, /metrics counts the decisions of both.
        for _ in range(4):
            text = rawhttp.request(sidecar.port, "/metrics").body.decode()
            assert (
                'wacrm_gate_decisions_total{outcome="unauthorized",reason="missing"} 10.0' in text
            )
        started = time.monotonic()
        assert sidecar.stop(signal.SIGTERM, timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        sidecar.stop(signal.SIGKILL)


async def test_sigterm_finishes_checks_in_flight(tmp_path: Path, redis_server: RedisServer) -> None:
    """A check waiting on a slow Redis when SIGTERM arrives still gets its answer."""
    redis_server.start()
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.set(Keyspace().loaded, 1)  # a finished load: the unknown key's answer is a 401

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", redis_server.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            while data := await src.read(65536):
                await asyncio.sleep(delay)
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_w, 0), pipe(up_r, writer, 0.5))

    slow = await asyncio.start_server(relay, "127.0.0.1", 0)
    slow_port = slow.sockets[0].getsockname()[1]
    sidecar = procs.sidecar(
        tmp_path,
        redis_url=f"redis://127.0.0.1:{slow_port}/0",
        extra_env={"WACRM_REDIS_TIMEOUT": "3"},
    )
    await asyncio.to_thread(sidecar.start)
    assert sidecar.proc is not None
    try:
        async with aiohttp.ClientSession() as session:
            headers = {
                "X-Original-URI": "/api/v1/me",
                "Authorization": "Bearer " + apikeys.mint().plaintext,
            }
            pending = asyncio.ensure_future(
                session.get(f"http://127.0.0.1:{sidecar.port}/auth", headers=headers)
            )
            await asyncio.sleep(0.2)
            sidecar.proc.send_signal(signal.SIGTERM)
            resp = await pending
            assert resp.status == 401  # the real answer, not a dropped connection
        code = await asyncio.to_thread(sidecar.proc.wait, 10)
        assert code == 0
    finally:
        sidecar.stop(signal.SIGKILL)
        slow.close()


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path: Path) -> None:
    """A port taken by another program: workers die at once, and the sidecar exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "workers keep dying" in result.stderr
