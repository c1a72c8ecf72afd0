"""How soon a revocation made with plain SQL refuses the key: PostgreSQL NOTIFY, SQLite polling.

Run ``.venv/bin/python -m bench.revocation [--trials N]``.  It starts its own redis-server,
the sidecar and, for each source in turn, ``loader run``: on a throwaway PostgreSQL database
(*--database*, by default ``wacrm_bench_revocation``, next to the one *--pg* names, with
Wacrm's schema and the shipped trigger, dropped afterwards), then on a SQLite file polled
every ``WACRM_POLL_INTERVAL`` (the loader's default unless *--poll-interval* is given).

Each trial inserts a key with plain SQL, and once the sidecar allows it, a client process
requests it back to back on *--clients* keep-alive connections to the sidecar's ``/auth``.
After a pause (20 ms plus up to one poll interval, at random) the key is revoked with a
plain SQL ``UPDATE api_keys SET revoked_at = ...``, as Wacrm's dashboard does it, and the
clock starts when that commit returns.  Two figures a trial, both from that moment, on the
machine's monotonic clock (which both processes share):

refused after        when the first 401 for the key came back
last allowed start   the latest start of any request that was still allowed (negative: every
                     request started after the commit returned was refused)

It prints p50, p99 and max of both for each source (nearest rank), the targets, and exits 1
if a key was never refused, or allowed again after a refusal.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import multiprocessing
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import asyncpg

from bench import pg
from demo import procs
from loader.settings import Settings
from loader.sqlite import format_time, schema
from sidecar.apikeys import mint

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "deploy" / "compose" / "wacrm-schema.sql"
NOTIFY = ROOT / "loader" / "wacrm-notify.sql"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "wacrm_bench_revocation"
PATH = "/api/v1/contacts"
SCOPE = "contacts:read"
#: The shortest pause between a key allowed and its revocation: requests are in flight.
PAUSE = 0.02
#: How long a trial's client goes on once every connection was refused.
LINGER = 0.02
#: The longest a key may take to be allowed, or to be refused, before the trial gives up.
GIVE_UP = 5.0

#: (p99, max) in seconds, per source: the first refusal after the commit.
TARGETS = {"PostgreSQL NOTIFY": (0.050, 0.250), "SQLite polling": (0.250, 1.0)}


@dataclass(slots=True)
class Trial:
    """What one revocation looked like from the client, in seconds after the commit returned."""

    #: When the first refusal came back; None when none came.
    refused_after: float | None
    #: The latest start of an allowed request; None when none was allowed.
    last_allowed_start: float | None
    #: Requests allowed that started after a refusal had come back.
    allowed_after_refusal: int
    #: Answers other than 200 and 401 (503, a broken connection).
    other: int
    requests: int


@dataclass(slots=True)
class Result:
    """The trials of one source."""

    source: str
    trials: list[Trial] = field(default_factory=list)

    def refused(self) -> list[float]:
        return [t.refused_after for t in self.trials if t.refused_after is not None]

    def last_allowed(self) -> list[float]:
        return [t.last_allowed_start for t in self.trials if t.last_allowed_start is not None]

    @property
    def never_refused(self) -> int:
        return sum(t.refused_after is None for t in self.trials)

    @property
    def allowed_after_refusal(self) -> int:
        return sum(t.allowed_after_refusal for t in self.trials)

    @property
    def other(self) -> int:
        return sum(t.other for t in self.trials)


class Table(Protocol):
    """The key table, written with plain SQL as Wacrm writes it."""

    async def add_key(self) -> tuple[str, str]:
        """Insert a key with scope contacts:read; return (key id, plaintext)."""
        ...

    async def revoke(self, key_id: str) -> float:
        """Revoke *key_id*; return the monotonic time at which the commit returned."""
        ...


#: A key row, the bench's way; {} is the placeholders of `_new_row`'s five values.
_INSERT = (
    "INSERT INTO api_keys (id, account_id, key_prefix, key_hash, scopes, name) VALUES ({}, 'bench')"
)


def _new_row(account_id: str, scopes: object) -> tuple[tuple[object, ...], str]:
    """Mint a key; return its row's values for `_INSERT`, and its plaintext."""
    key_id, minted = str(uuid.uuid4()), mint()
    return (key_id, account_id, minted.key_prefix, minted.key_hash, scopes), minted.plaintext


