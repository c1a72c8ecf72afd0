"""``loader run`` under faults: its PostgreSQL restarted under it, and itself SIGKILLed in the
middle of a large reconcile.  Real PostgreSQL, real Redis, the real loader process, the gate.

Each test prints what it measured (``pytest -s`` shows it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import KeyRecord, Keyspace, decode, hash_key
from tests.conftest import RedisServer
from tests.e2e.conftest import Gate
from tests.e2e.test_loader_e2e import Loader, status, wait_for
from tests.loader.conftest import NOTIFY_SQL, WACRM_SCHEMA, bulk_keys, pg_account, pg_key

KS = Keyspace()
#: Keys of the large table: a reconcile of them takes seconds with small batches.
MANY = 60_000
#: Every STRIDE-th key of the large table is changed, one way or another, so that the
#: changes are spread over the whole table.
STRIDE = 100
#: The loader lock's ttl after the kill: how long the killed loader's lock keeps the next out.
LOCK_TTL = "2"


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


class OwnPostgres:
    """A PostgreSQL server of the test's own, in a temporary folder, on a free port.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user (as
    ``scripts/postgres`` does).  It may listen on TCP or only on its Unix socket, which is
    how a test reaches the database while the loader (which uses TCP) cannot.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Under the temporary folder, not pytest's: the postgres user must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="wacrm-pg-"))
        self.data = self.folder / "data"
        self.port = procs.free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/wacrm"
        self.running = False
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")  # fmt: skip

    def start(self, *, tcp: bool = True) -> None:
        """Start the server and wait until it accepts connections."""
        listen = "127.0.0.1" if tcp else "''"
        options = (
            f"-c listen_addresses={listen} -c port={self.port}"
            f" -c unix_socket_directories={self.folder} -c fsync=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-w", "-t", "30", "-o", options, "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends the sessions, ``immediate`` just kills them."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    async def connect(self, database: str = "wacrm") -> asyncpg.Connection:
        """Connect through the Unix socket, which is there whether TCP is or not."""
        return await asyncpg.connect(
            host=str(self.folder), port=self.port, user="postgres", database=database
        )

    def remove(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr.strip()}\n{tail}")


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    """Return a PostgreSQL server of the test's own, running, with database ``wacrm`` holding
    Wacrm's schema and the shipped trigger."""
    bindir = _bindir()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin), or no runuser")
    server = OwnPostgres(bindir)
    try:
        server.start()
        admin = await server.connect("postgres")
        try:
            await admin.execute("CREATE DATABASE wacrm")
        finally:
            await admin.close()
        conn = await server.connect()
        try:
            await conn.execute(WACRM_SCHEMA.read_text())
            await conn.execute(NOTIFY_SQL.read_text())
        finally:
            await conn.close()
        yield server
    finally:
        server.remove()


@pytest.fixture
def fresh_redis(gate: Gate) -> Iterator[redis_sync.Redis]:
    """Return a client of the gate's Redis, empty and without a finished load, as a loader
    finds it before its first reconcile."""
    with gate.redis() as r:
        r.delete(KS.loaded)
        yield r


