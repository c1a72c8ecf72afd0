"""Log hygiene: no log of any process ever holds a plaintext key or a full key hash.

Keys go through every path (valid, unknown, revoked, expired, malformed, rate-limited, wrong
scope, /api/v1/me, forward-auth, the loader's key commands, sync and run over a table with bad
rows) with both processes at debug level; then every log file is searched.  A display prefix
(``wacrm_live_`` and 8 characters, 19 in all) may appear; anything longer may not.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from demo import procs
from sidecar.apikeys import mint
from sidecar.records import Keyspace, hash_key
from tests.conftest import RedisServer
from tests.e2e import rawhttp
from tests.e2e.test_loader_e2e import Loader, wait_for
from tests.loader.conftest import throwaway_database

#: Longer than a display prefix: the start of a plaintext key.
PLAINTEXT = re.compile(r"wacrm_live_[A-Za-z0-9_-]{9,}")
#: A full SHA-256 in hex, in either case.
FULL_HASH = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
ACCOUNT = "7a1d6c1e-0000-4000-8000-0000000000aa"


class Stack:
    """nginx, the sidecar and the upstream, every log in *logs*."""

    def __init__(self, logs: Path, redis_url: str, level: str) -> None:
        self.upstream = procs.upstream(logs)
        self.sidecar = procs.sidecar(
            logs,
            redis_url=redis_url,
            extra_env={"WACRM_LOG_LEVEL": level, "WACRM_RATE_LIMIT": "120/1h"},
        )
        self.nginx = procs.nginx(
            logs, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def __enter__(self) -> Stack:
        for p in (self.upstream, self.sidecar, self.nginx):
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in (self.nginx, self.sidecar, self.upstream):
            p.stop()

    def status(self, key: str | None, target: str = "/api/v1/contacts", method: str = "GET") -> int:
        return rawhttp.request(self.nginx.port, target, key=key, method=method).status

    def forward_auth(self, key: str) -> int:
        return rawhttp.request(
            self.sidecar.port,
            "/forward-auth",
            headers=[
                ("Authorization", f"Bearer {key}"),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/api/v1/contacts"),
            ],
        ).status


@pytest.fixture(scope="module")
def logs_dsn() -> Iterator[str]:
    """Return a database of its own: the test leaves bad rows in it."""
    with throwaway_database() as dsn:
        yield dsn


async def insert_key(
    conn: asyncpg.Connection,
    scopes: list[str],
    *,
    expires_sql: str = "NULL",
    key_hash: str | None = None,
) -> tuple[str, str]:
    """Insert a key; return (id, plaintext)."""
    minted = mint()
    key_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes, expires_at)"
        f" VALUES ($1, $2, 'logs', $3, $4, $5, {expires_sql})",
        key_id,
        ACCOUNT,
        minted.key_prefix,
        key_hash or minted.key_hash,
        scopes,
    )
    return key_id, minted.plaintext


def command(loader: Loader, logs: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a loader command; keep its stdout and stderr as logs named *name*."""
    done = loader.command(*args)
    (logs / f"{name}.stdout.log").write_text(done.stdout)
    (logs / f"{name}.stderr.log").write_text(done.stderr)
    return done


