"""SIGTERM and SIGINT stop a real loader process cleanly: in time, no traceback, right status."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

import asyncpg
import pytest
from redis.asyncio import Redis

from loader import runner
from loader.metrics import LoaderMetrics
from loader.mirror import Mirror
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.loader.conftest import ROOT, bulk_keys, pg_account, settings_for
from tests.loader.test_runner import eventually

KS = Keyspace()
#: How long a stop may take, start-up of the interpreter aside.
STOP_WITHIN = 5.0


def start(command: str, *, source: str, redis_url: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "WACRM_SOURCE": source,
        "WACRM_REDIS_URL": redis_url,
        "WACRM_BATCH_SIZE": "100",
        "WACRM_POLL_INTERVAL": "0.05",
        "WACRM_LAST_USED_FLUSH": "0.05",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "loader", command],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def stopped(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, float]:
    """Send *sig* to *proc*; return its exit status, its output and how long it took."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=STOP_WITHIN + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the loader did not stop on {signal.Signals(sig).name}")
    return proc.returncode, out, time.monotonic() - sent


async def writing(redis: Redis) -> bool:
    return int(await redis.dbsize()) > 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_run_stopped_in_the_middle_of_a_reconcile_exits_0_quickly(
    sig: int, pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    await bulk_keys(pg, await pg_account(pg), 40000)
    proc = start("run", source=pg_dsn, redis_url=redis_server.url)
    await eventually(lambda: writing(redis), 30)
    assert await redis.get(KS.loaded) in (None, b"0"), "the reconcile was still running"
    status, out, took = await stopped(proc, sig)
    assert status == 0, out
    assert took < STOP_WITHIN, out
    assert "Traceback" not in out and '"exc"' not in out, out
    assert "loader stopped" in out
    assert "without closing" not in out, "stopped cleanly, not by the last resort"


async def test_run_stopped_while_following_changes_exits_0_quickly(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    await bulk_keys(pg, await pg_account(pg), 10)
    proc = start("run", source=pg_dsn, redis_url=redis_server.url)

    async def reconciled() -> bool:
        return await redis.get(KS.loaded) not in (None, b"0")

    await eventually(reconciled, 20)
    status, out, took = await stopped(proc, signal.SIGTERM)
    assert (status, "Traceback" in out) == (0, False), out
    assert took < STOP_WITHIN


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_sync_interrupted_exits_non_zero_without_a_traceback(
    sig: int, pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    await bulk_keys(pg, await pg_account(pg), 40000)
    proc = start("sync", source=pg_dsn, redis_url=redis_server.url)
    await eventually(lambda: writing(redis), 30)
    status, out, took = await stopped(proc, sig)
    assert status == 128 + sig, out
    assert took < STOP_WITHIN
    assert "Traceback" not in out and '"exc"' not in out, out


class _StuckSource:
    """A source whose ``touch`` never returns: the loader is stopped in the middle of it."""

    def __init__(self) -> None:
        self.touching = asyncio.Event()

    async def touch(self, uses: Mapping[str, int]) -> int:
        self.touching.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_last_use_notes_taken_when_stopped_are_handed_back(
    mirror: Mirror, redis: Redis, redis_server: RedisServer
) -> None:
    await redis.zadd(KS.used, {"k1": 1000, "k2": 2000})
    source = _StuckSource()
    settings = settings_for("sqlite:///unused.db", redis_server, last_used_flush=0.01)
    task = asyncio.create_task(runner._usage_loop(settings, source, mirror, LoaderMetrics()))
    await asyncio.wait_for(source.touching.wait(), 5)
    assert not await redis.exists(KS.used)  # taken
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await redis.zrange(KS.used, 0, -1, withscores=True) == [(b"k1", 1000), (b"k2", 2000)]