@pytest.mark.timeout(120)
async def test_a_restarted_postgresql_is_reconnected_to_and_no_change_made_meanwhile_is_missed(
    gate: Gate,
    own_pg: OwnPostgres,
    fresh_redis: redis_sync.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    conn = await own_pg.connect()
    try:
        acct = await pg_account(conn)
        revoked_id, revoked, _ = await pg_key(conn, acct, ["contacts:read"])
        kept_id, kept, _ = await pg_key(conn, acct, ["contacts:read"])
    finally:
        await conn.close()
    loader = Loader(tmp_path, own_pg.dsn, redis_server.url)
    loader.start(redis_server.url)
    try:
        assert status(gate, revoked) == 200 and status(gate, kept) == 200

        # The server goes away without a goodbye, then comes back on its Unix socket only:
        # the changes made then are made while the loader cannot reach the table.
        own_pg.stop("immediate")
        down = time.monotonic()
        wait_for(lambda: "retrying in" in loader.process.log.read_text(), 10, "the loss noticed")
        noticed = time.monotonic() - down
        own_pg.start(tcp=False)
        conn = await own_pg.connect()
        try:
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", revoked_id)
            await conn.execute(
                "UPDATE api_keys SET scopes = '{messages:send}' WHERE id = $1", kept_id
            )
            _, added, _ = await pg_key(conn, acct, ["contacts:read"])
        finally:
            await conn.close()
        # Nothing reached the loader: Redis still says what the table said before.
        assert status(gate, revoked) == 200 and status(gate, added) == 401

        own_pg.stop("fast")
        own_pg.start(tcp=True)
        back = time.monotonic()
        refused = wait_for(lambda: status(gate, revoked) == 401, 15, "the revocation applied")
        wait_for(lambda: status(gate, added) == 200, 15, "the new key loaded")
        wait_for(lambda: status(gate, kept, "/api/v1/messages", "POST") == 200, 15, "new scope")
        assert status(gate, kept) == 403  # the old scope is gone
        caught_up = time.monotonic() - back
        conn = await own_pg.connect()
        try:
            active = {
                r[0]
                for r in await conn.fetch("SELECT key_hash FROM api_keys WHERE revoked_at IS NULL")
            }
        finally:
            await conn.close()
        assert _stored_hashes(fresh_redis) == active and len(active) == 2

        # The loader is still following: a revocation made now is applied by its notification.
        conn = await own_pg.connect()
        try:
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1",
                               hash_key(added))  # fmt: skip
        finally:
            await conn.close()
        followed = wait_for(lambda: status(gate, added) == 401, 5, "a revocation after the return")
    finally:
        loader.stop()
    log = loader.process.log.read_text()
    assert log.count('"reconciled: ') >= 2  # the first load, and one after reconnecting
    print(
        f"\nPostgreSQL restart: the loader noticed the loss {noticed:.2f} s after the server"
        f" was down; once the server listened on TCP again, the revoked key was refused after"
        f" {refused:.2f} s and the new key and the new scope applied by {caught_up:.2f} s;"
        f" a revocation made afterwards was applied within {followed:.3f} s"
    )