class PostgresTable:
    """Wacrm's tables in PostgreSQL, through one autocommit connection."""

    def __init__(self, conn: asyncpg.Connection, account_id: str) -> None:
        self.conn = conn
        self.account_id = account_id

    async def add_key(self) -> tuple[str, str]:
        row, plaintext = _new_row(self.account_id, [SCOPE])
        await self.conn.execute(_INSERT.format("$1, $2, $3, $4, $5"), *row)
        return str(row[0]), plaintext

    async def revoke(self, key_id: str) -> float:
        await self.conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
        return time.monotonic()


class SqliteTable:
    """The standalone key table in a SQLite file, through one autocommit connection."""

    def __init__(self, db: sqlite3.Connection, account_id: str) -> None:
        self.db = db
        self.account_id = account_id

    async def add_key(self) -> tuple[str, str]:
        row, plaintext = _new_row(self.account_id, f'["{SCOPE}"]')
        self.db.execute(_INSERT.format("?, ?, ?, ?, ?"), row)
        return str(row[0]), plaintext

    async def revoke(self, key_id: str) -> float:
        self.db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ?",
            (format_time(datetime.now(UTC)), key_id),
        )
        return time.monotonic()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trials and print the figures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="revocations a source")
    parser.add_argument("--clients", type=int, default=2, help="connections requesting the key")
    parser.add_argument(
        "--sources", default="postgresql,sqlite", help="postgresql, sqlite or both (default)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=None, help="WACRM_POLL_INTERVAL of the loader"
    )
    parser.add_argument("--pg", default=os.environ.get("WACRM_TEST_PG", DEFAULT_PG))
    parser.add_argument("--database", default=DATABASE, help="the throwaway database's name")
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if args.trials < 1 or args.clients < 1 or not set(sources) <= {"postgresql", "sqlite"}:
        parser.error("--trials and --clients must be positive; --sources: postgresql, sqlite")
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        return asyncio.run(_bench(Path(tmp), args, sources))


async def _bench(workdir: Path, args: argparse.Namespace, sources: list[str]) -> int:
    load_before = os.getloadavg()[0]
    redis_proc = procs.redis_server(workdir)
    redis_proc.start()
    redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
    # A rate limit no trial reaches: every answer is about the key, not its allowance.
    sidecar = procs.sidecar(
        workdir, redis_url=redis_url, extra_env={"WACRM_RATE_LIMIT": "1000000/1s"}
    )
    loader_env = {**os.environ, "WACRM_REDIS_URL": redis_url}
    if args.poll_interval is not None:
        loader_env["WACRM_POLL_INTERVAL"] = str(args.poll_interval)
    # The loader's poll interval, as it will read it: the trials' pauses spread over it.
    spread = Settings.from_env(loader_env).poll_interval
    client = _Client(args.clients)
    results: list[Result] = []
    try:
        sidecar.start()
        assert sidecar.port is not None
        client.start(sidecar.port)
        for source in sources:
            if source == "postgresql":
                result = await _postgres(workdir, args, loader_env, client, spread)
            else:
                result = await _sqlite(workdir, args, loader_env, client, spread)
            results.append(result)
    finally:
        client.stop()
        sidecar.stop()
        redis_proc.stop()
    _report(results, args, load_before, os.getloadavg()[0])
    bad = any(r.never_refused or r.allowed_after_refusal for r in results)
    return 1 if bad else 0


