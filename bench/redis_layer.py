"""The hand-written Redis layer (`sidecar.resp`) against redis-py with hiredis, side by side.

Run ``.venv/bin/python bench/redis_layer.py`` (``--quick`` for a short run, ``--help`` for the
sizes).  It starts its own redis-server (no persistence, TCP on a free port and a Unix socket)
and runs asyncio on uvloop where it is installed, as the sidecar does.  Two shapes:

request path   N concurrent tasks, each awaiting one command at a time in a loop, a ``GET`` of
               a 200-byte record or an ``EVALSHA`` of a small script with 3 KEYS and 1 ARGV
               (the sidecar's check is one script call): `sidecar.resp.RespClient.execute`
               (one connection; the commands of one event-loop tick go in one write), then
               ``redis.asyncio.Redis`` with its default pool (a connection per task in
               flight), then with ``single_connection_client=True`` (one connection, one
               command in flight at a time, behind its lock)
loader         a stream of ``EVALSHA`` versioned writes (2 KEYS, 3 ARGV) in chunks of 1000:
               ``loader.pipe.Pipe.send`` of chunks packed by `sidecar.resp.encode_command`,
               then ``Pipe.wait``; redis-py's ``pipeline(transaction=False)`` with ``execute()``
               per chunk, one chunk after the other, and from a few concurrent tasks

Each case runs over TCP and over the Unix socket.  Connections are opened and warmed up before
the clock starts; the clock covers building the commands, sending them and taking the replies.
Client CPU is this process's CPU time (``time.process_time()``); Redis CPU is the server's own
count (INFO cpu), so a case that costs Redis more shows it.  The cases alternate in rounds (the
order rotated each round) and the table shows each figure's median over the rounds; the ratios
divide a row's figure by the hand-written layer's, same command and transport.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
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
import redis.asyncio as aredis

from demo import procs
from loader.pipe import Batch, Pipe
from sidecar.resp import RespClient, encode_command
from sidecar.server import use_uvloop

#: The request path's small script: a record and two more keys read, four values answered.
CHECK = """
local v = redis.call('GET', KEYS[1])
return {v, redis.call('EXISTS', KEYS[2]), redis.call('EXISTS', KEYS[3]), tonumber(ARGV[1])}
"""
#: The loader's trivial versioned write: a record and its version, unless told to keep out.
PUT = """
if ARGV[3] == '0' then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""
RECORD = b"r" * 200
CHECK_KEYS = ("bench:record", "bench:rate", "bench:loaded")
CHUNK = 1000
#: How many tasks run pipelines at once in redis-py's concurrent loader case.
PIPELINES = 4
TIMEOUT = 30.0

#: Awaits the measured part of a case, timing it.
Clock = Callable[[Awaitable[None]], Awaitable[None]]
#: A case: run it for so many commands, its measured part under the clock.
Runner = Callable[[int, Clock], Awaitable[None]]


@dataclass(slots=True)
class Sample:
    """One measured run: wall seconds, client CPU seconds, Redis CPU seconds."""

    wall: float
    cpu: float
    redis_cpu: float


