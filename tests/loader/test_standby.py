"""Two real ``loader run`` processes on one Redis and one SQLite table: one works, the other
stands by and takes over when the first dies, stops, or loses Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from demo.procs import free_port
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.loader.conftest import ROOT, sqlite_db, sqlite_key
from tests.loader.test_metrics import scrape, value
from tests.loader.test_runner import eventually

KS = Keyspace()
#: The lock's ttl in these tests: renewed every 0.67 s, work stops 1 s after the last
#: renewal, a standby tries every 0.2 s.
TTL = 2.0


class Loader:
    """One ``python -m loader run`` process, its log in a file, its metrics on a port."""

    def __init__(self, name: str, tmp_path: Path, redis_url: str) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp_path / f"{name}.log"
        env = {
            **os.environ,
            "WACRM_SOURCE": f"sqlite:///{tmp_path / 'keys.db'}",
            "WACRM_REDIS_URL": redis_url,
            "WACRM_LOADER_LOCK_TTL": str(TTL),
            "WACRM_LOADER_METRICS_PORT": str(self.port),
            "WACRM_POLL_INTERVAL": "0.05",
            "WACRM_RETRY_MAX": "0.5",
            "WACRM_LAST_USED_FLUSH": "0.1",
            "WACRM_LOADER_TIMEOUT": "1",
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loader", "run"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def readyz(self) -> tuple[int, dict[str, str]] | None:
        """Return the status and body of /readyz, or None when nothing answers."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{self.port}/readyz") as r,
            ):
                return r.status, await r.json()
        except aiohttp.ClientError:
            return None

    async def active(self) -> float | None:
        """Return the wacrm_loader_active gauge, or None when nothing answers."""
        try:
            return value(await scrape(self.port), "wacrm_loader_active")
        except aiohttp.ClientError:
            return None

    async def counted(self, name: str, **labels: str) -> float:
        return value(await scrape(self.port), name, **labels)

    def lines(self) -> list[str]:
        """Return the message of every JSON line the process logged."""
        out = []
        for line in self.log.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(str(orjson.loads(line)["msg"]))
        return out

    def output(self) -> str:
        return self.log.read_text()

    def token(self) -> str:
        """Return the token the loader logged on taking the lock (the first time, if ever)."""
        [token] = {
            m.split("(token ", 1)[1].split(")", 1)[0]
            for m in self.lines()
            if m.startswith("active: this loader (token ")
        }
        return token


@pytest.fixture
def loaders(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[Loader]]:
    """Return a list to start loaders into; each is killed, if still running, afterwards."""
    started: list[Loader] = []
    yield started
    for loader in started:
        if loader.proc.poll() is None:
            loader.proc.kill()
        loader.proc.wait(10)


async def start_pair(
    tmp_path: Path, redis_server: RedisServer, loaders: list[Loader]
) -> tuple[Loader, Loader]:
    """Start loader a, let it become active and reconcile, then start loader b, the standby."""
    a = Loader("a", tmp_path, redis_server.url)
    loaders.append(a)
    await eventually(lambda: _is(a, "active", ready=True), 20)
    b = Loader("b", tmp_path, redis_server.url)
    loaders.append(b)
    await eventually(lambda: _is(b, "standby", ready=True), 20)
    return a, b