async def _postgres(
    workdir: Path, args: argparse.Namespace, env: dict[str, str], client: _Client, spread: float
) -> Result:
    dsn = await pg.recreate(
        args.pg, args.database, SCHEMA.read_text(), NOTIFY.read_text(), force=True
    )
    try:
        conn = await asyncpg.connect(dsn)
        try:
            account_id = str(uuid.uuid4())
            await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, 'Bench')", account_id)
            table = PostgresTable(conn, account_id)
            with _loader(workdir, "postgresql", {**env, "WACRM_SOURCE": dsn}):
                return await _trials("PostgreSQL NOTIFY", table, args.trials, client, spread=spread)
        finally:
            await conn.close()
    finally:
        await pg.drop(args.pg, args.database, force=True)


async def _sqlite(
    workdir: Path, args: argparse.Namespace, env: dict[str, str], client: _Client, spread: float
) -> Result:
    path = workdir / "keys.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(schema())
        account_id = str(uuid.uuid4())
        db.execute("INSERT INTO accounts (id, name) VALUES (?, 'Bench')", (account_id,))
        table = SqliteTable(db, account_id)
        with _loader(workdir, "sqlite", {**env, "WACRM_SOURCE": f"sqlite:///{path}"}):
            return await _trials("SQLite polling", table, args.trials, client, spread=spread)
    finally:
        db.close()


class _loader:
    """Run ``loader run`` for the body of a ``with``; stop it cleanly, freeing its lock."""

    def __init__(self, workdir: Path, name: str, env: dict[str, str]) -> None:
        self.process = procs.Process(
            [sys.executable, "-m", "loader", "run"],
            port=0,
            log=workdir / f"loader-{name}.log",
            env=env,
        )

    def __enter__(self) -> procs.Process:
        self.process.start_background()
        return self.process

    def __exit__(self, *_: object) -> None:
        self.process.stop()


async def _trials(
    name: str, table: Table, trials: int, client: _Client, *, spread: float
) -> Result:
    result = Result(name)
    for _ in range(trials):
        key_id, key = await table.add_key()
        await asyncio.to_thread(client.begin, key)
        # A random pause, so that the commit falls anywhere in the loader's poll interval
        # (the key was first allowed just after a poll: a fixed pause would lock on to it).
        await asyncio.sleep(random.uniform(PAUSE, PAUSE + spread))
        committed = await table.revoke(key_id)
        samples = await asyncio.to_thread(client.end)
        result.trials.append(_judge(samples, committed))
    return result


def _judge(samples: list[tuple[float, float, int]], committed: float) -> Trial:
    """Return the figures of one trial from its (start, end, status) samples."""
    refusals = [end for _, end, status in samples if status == 401]
    first = min(refusals) if refusals else None
    allowed = [start for start, _, status in samples if status == 200]
    return Trial(
        refused_after=None if first is None else first - committed,
        last_allowed_start=max(allowed) - committed if allowed else None,
        allowed_after_refusal=0 if first is None else sum(s > first for s in allowed),
        other=sum(status not in (200, 401) for _, _, status in samples),
        requests=len(samples),
    )


class _Client:
    """The client loop, in a process of its own so that it never waits for ours."""

    def __init__(self, connections: int) -> None:
        self.connections = connections
        self._pipe: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self, port: int) -> None:
        ours, theirs = multiprocessing.Pipe()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_client_main, args=(theirs, port, self.connections), daemon=True
        )
        self._process.start()
        self._pipe = ours

    def begin(self, key: str) -> None:
        """Wait until *key* is allowed, then have every connection request it back to back."""
        assert self._pipe is not None
        self._pipe.send(key)
        if self._pipe.recv() != "ready":
            raise RuntimeError(f"the key was not allowed within {GIVE_UP} s")

    def end(self) -> list[tuple[float, float, int]]:
        """Return the samples once every connection was refused (or gave up)."""
        assert self._pipe is not None
        samples: list[tuple[float, float, int]] = self._pipe.recv()
        return samples

    def stop(self) -> None:
        if self._pipe is not None:
            self._pipe.send(None)
        if self._process is not None:
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()