@pytest.mark.timeout(240)
async def test_a_loader_killed_in_the_middle_of_a_large_reconcile_leaves_redis_equal_to_the_table(
    gate: Gate,
    pg: asyncpg.Connection,
    pg_dsn: str,
    fresh_redis: redis_sync.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    r = fresh_redis
    acct = await pg_account(pg)
    await bulk_keys(pg, acct, MANY)
    other = await pg_account(pg, "Beta")
    other_keys = [await pg_key(pg, other, ["contacts:read"]) for _ in range(20)]
    first = Loader(tmp_path, pg_dsn, redis_server.url)
    first.start(redis_server.url)
    first.stop()
    assert len(_stored_hashes(r)) == MANY + 20
    loaded_before = int(r.get(KS.loaded) or 0)

    # While no loader runs: the table changes, and Redis loses records all over the table,
    # which the next reconcile must write back one batch after another.
    lost = [_bulk_hash(i) for i in range(STRIDE // 2, MANY + 1, STRIDE)]
    r.delete(*[KS.record(h) for h in lost])
    await pg.execute(
        "UPDATE api_keys SET scopes = '{contacts:read,messages:send}' WHERE key_prefix = ANY($1)",
        [_bulk_prefix(i) for i in range(STRIDE, MANY + 1, STRIDE)],
    )
    revoked_early = [i for i in range(1, MANY + 1, STRIDE)]
    await pg.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_prefix = ANY($1)",
        [_bulk_prefix(i) for i in revoked_early],
    )
    await pg.execute("UPDATE accounts SET name = 'Beta renamed' WHERE id = $1", other)

    # The reconcile that catches up, in small batches so that it takes a while: killed once
    # a third of the lost records are back, well before all are.
    env = {**os.environ, "WACRM_SOURCE": pg_dsn, "WACRM_REDIS_URL": redis_server.url,
           "WACRM_BATCH_SIZE": "100", "WACRM_LOADER_LOCK_TTL": LOCK_TTL}  # fmt: skip
    lost_keys = [KS.record(h) for h in lost]
    killed = procs.Process(
        [sys.executable, "-m", "loader", "run"], port=0, log=tmp_path / "killed.log", env=env
    )
    killed.start_background()
    try:
        started = time.monotonic()
        restored = 0
        while restored < len(lost) // 3 and time.monotonic() - started < 60:
            restored = sum(v is not None for v in r.mget(lost_keys))
            await asyncio.sleep(0.005)
    finally:
        killed.stop(signal.SIGKILL)
    into = time.monotonic() - started
    await asyncio.sleep(0.2)  # writes the kernel had taken from the loader reach Redis meanwhile
    restored = sum(v is not None for v in r.mget(lost_keys))
    assert 0 < restored < len(lost), f"killed in the middle: {restored} of {len(lost)} back"
    assert int(r.get(KS.loaded) or 0) == loaded_before  # that reconcile never completed

    # While it is dead: more keys revoked, among them some it had just written back, and more
    # keys added.
    revoked_late = [i for i in range(STRIDE // 2, MANY + 1, STRIDE * 2)]
    await pg.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_prefix = ANY($1)",
        [_bulk_prefix(i) for i in revoked_late],
    )
    added = [await pg_key(pg, acct, ["contacts:read"]) for _ in range(20)]

    again = Loader(tmp_path, pg_dsn, redis_server.url)
    again.env["WACRM_LOADER_LOCK_TTL"] = LOCK_TTL  # the process's environment
    again.process.start_background()
    try:
        took = wait_for(
            lambda: int(r.get(KS.loaded) or 0) > loaded_before, 90, "the reconcile after restart"
        )
        expected = await _table_records(pg)
        stored = _stored_records(r)
        revoked = {_bulk_hash(i) for i in (*revoked_early, *revoked_late)}
        assert not revoked & stored.keys(), "a revoked key is back"
        assert stored.keys() == expected.keys()
        wrong = [h for h, record in expected.items() if stored[h] != record]
        assert not wrong, f"{len(wrong)} records differ from their rows, e.g. {wrong[:3]}"
        assert len(stored) == MANY + 20 + 20 - len(revoked)
        assert {stored[hash_key(k)].account_name for _, k, _ in other_keys} == {"Beta renamed"}
        # And through the gate.
        assert status(gate, _bulk_plain(revoked_early[0])) == 401
        assert status(gate, _bulk_plain(revoked_late[-1])) == 401
        assert status(gate, _bulk_plain(STRIDE), "/api/v1/messages", "POST") == 200
        assert status(gate, added[-1][1]) == 200
    finally:
        again.stop()
    print(
        f"\nloader SIGKILLed {into:.2f} s into a reconcile of {MANY + 20:,} keys, {restored} of"
        f" {len(lost)} lost records written back; after the restart its reconcile completed in"
        f" {took:.2f} s (the killed loader's lock expiring first, ttl {LOCK_TTL} s);"
        f" all {len(stored):,} records equal their rows, {len(revoked):,} revoked keys absent"
    )


def _bulk_plain(i: int) -> str:
    return "wacrm_live_" + str(i).zfill(43)


def _bulk_hash(i: int) -> str:
    return hash_key(_bulk_plain(i))


def _bulk_prefix(i: int) -> str:
    return "wacrm_live_" + str(i).zfill(8)


def _stored_hashes(r: redis_sync.Redis) -> set[str]:
    return set(KS.hashes_in(r.scan_iter(KS.record_pattern, count=10000)))


def _stored_records(r: redis_sync.Redis) -> dict[str, KeyRecord]:
    """Return every record Redis holds, by key hash."""
    keys = list(r.scan_iter(KS.record_pattern, count=10000))
    out: dict[str, KeyRecord] = {}
    for i in range(0, len(keys), 5000):
        chunk = keys[i : i + 5000]
        for h, raw in zip(KS.hashes_in(chunk), r.mget(chunk), strict=True):
            assert raw is not None
            out[h] = decode(raw)
    return out


async def _table_records(pg: asyncpg.Connection) -> dict[str, KeyRecord]:
    """Return the record each active key of the table must have, by key hash."""
    rows = await pg.fetch(
        "SELECT k.key_hash, k.id::text, k.account_id::text, a.name, k.key_prefix, k.scopes"
        " FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " WHERE k.revoked_at IS NULL AND k.expires_at IS NULL"
    )
    return {row[0]: KeyRecord(row[1], row[2], row[3], row[4], tuple(row[5])) for row in rows}