async def test_of_two_loaders_one_works_and_each_change_is_applied_once(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, loaders: list[Loader]
) -> None:
    a, b = await start_pair(tmp_path, redis_server, loaders)
    assert (await a.active(), await b.active()) == (1, 0)
    ready = await b.readyz()
    assert ready == (200, {"status": "ready", "role": "standby", "active": a.token()})
    assert await a.readyz() == (200, {"status": "ready", "role": "active"})
    assert await redis.get(KS.lock) == a.token().encode()

    sqlite_key(tmp_path / "keys.db", "k1", "a" * 64, new_account=True)
    await eventually(lambda: _present(redis, "a" * 64), 2)
    with sqlite_db(tmp_path / "keys.db") as db:
        db.execute("UPDATE api_keys SET revoked_at = '2025-01-01T00:00:00Z' WHERE id = 'k1'")
    await eventually(lambda: _absent(redis, "a" * 64), 2)
    seconds, _ = await redis.time()
    sqlite_key(tmp_path / "keys.db", "k2", "b" * 64)
    await redis.zadd(KS.used, {"k2": seconds * 1000})
    await eventually(lambda: _used_at(tmp_path, "k2"), 2)
    await eventually(lambda: _present(redis, "b" * 64), 2)

    changes = "wacrm_loader_changes_applied_total"
    used = "wacrm_loader_last_used_rows_written_total"

    async def work(loader: Loader) -> tuple[float, ...]:
        return (
            await loader.counted(changes, kind="written", via="notification"),
            await loader.counted(changes, kind="deleted", via="notification"),
            await loader.counted(used),
        )

    await eventually(lambda: _is_value(work(a), (2, 1, 1)), 2)  # counted just after the work
    assert await work(b) == (0, 0, 0)
    for kind in ("written", "deleted"):
        assert await b.counted(changes, kind=kind, via="reconcile") == 0, kind
    assert await b.counted("wacrm_loader_reconciles_total", result="ok") == 0
    # The standby said once who is active, however many times it tried.
    standby_lines = [m for m in b.lines() if m.startswith("standby:")]
    assert standby_lines == [f"standby: another loader (token {a.token()}) is active"]
    assert (await a.active(), await b.active()) == (1, 0)


async def test_a_standby_takes_over_within_about_the_ttl_when_the_active_loader_is_killed(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, loaders: list[Loader]
) -> None:
    a, b = await start_pair(tmp_path, redis_server, loaders)
    a.proc.kill()
    killed = time.monotonic()
    a.proc.wait(5)
    sqlite_key(tmp_path / "keys.db", "k1", "c" * 64, new_account=True)  # while no loader works
    await eventually(lambda: _gauge_is(b, 1), TTL * 3)
    took_over = time.monotonic() - killed
    await eventually(lambda: _present(redis, "c" * 64), 5)
    applied = time.monotonic() - killed
    print(f"SIGKILL: took over after {took_over:.2f} s, change applied after {applied:.2f} s")
    # Not before the dead loader's lock expired (at least two thirds of a ttl after its last
    # renewal), and soon after.
    assert TTL * 0.6 < took_over < TTL + 1.0
    await eventually(lambda: _is(b, "active", ready=True), 5)  # after its full reconcile
    assert await b.counted("wacrm_loader_reconciles_total", result="ok") == 1
    assert await redis.get(KS.lock) == b.token().encode()


async def test_a_standby_takes_over_at_once_when_the_active_loader_stops_cleanly(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, loaders: list[Loader]
) -> None:
    a, b = await start_pair(tmp_path, redis_server, loaders)
    a.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    await eventually(lambda: _gauge_is(b, 1), TTL)
    took_over = time.monotonic() - stopped
    assert await asyncio.to_thread(a.proc.wait, 5) == 0
    sqlite_key(tmp_path / "keys.db", "k1", "d" * 64, new_account=True)
    await eventually(lambda: _present(redis, "d" * 64), 5)
    print(f"SIGTERM: took over after {took_over:.2f} s")
    assert took_over < TTL / 2, "well under the ttl: the lock was freed"
    assert "released the loader lock" in a.lines()
    assert "Traceback" not in a.output()