def _client_main(pipe: Connection, port: int, connections: int) -> None:
    headers = {
        "Authorization": "",
        "X-Original-Method": "GET",
        "X-Original-URI": PATH,
    }
    conns = [
        http.client.HTTPConnection("127.0.0.1", port, timeout=GIVE_UP) for _ in range(connections)
    ]
    while (key := pipe.recv()) is not None:
        headers["Authorization"] = f"Bearer {key}"
        deadline = time.monotonic() + GIVE_UP
        while _ask(conns[0], headers) != 200:
            if time.monotonic() > deadline:
                pipe.send("not allowed")
                break
            time.sleep(0.002)
        else:
            pipe.send("ready")
            pipe.send(_hammer(conns, headers))


def _hammer(
    conns: list[http.client.HTTPConnection], headers: dict[str, str]
) -> list[tuple[float, float, int]]:
    """Request on every connection until each was refused, then LINGER on; return samples."""
    lists: list[list[tuple[float, float, int]]] = [[] for _ in conns]
    deadline = time.monotonic() + GIVE_UP

    def loop(conn: http.client.HTTPConnection, out: list[tuple[float, float, int]]) -> None:
        refused_at = math.inf
        while True:
            started = time.monotonic()
            if started > min(deadline, refused_at + LINGER):
                return
            status = _ask(conn, headers)
            ended = time.monotonic()
            out.append((started, ended, status))
            if status == 401 and refused_at == math.inf:
                refused_at = ended

    threads = [
        threading.Thread(target=loop, args=(c, out)) for c, out in zip(conns, lists, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for out in lists for s in out]


def _ask(conn: http.client.HTTPConnection, headers: dict[str, str]) -> int:
    """Send one check on *conn*; return its status (0 for a broken connection)."""
    try:
        conn.request("GET", "/auth", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0


def _report(results: list[Result], args: argparse.Namespace, before: float, after: float) -> None:
    poll = f"{args.poll_interval} s" if args.poll_interval else "the loader's default"
    print(
        f"revocation by plain SQL: {args.trials} trials a source, {args.clients} connections to"
        f" the sidecar's /auth, SQLite poll interval {poll}; load average {before:.2f} before,"
        f" {after:.2f} after, on {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| source | trials | refused after: p50 ms | p99 ms | max ms"
        " | last allowed start: p50 ms | p99 ms | max ms | requests |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        requests = sum(t.requests for t in r.trials)
        print(
            f"| {r.source} | {len(r.trials)} | {_figures(r.refused())}"
            f" | {_figures(r.last_allowed())} | {requests:,} |"
        )
    print()
    for r in results:
        p99_target, max_target = TARGETS[r.source]
        refused = r.refused()
        if refused and not r.never_refused:
            p99, top = _rank(refused, 0.99), max(refused)
            met = p99 < p99_target and top < max_target
            verdict = (
                f"p99 {p99 * 1000:.1f} ms (target < {p99_target * 1000:.0f} ms),"
                f" max {top * 1000:.1f} ms (target < {max_target * 1000:.0f} ms):"
                f" {'met' if met else 'MISSED'}"
            )
        else:
            verdict = "MISSED: a key was never refused"
        print(f"- {r.source}: {verdict}")
        print(
            f"  never refused: {r.never_refused}; allowed after a refusal:"
            f" {r.allowed_after_refusal}; other answers: {r.other}"
        )


def _figures(values: list[float]) -> str:
    if not values:
        return "- | - | -"
    return " | ".join(
        f"{v * 1000:.1f}" for v in (_rank(values, 0.5), _rank(values, 0.99), max(values))
    )


def _rank(values: list[float], q: float) -> float:
    """Return the *q* quantile of *values* by nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


if __name__ == "__main__":
    sys.exit(main())