async def test_no_log_holds_a_plaintext_key_or_a_full_hash(
    tmp_path: Path, logs_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    logs = tmp_path
    conn = await asyncpg.connect(logs_dsn)
    secrets: set[str] = set()
    try:
        await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, 'Acme Inc')", ACCOUNT)
        _, valid = await insert_key(conn, ["contacts:read"])
        revoked_id, revoked = await insert_key(conn, ["contacts:read"])
        _, expiring = await insert_key(
            conn, ["contacts:read"], expires_sql="now() + interval '2 seconds'"
        )
        _, expired = await insert_key(
            conn, ["contacts:read"], expires_sql="now() - interval '1 day'"
        )
        limited_id, limited = await insert_key(conn, ["contacts:read"])
        _, unknown_scope = await insert_key(conn, ["contacts:read", "contacts:destroy"])
        bad = mint()
        # A malformed stored hash (upper case, as a careless import might leave it).
        await insert_key(conn, ["contacts:read"], key_hash=bad.key_hash.upper())
        secrets |= {valid, revoked, expiring, expired, limited, unknown_scope, bad.plaintext}
    finally:
        await conn.close()

    limits = logs / "limits"
    limits.write_text(f"key {limited_id} 2/1h\n")
    loader = Loader(logs, logs_dsn, redis_server.url)
    loader.env.update(
        {
            "WACRM_LOG_LEVEL": "debug",
            "WACRM_RATE_LIMITS": str(limits),
            "WACRM_LAST_USED_FLUSH": "0.1",
        }
    )
    synced = command(loader, logs, "sync", "sync")
    assert synced.returncode == 0, synced.stderr
    assert "contacts:destroy" in synced.stderr  # the bad rows were met, and logged

    unknown = mint().plaintext
    malformed = [valid[:-1], valid + "A", valid[:30], "wacrm_live_" + "!" * 43]
    secrets |= {unknown, *malformed}
    with Stack(logs, redis_server.url, "debug") as stack:
        await asyncio.to_thread(loader.start, redis_server.url)
        try:
            created = command(
                loader, logs, "create", "keys", "create", "--account", ACCOUNT,
                "--name", "cli", "--scope", "contacts:read",
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
            *head, cli_key = created.stdout.splitlines()
            secrets.add(cli_key)
            # The plaintext is printed once, as the last line of stdout: nowhere else.
            (logs / "create.stdout.log").write_text("\n".join(head))
            for name, args in (("list", ()), ("list-json", ("--json",))):
                listed = command(loader, logs, name, "keys", "list", *args)
                assert listed.returncode == 0, listed.stderr

            assert stack.status(valid) == 200
            assert stack.status(cli_key) == 200
            assert stack.status(valid, "/api/v1/me") == 200
            assert stack.status(valid, "/api/v1/messages", "POST") == 403
            assert stack.status(unknown) == 401
            assert stack.status(unknown_scope) == 200  # the unknown scope is dropped
            assert stack.status(expired) == 401
            assert stack.status(None) == 401
            for bad_key in malformed:
                assert stack.status(bad_key) == 401
            assert stack.status(bad.plaintext) == 401
            assert [stack.status(limited) for _ in range(3)] == [200, 200, 429]
            assert stack.forward_auth(valid) == 200
            assert stack.forward_auth(unknown) == 401
            assert stack.status(revoked) == 200
            revoking = command(loader, logs, "revoke", "keys", "revoke", revoked_id)
            assert revoking.returncode == 0, revoking.stderr
            assert stack.status(revoked) == 401
            wait_for(lambda: stack.status(expiring) == 401, 5, "the expiring key refused")
            await asyncio.sleep(0.3)  # a few flushes of the last-use notes
        finally:
            await asyncio.to_thread(loader.stop)

    secrets |= {hash_key(s) for s in secrets}
    files = sorted(p for p in logs.iterdir() if p.suffix == ".log")
    names = {p.name for p in files}
    assert "nginx-error.log" in names and "loader.log" in names
    assert any(n.startswith("sidecar-") for n in names)
    assert (logs / "loader.log").read_text().count('"level":"debug"') > 0
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret.lower() not in text.lower(), f"{path.name} holds a key or its hash"
        assert not PLAINTEXT.search(text), f"{path.name}: {PLAINTEXT.search(text)}"
        assert not FULL_HASH.search(text), f"{path.name}: {FULL_HASH.search(text)}"


def test_denials_are_not_logged_one_by_one_at_the_default_level(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.set(Keyspace().loaded, 1)  # a finished load: an unknown key is a 401
    with Stack(tmp_path, redis_server.url, "info") as stack:
        [log] = tmp_path.glob("sidecar-*.log")
        before = log.read_text().splitlines()
        for _ in range(10):
            assert stack.status(mint().plaintext) == 401
            assert stack.status("nonsense") == 401
            assert stack.status(None) == 401
            assert stack.status(None, "/api/v1/contacts/%zz") == 400
        time.sleep(0.2)
        after = log.read_text().splitlines()
    assert after == before, after[len(before) :]