async def test_redis_stopped_and_started_never_makes_two_loaders_active(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, loaders: list[Loader]
) -> None:
    a, b = await start_pair(tmp_path, redis_server, loaders)
    async with sampling(a, b) as samples:
        redis_server.stop()
        down = time.monotonic()
        try:
            sqlite_key(
                tmp_path / "keys.db", "k1", "e" * 64, new_account=True
            )  # while Redis is down
            # Neither works once the last renewal is half a ttl old, before the lock expires.
            await eventually(lambda: _both_standing_by(a, b), TTL / 2 + 0.5)
            stood_by = time.monotonic() - down
            no_redis = (503, {"status": "no redis", "role": "standby"})
            await eventually(lambda: _is_value(a.readyz(), no_redis), 1)
            await eventually(lambda: _is_value(b.readyz(), no_redis), 1)
            await asyncio.sleep(TTL * 0.6)  # down for longer than the ttl
        finally:
            redis_server.start()
        fresh = Redis.from_url(redis_server.url)
        try:
            await eventually(lambda: _present(fresh, "e" * 64), 10)
            resumed = time.monotonic() - down
            await asyncio.sleep(TTL)  # and it stays that way
        finally:
            await fresh.aclose()
    print(f"Redis down: both standing by after {stood_by:.2f} s; resumed after {resumed:.2f} s")
    assert stood_by < TTL / 2 + 0.3
    assert _overlap(samples) == 0, "never two active loaders"
    assert any(s[1:] == (0, 0) for s in samples)
    final = samples[-1][1:]
    assert sorted(final, key=str) == [0, 1], final  # one active again


async def test_after_a_short_redis_blip_one_loader_is_active_and_work_resumes(
    tmp_path: Path, redis: Redis, redis_server: RedisServer, loaders: list[Loader]
) -> None:
    """Redis back empty before the active loader had to stop: the lock went with the data,
    so the standby may take it first; the active one sees that at its next attempt."""
    a, b = await start_pair(tmp_path, redis_server, loaders)
    async with sampling(a, b) as samples:
        redis_server.stop()
        redis_server.start()  # empty again: the lock went with the rest
        sqlite_key(tmp_path / "keys.db", "k1", "f" * 64, new_account=True)
        fresh = Redis.from_url(redis_server.url)
        try:
            await eventually(lambda: _present(fresh, "f" * 64), 10)
            await asyncio.sleep(TTL / 2)  # longer than any renewal period
            holder = await fresh.get(KS.lock)
        finally:
            await fresh.aclose()
    overlap = _overlap(samples)
    print(f"Redis blip: both active for {overlap:.2f} s")
    assert overlap <= TTL / 3 + 0.3, "at most until the active loader's next renewal"
    gauges = samples[-1][1:]
    assert sorted(gauges, key=str) == [0, 1], gauges
    active = a if gauges[0] == 1 else b
    assert holder == active.token().encode()


Sample = tuple[float, float | None, float | None]


@contextlib.asynccontextmanager
async def sampling(a: Loader, b: Loader) -> AsyncIterator[list[Sample]]:
    """Record (time, a's gauge, b's gauge) every 20 ms while the block runs."""
    samples: list[Sample] = []

    async def sample() -> None:
        while True:
            samples.append((time.monotonic(), await a.active(), await b.active()))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        samples.append((time.monotonic(), await a.active(), await b.active()))


def _overlap(samples: list[Sample]) -> float:
    """Return how long both loaders reported themselves active, summed over the samples."""
    total = 0.0
    for (t, *gauges), (later, *_) in itertools.pairwise(samples):
        if gauges == [1, 1]:
            total += later - t
    return total


async def _is(loader: Loader, role: str, *, ready: bool) -> bool:
    if loader.proc.poll() is not None:
        pytest.fail(f"loader {loader.name} exited: {loader.output()}")
    got = await loader.readyz()
    return got is not None and got[1].get("role") == role and (got[0] == 200) == ready


async def _is_value(got: Awaitable[object], expected: object) -> bool:
    return await got == expected


async def _gauge_is(loader: Loader, expected: float) -> bool:
    return await loader.active() == expected


async def _both_standing_by(a: Loader, b: Loader) -> bool:
    return (await a.active(), await b.active()) == (0, 0)


async def _present(redis: Redis, key_hash: str) -> bool:
    return bool(await redis.exists(KS.record(key_hash)))


async def _absent(redis: Redis, key_hash: str) -> bool:
    return not await _present(redis, key_hash)


async def _used_at(tmp_path: Path, key_id: str) -> bool:
    with sqlite_db(tmp_path / "keys.db") as db:
        row = db.execute("SELECT last_used_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    return row is not None and row[0] is not None
