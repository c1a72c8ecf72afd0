"""``python -m loader`` as an operator runs it: output, exit statuses, Redis updated at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from sidecar.apikeys import is_well_formed
from sidecar.records import Keyspace, decode, hash_key
from tests.conftest import RedisServer
from tests.loader.conftest import ROOT

KS = Keyspace()


def loader(*args: str, source: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WACRM_SOURCE": source, "WACRM_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "loader", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_create_list_revoke_through_the_command_line(
    pg: asyncpg.Connection, pg_dsn: str, redis: Redis, redis_server: RedisServer
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return loader(*args, source=pg_dsn, redis_url=redis_server.url)

    made = run("accounts", "create", "  Acme Inc ")
    assert made.returncode == 0, made.stderr
    account_id = made.stdout.strip()
    assert await pg.fetchval("SELECT name FROM accounts WHERE id = $1", account_id) == "Acme Inc"

    created = run(
        "keys",
        "create",
        "--account",
        account_id,
        "--name",
        "  CI  ",
        "--scope",
        "messages:send",
        "--scope",
        "contacts:read",
        "--scope",
        "messages:send",
        "--expires-in-days",
        "30",
    )
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.splitlines()[-1]
    assert is_well_formed(plaintext)
    assert plaintext not in created.stderr and hash_key(plaintext) not in created.stderr
    row = await pg.fetchrow("SELECT * FROM api_keys WHERE key_hash = $1", hash_key(plaintext))
    assert row is not None
    assert row["name"] == "CI" and row["scopes"] == ["messages:send", "contacts:read"]
    assert row["key_prefix"] == plaintext[:19] and row["expires_at"] is not None
    raw = await redis.get(KS.record(hash_key(plaintext)))  # works before any `loader run`
    assert raw is not None and decode(raw).key_id == str(row["id"])

    listed = run("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert entry["id"] == str(row["id"]) and entry["revoked_at"] is None
    assert set(entry) == {
        "id",
        "name",
        "key_prefix",
        "scopes",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "created_at",
    }
    table = run("keys", "list", "--account", account_id)
    for text in (listed.stdout, table.stdout):
        assert hash_key(plaintext) not in text and plaintext not in text

    revoked = run("keys", "revoke", str(row["id"]))
    assert revoked.returncode == 0, revoked.stderr
    assert await redis.exists(KS.record(hash_key(plaintext))) == 0
    assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", row["id"]) is not None

    again = run("keys", "revoke", str(row["id"]))
    assert again.returncode == 1 and "no active key" in again.stderr
    unknown = run("keys", "revoke", "00000000-0000-4000-8000-000000000000")
    assert unknown.returncode == 1 and "no active key" in unknown.stderr


async def test_rule_breaking_input_is_refused(
    pg: asyncpg.Connection, pg_dsn: str, redis_server: RedisServer
) -> None:
    account_id = loader(
        "accounts", "create", "A", source=pg_dsn, redis_url=redis_server.url
    ).stdout.strip()
    for extra, message in (
        (["--name", "x" * 81], "longer than 80"),
        (["--name", "ok", "--scope", "admin"], "unknown scope 'admin'"),
        (["--name", "ok", "--expires-in-days", "366"], "1 to 365"),
    ):
        done = loader(
            "keys",
            "create",
            "--account",
            account_id,
            *extra,
            source=pg_dsn,
            redis_url=redis_server.url,
        )
        assert done.returncode == 2 and message in done.stderr
    missing = loader(
        "keys",
        "create",
        "--account",
        "00000000-0000-4000-8000-000000000000",
        "--name",
        "x",
        source=pg_dsn,
        redis_url=redis_server.url,
    )
    assert missing.returncode == 1 and "no account" in missing.stderr
    assert await pg.fetchval("SELECT count(*) FROM api_keys") == 0


def test_a_key_is_still_shown_when_redis_is_down(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'keys.db'}"
    down = "redis://127.0.0.1:1/0"
    account_id = loader("accounts", "create", "A", source=source, redis_url=down).stdout.strip()
    created = loader(
        "keys", "create", "--account", account_id, "--name", "x", source=source, redis_url=down
    )
    assert created.returncode == 0
    assert is_well_formed(created.stdout.splitlines()[-1])
    assert "Redis not reachable" in created.stderr
    key_id = created.stdout.splitlines()[0].removeprefix("id: ")
    revoked = loader("keys", "revoke", key_id, source=source, redis_url=down)
    assert revoked.returncode == 3 and "Redis could not be updated" in revoked.stderr


def test_sync_fails_clearly_without_its_source(redis_server: RedisServer) -> None:
    done = loader(
        "sync", source="postgresql://postgres@127.0.0.1:1/none", redis_url=redis_server.url
    )
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL" in done.stderr and "Traceback" not in done.stderr


def test_bad_settings_exit_2_naming_the_variable(redis_server: RedisServer) -> None:
    done = loader("sync", source="mysql://nope", redis_url=redis_server.url)
    assert done.returncode == 2 and "WACRM_SOURCE" in done.stderr
    env = {k: v for k, v in os.environ.items() if k != "WACRM_SOURCE"}
    unset = subprocess.run(
        [sys.executable, "-m", "loader", "sync"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert unset.returncode == 2 and "WACRM_SOURCE is not set" in unset.stderr
    flag = loader("--batch-size", "0", "sync", source="sqlite:///x.db", redis_url=redis_server.url)
    assert flag.returncode == 2 and "--batch-size" in flag.stderr


@pytest.mark.parametrize("command", ["sync", "run"])
@pytest.mark.parametrize("url", ["foo://x", "redis://x:99999/0", "unix://"])
def test_a_bad_redis_url_ends_with_one_line_naming_it(
    tmp_path: Path, command: str, url: str
) -> None:
    done = loader(command, source=f"sqlite:///{tmp_path / 'keys.db'}", redis_url=url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"wacrm-loader: WACRM_REDIS_URL={url!r}: "), line
    assert not (tmp_path / "keys.db").exists()  # refused before anything was opened
