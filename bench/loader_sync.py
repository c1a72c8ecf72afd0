"""The loader at scale: a million keys in PostgreSQL, synced into Redis.

Measures, each with the loader as a subprocess (``python -m loader sync``):

- a full sync into an empty Redis (target: at most 15 s),
- a reconcile when nothing changed (target: at most 10 s),
- a reconcile after 1% of the keys changed (revoked, re-scoped, added),
- the loader's peak RSS (target: at most 400 MB),
- Redis memory per key (INFO memory before and after the full sync).

Usage: ``.venv/bin/python -m bench.loader_sync [--keys N] [--pg DSN]``; it creates (and
drops) a database ``wacrm_bench`` next to the one *--pg* names and runs its own redis-server.

``--cluster`` runs each step once more into a fresh 3-master Redis Cluster (no replicas, on
loopback: `tests.cluster.ClusterNodes`), right after the same step into the one redis-server,
and prints the two side by side (Redis memory summed over the masters).  ``--rounds N``
repeats the three steps N times (3 with ``--cluster``, else 1), each round into fresh servers
after the last round's churn is undone, the order of the runs rotated each round; the figures
are medians over the rounds (the peak RSS the highest).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import asyncpg
from redis import Redis

from bench import pg
from demo import procs

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "deploy" / "compose" / "wacrm-schema.sql"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "wacrm_bench"
#: The masters of the Cluster that ``--cluster`` syncs into.
MASTERS = 3
STEPS = ("full sync into empty Redis:", "reconcile, nothing changed:", "reconcile, 1% changed:")


@dataclass(frozen=True, slots=True)
class Run:
    """One loader run: wall seconds, CPU seconds, peak RSS in MB and exit status."""

    seconds: float
    cpu: float
    peak_rss_mb: float
    status: int


@dataclass(frozen=True, slots=True)
class Target:
    """Where one loader syncs to: the checkout *tree*, into one redis-server or a Cluster."""

    tree: Path
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class Memory:
    """Redis memory a full sync took (used_memory, summed over the nodes), and the records."""

    used: int
    records: int
    #: The records after the churn's reconcile.
    records_after: int

    @property
    def per_key(self) -> float:
        return self.used / max(self.records, 1)


class _Servers(Protocol):
    def stop(self) -> object: ...


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
    parser.add_argument(
        "--cluster",
        action="store_true",
        help=f"also run this checkout's loader into a fresh {MASTERS}-master Redis Cluster,"
        " each step right after the one into the single Redis",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="run the steps this many times, into fresh servers (default 3 with --cluster, else 1)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.cluster else 1)
    if args.reuse:
        dsn = pg.with_database(args.pg, DATABASE)
        asyncio.run(_restore(dsn))
    else:
        dsn = asyncio.run(_fill(args.pg, args.keys, args.accounts))
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    targets = [Target(tree) for tree in trees] + ([Target(ROOT, True)] if args.cluster else [])
    runs: dict[Target, list[list[Run]]] = {t: [[] for _ in STEPS] for t in targets}
    memory: dict[Target, list[Memory]] = {t: [] for t in targets}
    for r in range(rounds):
        if r:
            asyncio.run(_restore(dsn))
        shift = r % len(targets)
        _round(dsn, args.keys, targets[shift:] + targets[:shift], runs, memory)
    if not args.keep:
        asyncio.run(pg.drop(args.pg, DATABASE))
    print(f"keys in PostgreSQL:              {args.keys:,} ({args.accounts} accounts)")
    print(f"machine load average (1 min):    {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if rounds > 1:
        print(f"rounds:                          {rounds} (medians; peak RSS: the highest)")
    for target in targets:
        mem = memory[target]
        records = _median([m.records for m in mem])
        records_after = _median([m.records_after for m in mem])
        print(f"\n{_label(target)}")
        print(
            f"records in Redis after sync:     {records:,.0f} (after churn: {records_after:,.0f})"
        )
        for label, step_runs, target_s in zip(
            STEPS, runs[target], (" (target <= 15 s)", " (target <= 10 s)", ""), strict=True
        ):
            seconds, cpu = _seconds(step_runs), _median([r.cpu for r in step_runs])
            print(f"{label:32} {seconds:6.2f} s{target_s}; loader CPU {cpu:.1f} s")
        peak = max(r.peak_rss_mb for step_runs in runs[target] for r in step_runs)
        print(f"loader peak RSS:                 {peak:.0f} MB (target <= 400 MB)")
        print(f"Redis memory per key:            {_median([m.per_key for m in mem]):.0f} bytes")
    if len(trees) > 1:
        print("\nthis tree against each other, seconds (ratio < 1: this tree is faster)")
        for tree in trees[1:]:
            ratios = "  ".join(
                f"{_seconds(a) / _seconds(b):.2f}x"
                for a, b in zip(runs[Target(ROOT)], runs[Target(tree)], strict=True)
            )
            print(f"  against {_name(tree)}: full, nothing changed, 1% changed: {ratios}")
    if args.cluster:
        _print_cluster(runs[Target(ROOT)], runs[Target(ROOT, True)], memory, rounds)
    failed = [
        f"{_label(t)}: {label} exited with {r.status}"
        for t, target_runs in runs.items()
        for label, step_runs in zip(STEPS, target_runs, strict=True)
        for r in step_runs
        if r.status != 0
    ]
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0


def _round(
    dsn: str,
    keys: int,
    targets: list[Target],
    runs: dict[Target, list[list[Run]]],
    memory: dict[Target, list[Memory]],
) -> None:
    """Run the three steps once, each target into fresh servers of its own, in *targets*' order."""
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        servers: list[_Servers] = []
        try:
            nodes: dict[Target, list[int]] = {}
            for i, target in enumerate(targets):
                (Path(tmp) / str(i)).mkdir()
                if target.cluster:
                    from tests.cluster import ClusterNodes  # the tests' helper, as the tests use it

                    cluster = ClusterNodes(Path(tmp) / str(i), masters=MASTERS, replicas=0)
                    servers.append(cluster)
                    cluster.start()
                    nodes[target] = cluster.master_ports()
                else:
                    server = procs.redis_server(Path(tmp) / str(i))
                    servers.append(server)
                    server.start()
                    nodes[target] = [server.port]
            urls = {t: f"redis://127.0.0.1:{ports[0]}/0" for t, ports in nodes.items()}
            clients = {t: [Redis(port=p) for p in ports] for t, ports in nodes.items()}
            before = {t: _used_memory(c) for t, c in clients.items()}
            used: dict[Target, int] = {}
            records: dict[Target, int] = {}
            for step in range(len(STEPS)):
                if step == 2:
                    asyncio.run(_churn(dsn, keys // 100))
                for target in targets:
                    runs[target][step].append(_loader(dsn, urls[target], target.tree))
                    if step == 0:
                        used[target] = _used_memory(clients[target]) - before[target]
                        records[target] = _records(clients[target])
            for target, nodes_clients in clients.items():
                memory[target].append(
                    Memory(used[target], records[target], _records(nodes_clients))
                )
                for client in nodes_clients:
                    client.close()
        finally:
            for s in servers:
                s.stop()


def _used_memory(clients: list[Redis]) -> int:
    """Return the used_memory of the nodes of *clients*, summed."""
    return sum(int(c.info("memory")["used_memory"]) for c in clients)


def _records(clients: list[Redis]) -> int:
    """Count the records on the nodes of *clients* (each Cluster master holds its own)."""
    return sum(sum(1 for _ in c.scan_iter("wacrm:key:*", count=10000)) for c in clients)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _seconds(step_runs: Sequence[Run]) -> float:
    return _median([r.seconds for r in step_runs])


def _label(target: Target) -> str:
    if target.cluster:
        return f"{_name(target.tree)}, into a {MASTERS}-master Redis Cluster"
    return _name(target.tree)


def _print_cluster(
    single: list[list[Run]],
    cluster: list[list[Run]],
    memory: dict[Target, list[Memory]],
    rounds: int,
) -> None:
    """Print this checkout's runs into the one redis-server and into the Cluster side by side."""
    print(
        f"\none redis-server against a {MASTERS}-master Redis Cluster, this checkout"
        f" ({f'median of {rounds} rounds' if rounds > 1 else '1 round'};"
        " x = Cluster / single; RSS: the loader's peak)"
    )
    print()
    header = (
        f"| {'step':26} | {'single s':>8} | {'Cluster s':>9} | {'x':>5} |"
        f" {'single CPU s':>12} | {'Cluster CPU s':>13} | {'x':>5} |"
        f" {'single RSS MB':>13} | {'Cluster RSS MB':>14} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for label, a, b in zip(STEPS, single, cluster, strict=True):
        a_s, b_s = _seconds(a), _seconds(b)
        a_cpu, b_cpu = _median([r.cpu for r in a]), _median([r.cpu for r in b])
        a_rss, b_rss = max(r.peak_rss_mb for r in a), max(r.peak_rss_mb for r in b)
        print(
            f"| {label.rstrip(':'):26} | {a_s:8.2f} | {b_s:9.2f} | {b_s / a_s:5.2f} |"
            f" {a_cpu:12.1f} | {b_cpu:13.1f} | {b_cpu / a_cpu:5.2f} |"
            f" {a_rss:13.0f} | {b_rss:14.0f} |"
        )
    print()
    alone, nodes = memory[Target(ROOT)], memory[Target(ROOT, True)]
    a_key, b_key = _median([m.per_key for m in alone]), _median([m.per_key for m in nodes])
    a_mb, b_mb = _median([m.used for m in alone]) / 2**20, _median([m.used for m in nodes]) / 2**20
    print(
        f"Redis memory of the full sync (used_memory, Cluster: summed over its {MASTERS} masters):"
        f" single {a_mb:.0f} MiB, {a_key:.0f} bytes a key; Cluster {b_mb:.0f} MiB,"
        f" {b_key:.0f} bytes a key ({b_key / a_key:.2f}x)"
    )


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
