"""What a Redis Cluster costs the request path: our layer against redis-py's RedisCluster, and
the sidecar's real check on one Redis against the same on a Cluster, side by side.

Run ``.venv/bin/python bench/cluster.py`` (``--quick`` for a short run, ``--help`` for the
sizes).  It starts a 3-master Redis Cluster (`tests.cluster.ClusterNodes`, no replicas) and one
plain redis-server, all on loopback and without persistence, and runs asyncio on uvloop where
it is installed, as the sidecar does.  N concurrent tasks each await one call at a time:

request path   on the Cluster, an ``EVALSHA`` of a small script reading 3 keys of one slot
               (``{h}rec``, ``{h}rl``, ``{h}mark``, *h* a random hex tag, so the calls spread
               over the slots and the masters): `sidecar.resp.RespClient.execute` with the
               key's ``slot=`` (one pipelined connection per master, the calls of one
               event-loop tick to one master in one write), then redis-py's
               ``redis.asyncio.cluster.RedisCluster`` (``from_url``, hiredis parser, its
               ``execute_command``: what ``evalsha()`` calls; a pool of connections per
               master, one per call in flight)
check          the sidecar's `sidecar.store.KeyStore.check` of random known keys (records
               written by the loader's `loader.mirror.Mirror`, the load marked complete; a
               rate limit no run reaches, so every check counts as a limited key's does): on
               the one redis-server (up to 256 checks in one EVALSHA), then on the Cluster
               (one EVALSHA per check, 3 KEYS: record, rate, the slot's loaded mark)

Connections are opened and warmed up before the clock starts.  Client CPU is this process's
CPU time (``time.process_time()``); Redis CPU is the servers' own count (INFO cpu,
used_cpu_user + used_cpu_sys), summed over the nodes the case uses.  "errors" counts the
error replies the servers sent while the clock ran (INFO errorstats: a MOVED or ASK
redirection, a NOSCRIPT, redis-py's CLIENT SETINFO on a Redis older than 7.2, ...; named by
kind under the table), "conns" the connections they accepted meanwhile (INFO stats), "bad"
the calls that failed or did not find their record.  The cases alternate in rounds (the order
rotated each round) and the tables show each figure's median over the rounds; the ratios
divide a row's figure by the first row's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import redis as redis_sync
from redis.asyncio.cluster import RedisCluster

from demo import procs
from loader.pipe import Batch
from sidecar.records import KeyRecord, Keyspace, RateLimit, body, hash_key
from sidecar.resp import RespClient
from sidecar.server import use_uvloop
from sidecar.slots import key_slot
from sidecar.store import KeyStore, Lookup
from tests.cluster import ClusterNodes

#: The request path's small script: a record and two more keys read, four values answered.
CHECK = """
local v = redis.call('GET', KEYS[1])
return {v, redis.call('EXISTS', KEYS[2]), redis.call('EXISTS', KEYS[3]), tonumber(ARGV[1])}
"""
RECORD = b"r" * 200
#: A rate limit no run reaches: every check reads the clock and writes the key's state.
RATE_LIMIT = RateLimit(1_000_000, 60_000)
PREFIX = "bench:"
#: Node ports stay below this: a Cluster node's bus listens on its port + 10000.
MAX_PORT = 55535
TIMEOUT = 30.0
MASTERS = 3

REQUEST = "request path"
CHECKS = "check"

#: Awaits the measured part of a case, timing it.
Clock = Callable[[Awaitable[int]], Awaitable[None]]
#: A case: run it for so many calls, its measured part under the clock.
Runner = Callable[[int, Clock], Awaitable[None]]


@dataclass(slots=True)
class Sample:
    """One measured run: wall s, client CPU s, Redis CPU s, the servers' error replies by kind,
    the connections they accepted, and the calls that failed or found no record (bad)."""

    wall: float
    cpu: float
    redis_cpu: float
    redis_errors: dict[str, int]
    connections: int
    bad: int


@dataclass(slots=True)
class Case:
    """One row of a table: a part, what runs, against which servers."""

    part: str
    name: str
    servers: list[redis_sync.Redis]
    run: Runner
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: 1 round, fewer calls")
    parser.add_argument("--rounds", type=int, help="rounds of every case (default 3)")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks (50)")
    parser.add_argument("--requests", type=int, help="calls per case (100,000)")
    parser.add_argument("--keys", type=int, help="known keys (hash tags) written (10,000)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    requests = args.requests or (5_000 if args.quick else 100_000)
    keys = args.keys or (1_000 if args.quick else 10_000)
    use_uvloop()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        cluster = ClusterNodes(Path(tmp) / "cluster", masters=MASTERS, replicas=0)
        (Path(tmp) / "single").mkdir()
        single: procs.Process | None = None
        admins: list[redis_sync.Redis] = []
        try:
            cluster.start()
            single = procs.redis_server(Path(tmp) / "single", _low_port())
            single.start()
            masters = [redis_sync.Redis(port=p) for p in cluster.master_ports()]
            alone = redis_sync.Redis(port=single.port)
            admins = [*masters, alone]
            cluster_url = cluster.urls[0]
            single_url = f"redis://127.0.0.1:{single.port}/0"
            calls = _request_path(masters, cluster_url, keys, rng)
            hashes = [hash_key(f"wacrm_live_bench{i}") for i in range(keys)]
            for url in (single_url, cluster_url):
                asyncio.run(_write_records(url, hashes))
            picks = [rng.choice(hashes) for _ in range(max(requests, args.tasks * 20))]
            tasks = args.tasks
            cases = [
                Case(REQUEST, "resp RespClient.execute", masters, _resp(cluster_url, calls, tasks)),
                Case(
                    REQUEST,
                    "redis.asyncio RedisCluster",
                    masters,
                    _redis_py(cluster_url, calls, tasks),
                ),
                Case(CHECKS, "one redis-server", [alone], _checks(single_url, picks, tasks)),
                Case(
                    CHECKS,
                    f"Cluster, {MASTERS} masters",
                    masters,
                    _checks(cluster_url, picks, tasks),
                ),
            ]
            for r in range(rounds):
                shift = r % len(cases)
                for case in cases[shift:] + cases[:shift]:
                    case.samples.append(_measure(case, requests))
        finally:
            for admin in admins:
                admin.close()
            if single is not None:
                single.stop()
            cluster.stop()
    _print(cases, args.tasks, requests, keys, rounds)
    return 0


def _low_port() -> int:
    """Return a free port below MAX_PORT (the kernel's free ports may lie above it)."""
    for _ in range(100):
        port = random.randint(20000, MAX_PORT)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {MAX_PORT}")


def _request_path(
    masters: list[redis_sync.Redis], url: str, keys: int, rng: random.Random
) -> list[tuple[Any, ...]]:
    """Write the request path's keys into the Cluster at *url*; return its calls."""
    sha = ""
    for admin in masters:  # a script lives on each node: load it on every master
        sha = str(admin.script_load(CHECK))
    tags = [f"{rng.getrandbits(64):016x}" for _ in range(keys)]

    async def write() -> None:
        client = RespClient(url, timeout=TIMEOUT)
        try:
            await client.connect()
            await asyncio.gather(
                *(
                    client.execute("SET", f"{{{h}}}{name}", value, slot=key_slot(f"{{{h}}}"))
                    for h in tags
                    for name, value in (("rec", RECORD), ("mark", b"1"))
                )
            )
        finally:
            await client.aclose()

    asyncio.run(write())
    slots = {key_slot(f"{{{h}}}") for h in tags}
    print(f"request path: {keys:,} hash tags over {len(slots):,} slots", flush=True)
    return [("EVALSHA", sha, 3, f"{{{h}}}rec", f"{{{h}}}rl", f"{{{h}}}mark", 60) for h in tags]


async def _write_records(url: str, hashes: list[str]) -> None:
    """Load a record for each of *hashes* into the Redis (or Cluster) at *url*, as the loader
    does, and mark the load complete."""
    # Imported here: the loader is only needed to set up.
    from loader.mirror import Mirror

    mirror = await Mirror.open(url, Keyspace(PREFIX), connect_timeout=TIMEOUT)
    try:
        await mirror.begin_load()
        version = await mirror.version()
        batch = Batch()
        for i in range(0, len(hashes), 1000):
            bodies = [(h, body(_record(h)), None) for h in hashes[i : i + 1000]]
            await mirror.put_bodies(bodies, version=version, batch=batch)
        await mirror.wait(batch)
        assert batch.applied == len(hashes), batch
        assert await mirror.mark_loaded(version)
    finally:
        await mirror.close()


def _record(key_hash: str) -> KeyRecord:
    return KeyRecord(
        key_id=f"00000000-0000-0000-0000-{key_hash[:12]}",
        account_id="11111111-2222-3333-4444-555555555555",
        account_name="Bench account",
        key_prefix="wacrm_live_" + key_hash[:8],
        scopes=("messages:send", "messages:read", "webhooks:manage"),
    )


def _measure(case: Case, n: int) -> Sample:
    """Run *case* for *n* calls in a fresh event loop; time only its measured part."""
    box: list[Sample] = []

    async def clock(body: Awaitable[int]) -> None:
        before = _redis_counts(case.servers)
        wall, cpu = time.perf_counter(), time.process_time()
        bad = await body
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = _redis_counts(case.servers)
        errors = {k: n - before.errors.get(k, 0) for k, n in after.errors.items()}
        box.append(
            Sample(
                wall,
                cpu,
                after.cpu - before.cpu,
                {k: n for k, n in errors.items() if n},
                after.connections - before.connections,
                bad,
            )
        )

    asyncio.run(asyncio.wait_for(case.run(n, clock), TIMEOUT * 20))
    return box[0]


@dataclass(slots=True)
class Counts:
    """What servers counted so far: CPU s, error replies by kind, connections accepted."""

    cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    connections: int = 0


def _redis_counts(servers: list[redis_sync.Redis]) -> Counts:
    """Return the counts of *servers* (INFO cpu, errorstats, stats), summed."""
    counts = Counts()
    for admin in servers:
        info: dict[str, Any] = admin.info("cpu")
        counts.cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        stats: dict[str, Any] = admin.info("errorstats")
        for name, value in stats.items():
            kind = name.removeprefix("errorstat_")
            counts.errors[kind] = counts.errors.get(kind, 0) + int(value["count"])
        counts.connections += int(admin.info("stats")["total_connections_received"])
    return counts


async def _in_tasks(tasks: int, n: int, call: Callable[[int], Awaitable[bool]]) -> int:
    """Run *tasks* concurrent loops awaiting ``call(i)`` for *n* calls in all, *i* running
    from 0; return how many answered False (bad)."""
    counter = iter(range(n))
    bad = [0]

    async def loop() -> None:
        for i in counter:
            if not await call(i):
                bad[0] += 1

    await asyncio.gather(*(loop() for _ in range(tasks)))
    return bad[0]


def _good(reply: Any) -> bool:
    return isinstance(reply, list) and reply[0] == RECORD


Calls = list[tuple[Any, ...]]


def _resp(url: str, calls: Calls, tasks: int) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        client = RespClient(url, timeout=TIMEOUT)
        count = len(calls)

        async def call(i: int) -> bool:
            args = calls[i % count]
            # The slot computed on every call, as redis-py does (key_slot of KEYS[1]).
            try:
                return _good(await client.execute(*args, slot=key_slot(args[3])))
            except Exception:
                return False

        try:
            await client.connect()
            assert client.cluster is not None, "RespClient did not find the Cluster"
            await _in_tasks(tasks, tasks * 20, call)  # warm up: a connection to each master
            await clock(_in_tasks(tasks, n, call))
        finally:
            await client.aclose()

    return run


def _redis_py(url: str, calls: Calls, tasks: int) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        client = RedisCluster.from_url(url)
        # execute_command: what redis-py's evalsha() calls, minus its own layer.
        execute: Callable[..., Awaitable[Any]] = client.execute_command
        count = len(calls)

        async def call(i: int) -> bool:
            try:
                return _good(await execute(*calls[i % count]))
            except Exception:
                return False

        try:
            await client.initialize()
            # The warm-up fills each master's pool: a connection for each call in flight.
            await _in_tasks(tasks, tasks * 20, call)
            await clock(_in_tasks(tasks, n, call))
        finally:
            await client.aclose()

    return run


def _checks(url: str, picks: list[str], tasks: int) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        client = RespClient(url, timeout=TIMEOUT)
        store = KeyStore(client, Keyspace(PREFIX), RATE_LIMIT)
        count = len(picks)

        async def call(i: int) -> bool:
            try:
                found = await store.check(picks[i % count])
            except Exception:
                return False
            return isinstance(found, Lookup) and found.allowed == 1

        try:
            await client.connect()
            # Warm up: connections, the script loaded (a NOSCRIPT, then EVAL) on each node.
            await _in_tasks(tasks, tasks * 20, call)
            await clock(_in_tasks(tasks, n, call))
        finally:
            await client.aclose()

    return run


def _print(cases: list[Case], tasks: int, requests: int, keys: int, rounds: int) -> None:
    loop = "uvloop" if "uvloop" in type(asyncio.get_event_loop_policy()).__module__ else "asyncio"
    server = subprocess.run(
        [procs.find_binary("redis-server"), "--version"], capture_output=True, text=True
    ).stdout.split()
    version = next((w.partition("=")[2] for w in server if w.startswith("v=")), "?")
    print()
    print(
        f"redis-server {version}, redis-py {redis_sync.__version__} (hiredis parser), {loop},"
        f" Python {platform.python_version()}; median of {rounds} round(s);"
        f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("µs = client CPU (this process) per call; Redis µs = the servers' CPU per call, summed")
    print("over the nodes; x = the row's figure over the first row's")
    titles = {
        REQUEST: (
            f"request path on a {MASTERS}-master Cluster: {tasks} tasks, {requests:,} EVALSHA"
            f" (3 KEYS of one slot, {keys:,} hash tags), one at a time each"
        ),
        CHECKS: (
            f"KeyStore.check: {tasks} tasks, {requests:,} checks of random keys among"
            f" {keys:,} known, one at a time each"
        ),
    }
    heads = {REQUEST: ("client", "kcmd/s"), CHECKS: ("Redis", "kchk/s")}
    width = max(len(c.name) for c in cases)
    for part, title in titles.items():
        first, rate = heads[part]
        header = (
            f"| {first:{width}} | {'wall s':>6} | {rate:>6} | {'µs':>5} | {'Redis µs':>8} |"
            f" {'errors':>6} | {'conns':>5} | {'bad':>3} | {'CPU x':>5} | {'Redis CPU x':>11} |"
            f" {'wall x':>6} |"
        )
        rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
        print()
        print(title)
        print()
        print(header)
        print(rule)
        rows = [c for c in cases if c.part == part]
        base = rows[0]
        for c in rows:
            wall, cpu, rcpu = c.median("wall"), c.median("cpu"), c.median("redis_cpu")
            print(
                f"| {c.name:{width}} | {wall:6.2f} | {requests / wall / 1000:6.1f} |"
                f" {cpu / requests * 1e6:5.1f} | {rcpu / requests * 1e6:8.1f} |"
                f" {_errors(c):6.0f} | {c.median('connections'):5.0f} | {c.median('bad'):3.0f} |"
                f" {cpu / base.median('cpu'):5.2f} | {rcpu / base.median('redis_cpu'):11.2f} |"
                f" {wall / base.median('wall'):6.2f} |"
            )
        for c in rows:
            kinds = _error_kinds(c)
            if kinds:
                print(f"- {c.name}: error replies while measured, all rounds: {kinds}")
    print()
    ours, theirs = (c for c in cases if c.part == REQUEST)
    cpu_x = theirs.median("cpu") / ours.median("cpu")
    print(
        f"request path: redis-py's RedisCluster spends {cpu_x:.2f}x the client CPU per command"
        f" of RespClient, at {ours.median('wall') / theirs.median('wall'):.2f}x its commands/s"
    )
    alone, cluster = (c for c in cases if c.part == CHECKS)
    print(
        f"check: on the Cluster a check costs {cluster.median('cpu') / alone.median('cpu'):.2f}x"
        f" the client CPU and {cluster.median('redis_cpu') / alone.median('redis_cpu'):.2f}x"
        f" the Redis CPU of one redis-server, at"
        f" {alone.median('wall') / cluster.median('wall'):.2f}x its checks/s"
    )


def _errors(case: Case) -> float:
    """Return the median over *case*'s rounds of the error replies the servers sent."""
    return float(statistics.median(sum(s.redis_errors.values()) for s in case.samples))


def _error_kinds(case: Case) -> str:
    """Name the kinds of error replies of all *case*'s rounds, with their counts."""
    kinds: dict[str, int] = {}
    for s in case.samples:
        for kind, n in s.redis_errors.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(kinds.items()))


if __name__ == "__main__":
    raise SystemExit(main())
