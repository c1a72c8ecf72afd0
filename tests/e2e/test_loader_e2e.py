"""The loader end to end: PostgreSQL (Wacrm's schema) -> loader -> Redis -> sidecar -> nginx.

Changes are made the way Wacrm's dashboard makes them, with plain SQL, and proven through the
gate itself: a request with the key, answered by nginx.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e.conftest import Gate
from tests.loader.conftest import bulk_keys, pg_account, pg_key

ROOT = Path(__file__).resolve().parent.parent.parent
KS = Keyspace()


class Loader:
    """``python -m loader`` against the test database and the gate's Redis."""

    def __init__(self, workdir: Path, dsn: str, redis_url: str) -> None:
        self.env = {
            **os.environ,
            "WACRM_SOURCE": dsn,
            "WACRM_REDIS_URL": redis_url,
            "WACRM_POLL_INTERVAL": "0.05",
            "WACRM_RETRY_MAX": "0.5",
        }
        self.process = procs.Process(
            [sys.executable, "-m", "loader", "run"],
            port=0,
            log=workdir / "loader.log",
            env=self.env,
        )

    def start(self, redis_url: str) -> None:
        """Start ``loader run`` and wait for its first full reconcile."""
        self.process.start_background()
        with redis_sync.Redis.from_url(redis_url) as r:
            # The mark holds 0 while the first reconcile runs, then its version.
            wait_for(lambda: r.get(KS.loaded) not in (None, b"0"), 20, "the first reconcile")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.stop(sig)

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loader", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def loader(
    gate: Gate,
    workdir: Path,
    pg_dsn: str,
    redis_server: RedisServer,
) -> Iterator[Loader]:
    """Return the loader, not started, and Redis empty as the loader finds it before its
    first reconcile (no loaded mark); the loader is stopped after the test."""
    with gate.redis() as r:
        r.delete(KS.loaded)
    proc = Loader(workdir, pg_dsn, redis_server.url)
    yield proc
    proc.stop()


