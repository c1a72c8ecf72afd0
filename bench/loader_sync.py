"""The loader at scale: a million keys in PostgreSQL, synced into Redis.

Measures, each with the loader as a subprocess (``python -m loader sync``):

- a full sync into an empty Redis (target: at most 15 s),
- a reconcile when nothing changed (target: at most 10 s),
- a reconcile after 1% of the keys changed (revoked, re-scoped, added),
- the loader's peak RSS (target: at most 400 MB),
- Redis memory per key (INFO memory before and after the full sync).

Usage: ``.venv/bin/python -m bench.loader_sync [--keys N] [--pg DSN]``; it creates (and
drops) a database ``wacrm_bench`` next to the one *--pg* names and runs its own redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from redis import Redis

from bench import pg
from demo import procs

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "loader" / "wacrm_schema.sql"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "wacrm_bench"


@dataclass(frozen=True, slots=True)
class Run:
    """One loader run: wall seconds, CPU seconds, peak RSS in MB and exit status."""

    seconds: float
    cpu: float
    peak_rss_mb: float
    status: int


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--pg", default=os.environ.get("WACRM_TEST_PG", DEFAULT_PG))
    parser.add_argument("--reuse", action="store_true", help="keep the table of an earlier run")
    parser.add_argument("--keep", action="store_true", help="leave the database in place")
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        default=[],
        help="also run the loader of this checkout (a git worktree of another commit), each"
        " step right after this one's, into a Redis of its own",
    )
    args = parser.parse_args(argv)
    if args.reuse:
        dsn = pg.with_database(args.pg, DATABASE)
        asyncio.run(_restore(dsn))
    else:
        dsn = asyncio.run(_fill(args.pg, args.keys, args.accounts))
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    steps = ("full sync into empty Redis:", "reconcile, nothing changed:", "reconcile, 1% changed:")
    runs: dict[Path, list[Run]] = {tree: [] for tree in trees}
    memory: dict[Path, tuple[float, int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        servers = []
        for i in range(len(trees)):
            (Path(tmp) / str(i)).mkdir()
            servers.append(procs.redis_server(Path(tmp) / str(i)))
            servers[-1].start()
        try:
            urls = {t: f"redis://127.0.0.1:{s.port}/0" for t, s in zip(trees, servers, strict=True)}
            clients = {tree: Redis.from_url(url) for tree, url in urls.items()}
            before = {tree: int(c.info("memory")["used_memory"]) for tree, c in clients.items()}
            for step in range(len(steps)):
                if step == 2:
                    asyncio.run(_churn(dsn, args.keys // 100))
                for tree in trees:
                    runs[tree].append(_loader(dsn, urls[tree], tree))
                    if step == 0:
                        client = clients[tree]
                        after = int(client.info("memory")["used_memory"])
                        count = sum(1 for _ in client.scan_iter("wacrm:key:*", count=10000))
                        memory[tree] = ((after - before[tree]) / max(count, 1), count, 0)
            for tree, client in clients.items():
                count = sum(1 for _ in client.scan_iter("wacrm:key:*", count=10000))
                memory[tree] = (memory[tree][0], memory[tree][1], count)
                client.close()
        finally:
            for server in servers:
                server.stop()
    if not args.keep:
        asyncio.run(pg.drop(args.pg, DATABASE))
    print(f"keys in PostgreSQL:              {args.keys:,} ({args.accounts} accounts)")
    print(f"machine load average (1 min):    {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for tree in trees:
        per_key, records, records_after = memory[tree]
        print(f"\n{_name(tree)}")
        print(f"records in Redis after sync:     {records:,} (after churn: {records_after:,})")
        for label, run, target in zip(
            steps, runs[tree], (" (target <= 15 s)", " (target <= 10 s)", ""), strict=True
        ):
            print(f"{label:32} {run.seconds:6.2f} s{target}; loader CPU {run.cpu:.1f} s")
        peak = max(r.peak_rss_mb for r in runs[tree])
        print(f"loader peak RSS:                 {peak:.0f} MB (target <= 400 MB)")
        print(f"Redis memory per key:            {per_key:.0f} bytes")
    if len(trees) > 1:
        print("\nthis tree against each other, seconds (ratio < 1: this tree is faster)")
        for tree in trees[1:]:
            ratios = "  ".join(
                f"{a.seconds / b.seconds:.2f}x" for a, b in zip(runs[ROOT], runs[tree], strict=True)
            )
            print(f"  against {_name(tree)}: full, nothing changed, 1% changed: {ratios}")
    ok = all(r.status == 0 for tree_runs in runs.values() for r in tree_runs)
    return 0 if ok else 1


def _name(tree: Path) -> str:
    """Name the checkout at *tree* by its commit."""
    commit = _git(tree, "rev-parse", "--short", "HEAD")
    dirty = _git(tree, "status", "--porcelain", "--untracked-files=no")
    return f"{tree} at {commit or '?'}{' (with uncommitted changes)' if dirty else ''}"


def _git(tree: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    return done.stdout.strip()


def _loader(dsn: str, redis_url: str, tree: Path = ROOT) -> Run:
    env = {
        **os.environ,
        "WACRM_SOURCE": dsn,
        "WACRM_REDIS_URL": redis_url,
        "WACRM_LOG_LEVEL": "info",
    }
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "loader", "sync"], env=env, cwd=tree)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, cpu, usage.ru_maxrss / 1024, proc.returncode)


async def _fill(admin_dsn: str, keys: int, accounts: int) -> str:
    dsn = await pg.recreate(admin_dsn, DATABASE, SCHEMA.read_text())
    conn = await asyncpg.connect(dsn)
    try:
        started = time.monotonic()
        await conn.execute(
            "INSERT INTO accounts (id, name) SELECT"
            " md5('account' || a)::uuid, 'Account ' || a FROM generate_series(1, $1) a",
            accounts,
        )
        await conn.execute(
            """
            INSERT INTO api_keys (id, account_id, name, key_prefix, key_hash, scopes, expires_at)
            SELECT md5('key' || i)::uuid,
                   md5('account' || (i % $2 + 1))::uuid,
                   'key ' || i,
                   'wacrm_live_' || substr(md5('p' || i), 1, 8),
                   encode(sha256(('wacrm_live_' || i)::bytea), 'hex'),
                   CASE i % 3 WHEN 0 THEN ARRAY['messages:send']
                              WHEN 1 THEN ARRAY['contacts:read', 'contacts:write']
                              ELSE ARRAY['messages:send', 'messages:read', 'webhooks:manage'] END,
                   CASE WHEN i % 10 = 0 THEN now() + interval '30 days' END
            FROM generate_series(1, $1) i
            """,
            keys,
            accounts,
        )
        await conn.execute("ANALYZE")
        print(f"filled PostgreSQL with {keys:,} keys in {time.monotonic() - started:.1f} s")
    finally:
        await conn.close()
    return dsn


async def _churn(dsn: str, count: int) -> None:
    """Revoke, re-scope and add *count* keys each, as a busy day would."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id IN"
            " (SELECT id FROM api_keys ORDER BY key_hash LIMIT $1)",
            count,
        )
        await conn.execute(
            "UPDATE api_keys SET scopes = ARRAY['broadcasts:send'] WHERE id IN"
            " (SELECT id FROM api_keys ORDER BY key_hash DESC LIMIT $1)",
            count,
        )
        await conn.execute(
            "INSERT INTO api_keys (account_id, name, key_prefix, key_hash, scopes)"
            " SELECT md5('account1')::uuid, 'new ' || i, 'wacrm_live_newnewne',"
            " encode(sha256(('new' || i)::bytea), 'hex'), ARRAY['messages:send']"
            " FROM generate_series(1, $1) i",
            count,
        )
    finally:
        await conn.close()


async def _restore(dsn: str) -> None:
    """Undo what `_churn` did to a kept table."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM api_keys WHERE name LIKE 'new %'")
        await conn.execute("UPDATE api_keys SET revoked_at = NULL WHERE revoked_at IS NOT NULL")
        await conn.execute(
            "UPDATE api_keys SET scopes = ARRAY['messages:send']"
            " WHERE scopes = ARRAY['broadcasts:send']"
        )
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
