"""The loader's /metrics: they move when `run` reconciles, applies a change, writes last use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from demo.procs import free_port
from loader import runner
from loader.metrics import LoaderMetrics, MetricsUnavailable, create_app, serving
from loader.postgres import parse_payload
from loader.reconcile import Report
from loader.settings import Settings
from loader.source import Changes
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.loader.conftest import ROOT, pg_account, pg_key, settings_for, sqlite_db
from tests.loader.test_runner import eventually, running

KS = Keyspace()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the loader's /metrics on *port*: (name, labels) -> value."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_move_with_a_reconcile_a_change_and_last_use_on_sqlite(
    tmp_path: Path, redis: Redis, redis_server: RedisServer
) -> None:
    path = tmp_path / "keys.db"
    port = free_port()
    settings = settings_for(
        f"sqlite:///{path}", redis_server, metrics_port=port, last_used_flush=0.05
    )
    started = time.time()
    async with running(settings):

        async def ready() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/readyz") as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, 5)
        first = await scrape(port)
        assert value(first, "wacrm_loader_last_reconcile_success_timestamp_seconds") >= started
        assert value(first, "wacrm_loader_last_reconcile_duration_seconds") > 0
        assert value(first, "wacrm_loader_keys_loaded") == 0
        assert value(first, "wacrm_loader_reconciles_total", result="ok") == 1
        assert value(first, "wacrm_loader_change_lag_seconds_count") == 0
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as r,
        ):
            assert r.status == 200

        with sqlite_db(path) as db:
            db.execute("INSERT INTO accounts (id, name) VALUES ('acct', 'Acme')")
            db.execute(
                "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes)"
                " VALUES ('k1', 'acct', 'n', 'wacrm_live_abcdefgh', ?, '[\"messages:send\"]')",
                ("a" * 64,),
            )

        async def applied() -> bool:
            samples = await scrape(port)
            return value(samples, "wacrm_loader_change_lag_seconds_count") >= 1

        await eventually(applied, 2)
        after = await scrape(port)
        assert (
            value(after, "wacrm_loader_changes_applied_total", kind="written", via="notification")
            == 1
        )
        lag = value(after, "wacrm_loader_change_lag_seconds_sum")
        assert 0 <= lag < 2

        seconds, _ = await redis.time()
        await redis.zadd(KS.used, {"k1": seconds * 1000})

        async def written() -> bool:
            samples = await scrape(port)
            return value(samples, "wacrm_loader_last_used_rows_written_total") == 1

        await eventually(written, 2)
        # Nothing else moved: a full reconcile is the only one so far, and nothing failed.
        last = await scrape(port)
        assert value(last, "wacrm_loader_reconciles_total", result="ok") == 1
        assert value(last, "wacrm_loader_errors_total", kind="source") == 0


async def test_the_lag_of_a_postgresql_change_counts_from_its_transaction(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    metrics = LoaderMetrics()
    acct = await pg_account(pg)
    async with running_with(settings_for(pg_dsn, redis_server), metrics):
        await eventually(lambda: _ready(metrics), 5)
        async with pg.transaction():
            await pg_key(pg, acct)
            await asyncio.sleep(0.3)  # the change waits in an open transaction
        await eventually(lambda: _lagged(metrics), 2)
    assert 0.3 <= _lag_sum(metrics) < 2
    assert (
        _sample(metrics, "wacrm_loader_changes_applied_total", kind="written", via="notification")
        == 1
    )


async def test_failures_and_reconnects_are_counted(redis: Redis, redis_server: RedisServer) -> None:
    metrics = LoaderMetrics()
    settings = settings_for("postgresql://postgres@127.0.0.1:1/none", redis_server)
    async with running_with(settings, metrics):
        await asyncio.sleep(1.0)
    assert _sample(metrics, "wacrm_loader_errors_total", kind="source") >= 2
    assert _sample(metrics, "wacrm_loader_reconnects_total") == 0
    assert not metrics.ready


async def test_a_port_in_use_is_a_clear_error() -> None:
    port = free_port()
    async with serving(LoaderMetrics(), "127.0.0.1", port):
        with pytest.raises(MetricsUnavailable, match=f"127.0.0.1:{port}"):
            async with serving(LoaderMetrics(), "127.0.0.1", port):
                pass


def test_a_notification_may_carry_the_time_of_its_change() -> None:
    kid = str(uuid.uuid4())
    assert parse_payload(f"k {kid} {'a' * 64} @1700000000.25") == Changes(
        key_hashes={"a" * 64}, key_ids={kid}, changed_at=1700000000.25
    )
    assert parse_payload(f"a {kid} @1700000000") == Changes(
        account_ids={kid}, changed_at=1700000000.0
    )
    # Without it (a trigger installed earlier), or with a broken one: the rows still count.
    assert parse_payload(f"k {kid} {'a' * 64}") == Changes(key_hashes={"a" * 64}, key_ids={kid})
    assert parse_payload(f"a {kid} @nan") == Changes(account_ids={kid})
    merged = Changes(changed_at=5.0)
    merged.update(Changes(changed_at=3.0))
    merged.update(Changes())
    assert merged.changed_at == 3.0


@contextlib.asynccontextmanager
async def running_with(settings: Settings, metrics: LoaderMetrics) -> AsyncIterator[None]:
    """Run `runner.run` with *metrics* while the block runs."""
    task = asyncio.create_task(runner.run(settings, metrics))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _ready(metrics: LoaderMetrics) -> bool:
    return metrics.ready


async def _lagged(metrics: LoaderMetrics) -> bool:
    return _sample(metrics, "wacrm_loader_change_lag_seconds_count") >= 1


def _lag_sum(metrics: LoaderMetrics) -> float:
    return _sample(metrics, "wacrm_loader_change_lag_seconds_sum")


def _sample(metrics: LoaderMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, name
    return found


async def test_the_loader_command_serves_metrics_on_the_flag_s_port(
    tmp_path: Path, redis: Redis, redis_server: RedisServer
) -> None:
    port = free_port()
    proc = start_run(tmp_path, redis_server, "--metrics-port", str(port))
    try:

        async def loaded() -> bool:
            try:
                samples = await scrape(port)
            except aiohttp.ClientError:
                return False
            return value(samples, "wacrm_loader_reconciles_total", result="ok") == 1

        await eventually(loaded, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=10)
    assert proc.returncode == 0, out


async def test_the_loader_command_stops_when_its_metrics_port_is_taken(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    async with serving(LoaderMetrics(), "127.0.0.1", port):
        proc = start_run(tmp_path, redis_server, "--metrics-port", str(port))
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out and "Traceback" not in out
    bad = start_run(tmp_path, redis_server, "--metrics-port", "0")
    out, _ = await asyncio.to_thread(bad.communicate, timeout=20)
    assert bad.returncode == 2 and "--metrics-port='0'" in out


def start_run(tmp_path: Path, redis_server: RedisServer, *flags: str) -> subprocess.Popen[str]:
    """Start ``python -m loader run`` on a SQLite file in *tmp_path* with *flags*."""
    env = {
        **os.environ,
        "WACRM_SOURCE": f"sqlite:///{tmp_path / 'keys.db'}",
        "WACRM_REDIS_URL": redis_server.url,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "loader", "run", *flags],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_readyz_tells_the_active_loader_from_a_standby(
    aiohttp_client: AiohttpClient,
) -> None:
    """A standby that reaches Redis is ready (it is healthy), and says who is active."""
    metrics = LoaderMetrics()
    client = await aiohttp_client(create_app(metrics))

    async def readyz() -> tuple[int, object, float | None]:
        r = await client.get("/readyz")
        return r.status, await r.json(), metrics.registry.get_sample_value("wacrm_loader_active")

    assert await readyz() == (503, {"status": "no redis", "role": "standby"}, 0)
    metrics.standing_by("host:1:ab")
    assert await readyz() == (200, {"status": "ready", "role": "standby", "active": "host:1:ab"}, 0)
    metrics.became_active()
    assert await readyz() == (503, {"status": "not reconciled", "role": "active"}, 1)
    metrics.reconciled(Report(active=3, seconds=0.1))
    assert await readyz() == (200, {"status": "ready", "role": "active"}, 1)
    metrics.failed("redis")
    assert await readyz() == (503, {"status": "not reconciled", "role": "active"}, 1)
    metrics.standing_by(None)
    assert await readyz() == (503, {"status": "no redis", "role": "standby"}, 0)