@dataclass(slots=True)
class Case:
    """One row of the table: a shape, a command, a client and a transport."""

    shape: str
    command: str
    client: str
    transport: str
    run: Runner
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: 1 round, fewer commands")
    parser.add_argument("--rounds", type=int, help="rounds of every case (default 3)")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks, request path")
    parser.add_argument("--requests", type=int, help="commands per request-path case (100,000)")
    parser.add_argument("--writes", type=int, help="writes per loader case (200,000)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    requests = args.requests or (10_000 if args.quick else 100_000)
    writes = args.writes or (20_000 if args.quick else 200_000)
    use_uvloop()
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        sock = Path(tmp) / "redis.sock"
        server = procs.redis_server(Path(tmp), unix_socket=sock)
        server.start()
        try:
            admin = redis_sync.Redis(port=server.port)
            urls = {"tcp": f"redis://127.0.0.1:{server.port}/0", "unix": f"unix://{sock}"}
            cases = _cases(admin, urls, args.tasks, writes)
            sizes = {"request path": requests, "loader": writes}
            for r in range(rounds):
                shift = r % len(cases)
                for case in cases[shift:] + cases[:shift]:
                    case.samples.append(_measure(admin, case, sizes[case.shape]))
            admin.close()
        finally:
            server.stop()
    _print(cases, args.tasks, requests, writes, rounds)
    return 0


def _cases(admin: redis_sync.Redis, urls: dict[str, str], tasks: int, writes: int) -> list[Case]:
    admin.set(CHECK_KEYS[0], RECORD)
    admin.set(CHECK_KEYS[2], 1)
    check_sha = str(admin.script_load(CHECK))
    put_sha = str(admin.script_load(PUT))
    get_args: tuple[Any, ...] = ("GET", CHECK_KEYS[0])
    check_args: tuple[Any, ...] = ("EVALSHA", check_sha, 3, *CHECK_KEYS, 60)
    # The loader's writes, built once for all its cases: (record key, version key, 3 ARGV).
    puts = [
        (f"bench:key:{i:064x}", f"bench:ver:{i:064x}", b"v%d" % i + RECORD, 1_700_000_000 + i, 1)
        for i in range(writes)
    ]
    cases = []
    for transport, url in urls.items():
        for command, call in (("GET", get_args), ("EVALSHA", check_args)):
            for client, requests in (
                ("resp RespClient.execute", _resp_requests),
                ("redis.asyncio, pool", _redis_requests),
                ("redis.asyncio, 1 conn", _redis_single_requests),
            ):
                run = requests(url, tasks, call)
                cases.append(Case("request path", command, client, transport, run))
        for client, writes_ in (
            ("resp Pipe.send", _pipe_writes),
            ("redis-py pipelines, 1 by 1", _redis_writes(1)),
            (f"redis-py pipelines, {PIPELINES} at once", _redis_writes(PIPELINES)),
        ):
            run = writes_(url, put_sha, puts)
            cases.append(Case("loader", "EVALSHA", client, transport, run))
    return cases


def _measure(admin: redis_sync.Redis, case: Case, n: int) -> Sample:
    """Run *case* for *n* commands in a fresh event loop; time only its measured part."""
    box: list[Sample] = []

    async def clock(body: Awaitable[None]) -> None:
        redis_before = _redis_cpu(admin)
        wall, cpu = time.perf_counter(), time.process_time()
        await body
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        box.append(Sample(wall, cpu, _redis_cpu(admin) - redis_before))

    asyncio.run(asyncio.wait_for(case.run(n, clock), TIMEOUT * 10))
    return box[0]


def _redis_cpu(admin: redis_sync.Redis) -> float:
    info: dict[str, Any] = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _in_tasks(tasks: int, n: int, call: Callable[[], Awaitable[Any]]) -> Awaitable[None]:
    """Return the awaitable of *tasks* concurrent loops awaiting *call* for *n* calls in all."""

    async def loop(count: int) -> None:
        for _ in range(count):
            await call()

    async def all_loops() -> None:
        share, extra = divmod(n, tasks)
        await asyncio.gather(*(loop(share + (i < extra)) for i in range(tasks)))

    return all_loops()


def _resp_requests(url: str, tasks: int, args: tuple[Any, ...]) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        client = RespClient(url, timeout=TIMEOUT)
        try:
            await _in_tasks(tasks, tasks * 20, lambda: client.execute(*args))  # warm up
            await clock(_in_tasks(tasks, n, lambda: client.execute(*args)))
            assert await client.execute(*args) is not None
        finally:
            await client.aclose()

    return run


def _redis_requests(url: str, tasks: int, args: tuple[Any, ...]) -> Runner:
    return _redis_client_requests(url, tasks, args, single=False)


def _redis_single_requests(url: str, tasks: int, args: tuple[Any, ...]) -> Runner:
    return _redis_client_requests(url, tasks, args, single=True)


def _redis_client_requests(url: str, tasks: int, args: tuple[Any, ...], *, single: bool) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        client = aredis.Redis.from_url(url, single_connection_client=single)
        # execute_command: what redis-py's get() and evalsha() call, minus their own layer.
        execute: Callable[..., Awaitable[Any]] = client.execute_command
        try:
            # The warm-up fills the pool: a connection for each task in flight.
            await _in_tasks(tasks, tasks * 20, lambda: execute(*args))
            await clock(_in_tasks(tasks, n, lambda: execute(*args)))
            assert await execute(*args) is not None
        finally:
            await client.aclose()

    return run


Puts = list[tuple[str, str, bytes, int, int]]


def _pipe_writes(url: str, sha: str, puts: Puts) -> Runner:
    async def run(n: int, clock: Clock) -> None:
        pipe = await Pipe.open(url, connect_timeout=TIMEOUT)
        try:
            await pipe.call("PING")

            async def stream() -> None:
                batch = Batch()
                for i in range(0, n, CHUNK):
                    chunk = puts[i : min(i + CHUNK, n)]
                    data = b"".join([encode_command(("EVALSHA", sha, 2, *put)) for put in chunk])
                    await pipe.send(data, len(chunk), batch)
                await pipe.wait(batch)
                assert batch.applied == n and not batch.errors, batch

            await clock(stream())
        finally:
            await pipe.close()

    return run


def _redis_writes(concurrent: int) -> Callable[[str, str, Puts], Runner]:
    def make(url: str, sha: str, puts: Puts) -> Runner:
        async def run(n: int, clock: Clock) -> None:
            client = aredis.Redis.from_url(url)
            try:
                await asyncio.gather(*(client.ping() for _ in range(concurrent)))
                starts = iter(range(0, n, CHUNK))
                applied = [0]

                async def worker() -> None:
                    for i in starts:
                        pipe = client.pipeline(transaction=False)
                        for put in puts[i : min(i + CHUNK, n)]:
                            pipe.evalsha(sha, 2, *put)
                        replies = await pipe.execute()
                        applied[0] += replies.count(1)

                async def stream() -> None:
                    await asyncio.gather(*(worker() for _ in range(concurrent)))
                    assert applied[0] == n, applied

                await clock(stream())
            finally:
                await client.aclose()

        return run

    return make


def _print(cases: list[Case], tasks: int, requests: int, writes: int, rounds: int) -> None:
    loop = "uvloop" if "uvloop" in type(asyncio.get_event_loop_policy()).__module__ else "asyncio"
    print(
        f"redis-py {redis_sync.__version__} (hiredis parser), {loop}, Python"
        f" {platform.python_version()}; median of {rounds} round(s);"
        f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("µs = client CPU (this process) per command; Redis µs = the server's CPU per command;")
    print("x resp = the row's figure over the hand-written layer's (same command, transport)")
    titles = {
        "request path": f"request path: {tasks} tasks, {requests:,} commands, one at a time each",
        "loader": f"loader: {writes:,} EVALSHA writes (2 KEYS, 3 ARGV), chunks of {CHUNK:,}",
    }
    header = (
        f"| {'command':7} | {'client':33} | {'via':4} | {'wall s':>6} | {'kcmd/s':>6} |"
        f" {'µs':>5} | {'Redis µs':>8} | {'CPU x resp':>10} | {'wall x resp':>11} |"
    )
    rule = "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"
    for shape, title in titles.items():
        print()
        print(title)
        print()
        print(header)
        print(rule)
        rows = [c for c in cases if c.shape == shape]
        rows.sort(key=lambda c: (c.command != "GET", c.transport))
        for c in rows:
            n = requests if shape == "request path" else writes
            base = next(
                b
                for b in rows
                if b.command == c.command and b.transport == c.transport and "resp" in b.client
            )
            wall, cpu, rcpu = c.median("wall"), c.median("cpu"), c.median("redis_cpu")
            print(
                f"| {c.command:7} | {c.client:33} | {c.transport:4} | {wall:6.2f} |"
                f" {n / wall / 1000:6.1f} | {cpu / n * 1e6:5.1f} | {rcpu / n * 1e6:8.1f} |"
                f" {cpu / base.median('cpu'):10.2f} | {wall / base.median('wall'):11.2f} |"
            )
    print()
    for transport in sorted({c.transport for c in cases}):
        loads = [c for c in cases if c.shape == "loader" and c.transport == transport]
        resp = next(c for c in loads if "resp" in c.client)
        best = min((c for c in loads if c is not resp), key=lambda c: c.median("wall"))
        print(
            f"loader, {transport}: redis-py's fastest, {best.client!r}, takes"
            f" {best.median('wall') / resp.median('wall'):.2f}x the wall time and"
            f" {best.median('cpu') / resp.median('cpu'):.2f}x the client CPU of Pipe.send"
        )


if __name__ == "__main__":
    raise SystemExit(main())