def wait_for(check: Callable[[], bool], within: float, what: str) -> float:
    """Wait until *check* holds; return the seconds it took, or fail after *within*."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within} s")
        time.sleep(0.02)
    return time.monotonic() - started


def status(gate: Gate, key: str, target: str = "/api/v1/contacts", method: str = "GET") -> int:
    return gate.get(target, key=key, method=method).status


async def test_keys_created_revoked_rescoped_and_deleted_in_sql_take_effect_within_a_second(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
    redis_server: RedisServer,
) -> None:
    acct = await pg_account(pg)
    loader.start(redis_server.url)

    key_id, key, _ = await pg_key(pg, acct, ["contacts:read"])
    took = wait_for(lambda: status(gate, key) == 200, 1.0, "new key accepted")
    assert took < 1.0
    assert status(gate, key, "/api/v1/messages", "POST") == 403

    await pg.execute("UPDATE api_keys SET scopes = '{messages:send}' WHERE id = $1", key_id)
    wait_for(lambda: status(gate, key, "/api/v1/messages", "POST") == 200, 1.0, "new scope applies")
    assert status(gate, key) == 403  # the old scope is gone

    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    wait_for(lambda: status(gate, key, "/api/v1/me") == 401, 1.0, "revoked key refused")

    _, other, _ = await pg_key(pg, acct, ["contacts:read"])
    wait_for(lambda: status(gate, other) == 200, 1.0, "second key accepted")
    await pg.execute("DELETE FROM accounts WHERE id = $1", acct)
    wait_for(lambda: status(gate, other) == 401, 1.0, "key of a deleted account refused")


async def test_expiry_is_honoured_even_with_the_loader_stopped(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
    redis_server: RedisServer,
) -> None:
    acct = await pg_account(pg)
    _, key, _ = await pg_key(
        pg, acct, ["contacts:read"], expires_sql="now() + interval '3 seconds'"
    )
    loader.start(redis_server.url)
    assert status(gate, key) == 200
    expires_at = await pg.fetchval("SELECT extract(epoch FROM expires_at) FROM api_keys")
    loader.stop()
    wait_for(lambda: status(gate, key) == 401, 6, "expired key refused")
    assert time.time() >= float(expires_at)


async def test_keys_revoke_refuses_the_next_request_with_the_loader_stopped(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
) -> None:
    gate.mark_loaded()  # as a loader that ran before and stopped
    acct = await pg_account(pg)
    created = loader.command(
        "keys", "create", "--account", acct, "--name", "ci", "--scope", "contacts:read"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    key_id = created.stdout.splitlines()[0].removeprefix("id: ")
    assert status(gate, key) == 200  # in Redis at once, no loader running
    revoked = loader.command("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert status(gate, key) == 401


async def test_a_redis_restarted_empty_is_reloaded_within_seconds(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
    redis_server: RedisServer,
) -> None:
    acct = await pg_account(pg)
    _, key, _ = await pg_key(pg, acct, ["contacts:read"])
    loader.start(redis_server.url)
    assert status(gate, key) == 200
    redis_server.stop()
    redis_server.start()  # no persistence: it comes back empty
    assert status(gate, key) in (200, 503)  # never a 401: an empty Redis is an outage
    took = wait_for(lambda: status(gate, key) == 200, 5, "key works again after the restart")
    assert took < 5


async def test_a_loader_killed_mid_sync_converges_when_restarted(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
    redis_server: RedisServer,
) -> None:
    acct = await pg_account(pg)
    count = 40000
    await bulk_keys(pg, acct, count)
    plain = {i: "wacrm_live_" + str(i).zfill(43) for i in (1, 2, count)}
    r = redis_sync.Redis.from_url(redis_server.url)
    try:
        # The test drives other processes; nothing else runs on its event loop.
        sync = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "loader", "sync"],
            env={**loader.env, "WACRM_BATCH_SIZE": "250"},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: r.dbsize() > 100, 30, "the sync writing")
        sync.send_signal(signal.SIGKILL)
        sync.wait()
        loaded = sum(1 for _ in r.scan_iter(KS.record_pattern, count=10000))
        assert 0 < loaded < count, "killed in the middle of the sync"
        assert r.get(KS.loaded) == b"0"  # begun, never completed

        await pg.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_prefix = ANY($1)",
            ["wacrm_live_00000001", "wacrm_live_" + str(count).zfill(8)],
        )
        loader.start(redis_server.url)
        active = {
            row[0]
            for row in await pg.fetch("SELECT key_hash FROM api_keys WHERE revoked_at IS NULL")
        }
        stored = {
            k.decode()[len("wacrm:key:{") : -1] for k in r.scan_iter(KS.record_pattern, count=10000)
        }
        assert stored == active and len(active) == count - 2
    finally:
        r.close()
    assert status(gate, plain[2]) == 200
    assert status(gate, plain[1]) == 401
    assert status(gate, plain[count]) == 401


def sync_with_limits(loader: Loader, limits: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", "sync"],
        env={**loader.env, "WACRM_RATE_LIMITS": str(limits)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_keys_own_rate_limit_from_the_limits_file_is_enforced(
    gate: Gate,
    loader: Loader,
    pg: asyncpg.Connection,
    workdir: Path,
) -> None:
    acct = await pg_account(pg)
    key_id, key, _ = await pg_key(pg, acct, ["contacts:read"])
    _, other, _ = await pg_key(pg, acct, ["contacts:read"])
    limits = workdir / "limits"
    limits.write_text(f"key {key_id} 3/1h\n")
    synced = await asyncio.to_thread(sync_with_limits, loader, limits)
    assert synced.returncode == 0, synced.stderr
    assert [status(gate, key) for _ in range(4)] == [200, 200, 200, 429]
    assert gate.get("/api/v1/contacts", key=other).header("X-RateLimit-Limit") == "120"
    bad = await asyncio.to_thread(sync_with_limits, loader, workdir / "missing")
    assert bad.returncode == 2
    assert "cannot read rate-limits file" in bad.stderr
