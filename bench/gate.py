"""Benchmark the gate through real nginx and Redis with wrk, next to its ceiling and floor.

Run ``.venv/bin/python bench/gate.py --help``.  Eleven cases (thirteen with ``--cluster``),
each through nginx with one worker; wrk always reaches nginx over TCP, and nginx reaches the
auth app over TCP (127.0.0.1) or, where a case says "Unix socket", over a Unix socket
(``server unix:...``):

ceiling        nginx proxies to the upstream, no auth at all
floor          nginx ``auth_request`` to an aiohttp handler that returns 200 (bench/floor.py):
               the yardstick, in a `web.Application` as aiohttp apps usually are
floor, low     the same handler on aiohttp's low-level server, as the sidecar is served: the
               least any aiohttp auth service costs; over TCP, and over a Unix socket
floor + GET    the same handler awaiting one Redis GET through the sidecar's Redis client
               first: what one round trip to Redis costs by itself, with no checks at all
gate, valid    the real sidecar, a real key in Redis, identity injected upstream; over TCP,
               and over a Unix socket (WACRM_LISTEN) with Redis over its Unix socket too
gate, 1,000    the same with 1,000 valid keys in turn, so each check in a batch is another key
gate, Cluster  with ``--cluster``, "gate, valid key" and "gate, 1,000 valid keys" again through
               another sidecar over TCP, pointed (WACRM_REDIS_URL) at one node of a 3-master
               Redis Cluster on loopback (`tests.cluster.ClusterNodes`, no replicas) that holds
               the same keys, written by the loader's `loader.mirror.Mirror`: each check goes
               over TCP to the master of its key's slot; Redis CPU is summed over the nodes
gate, unknown  well-formed random keys from a pool of 10,000, each a Redis miss
gate, garbage  Authorization values that fail the format check
OpenResty      the reference: no sidecar, the key checked in nginx by Lua (bench/lua/check.lua:
               SHA-256, one GET over a pooled cosocket to Redis's Unix socket); it checks no
               scope, rate limit or expiry.  Needs nginx's Lua module: missing Debian packages
               are installed (``--lua install``, as root), or the row is skipped with the reason

Below the table, the two targets of the Unix socket: the gate over Unix against the low-level
floor over TCP (1.0x), and against the low-level floor over Unix (0.8x); with ``--cluster``,
what the Cluster costs: each Cluster case against the same case on the one redis-server.

Each ``--tree PATH`` adds a case: the valid key through the sidecar of another checkout (a git
worktree of an older commit, say), with its own nginx, so two versions meet in one run; and,
if that sidecar has WACRM_LISTEN, the same over a Unix socket.

The cases alternate in rounds (the order rotated each round) so drift hits them alike; the
table shows each case's median round.  ``--soak S`` instead runs the valid-key case under load
for S seconds and samples the sidecar's RSS every 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import redis as redis_sync

from bench import stack, wrk
from demo import procs
from sidecar import apikeys, records

if TYPE_CHECKING:
    from tests.cluster import ClusterNodes

ACCOUNT_ID = "7a1d6c1e-0000-4000-8000-000000000001"
KEY_ID = "5b0e9f7c-0000-4000-8000-000000000002"
UNKNOWN_POOL = 10_000
VALID_POOL = 1_000
SAMPLE_EVERY = 10.0
UNIX_GATE = "gate, valid key, Unix socket"
UNIX_LOW_FLOOR = "floor, low-level server, Unix socket"
OPENRESTY = "OpenResty/Lua in nginx, valid key (reference)"
CLUSTER = ", Cluster"
#: The masters of the ``--cluster`` cases' Redis Cluster (no replicas).
CLUSTER_MASTERS = 3
CLUSTER_TIMEOUT = 30.0
GARBAGE = (
    "Bearer not-a-wacrm-key",
    "Basic dXNlcjpwYXNzd29yZA==",
    "Bearer wacrm_live_tooshort",
    "wacrm_test_" + "A" * 43,
)


@dataclass(slots=True)
class Case:
    """One row of the table: where wrk sends what, and the status every response must have."""

    name: str
    port: int
    expected: int
    authorizations: Sequence[str]
    #: The processes (with their descendants) whose CPU time is charged to this case.
    auth_roots: list[int]
    nginx_roots: list[int]
    script: Path | None = None
    #: The Redis servers whose CPU time is charged to it: None for the one redis-server.
    redis_pids: list[int] | None = None
    runs: list[wrk.Result] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    #: Whether nginx reaches the auth app over a Unix socket.
    unix: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{stack.PATH}"

    def median(self) -> wrk.Result:
        """Return the run with the median rate."""
        return sorted(self.runs, key=lambda r: r.rate)[(len(self.runs) - 1) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its markdown table; return the exit status."""
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="wacrm-bench-") as tmp:
        return Bench(Path(tmp), args).run()


class Bench:
    """The servers of one benchmark run and the cases measured through them."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.notes: list[str] = []
        self.started: list[procs.Process] = []
        self.cases = 0
        self.trees = 0
        self.sockets = workdir
        self.cluster: ClusterNodes | None = None

    def run(self) -> int:
        try:
            cases = self._start()
            if self.args.soak:
                self._soak(next(c for c in cases if c.name == "gate, valid key"))
            else:
                self._measure(cases)
        finally:
            for p in reversed(self.started):
                p.stop()
            if self.cluster is not None:
                self.cluster.stop()
            if self.sockets != self.workdir:
                shutil.rmtree(self.sockets, ignore_errors=True)
        return 0

    def _start(self) -> list[Case]:
        a = self.args
        # nginx started as root runs its workers as nobody: they must reach the sockets.
        self.workdir.chmod(0o711)
        self.sockets = procs.socket_folder(self.workdir)
        redis_socket = self.sockets / "redis.sock"
        # Open to nginx's workers too, for the OpenResty row; in a folder only we can list.
        redis = procs.redis_server(self.workdir, unix_socket=redis_socket, unix_socket_mode=0o777)
        self._spawn(redis)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        minted = mint_keys(1 + VALID_POOL)
        key, *many = put_keys(redis_url, minted)
        unix_redis_url = f"unix://{redis_socket}?db=0"
        if a.redis_socket:  # the TCP sidecar and "floor + GET" talk to Redis through it too
            redis_url = unix_redis_url

        sidecar_help = _sidecar_help()
        workers = a.workers
        if workers > 1 and "WACRM_WORKERS" not in sidecar_help:
            self.notes.append(
                f"**Note:** `--workers {workers}` asked for, but this sidecar does not accept"
                " WACRM_WORKERS yet (not in `python -m sidecar --help`): ran 1 worker."
            )
            workers = 1
        self.workers = workers
        env = {"PYTHONPATH": str(procs.ROOT)}
        sidecar_env = dict(env)
        if workers > 1:
            sidecar_env["WACRM_WORKERS"] = str(workers)
        self.rate_limit = None
        if "WACRM_RATE_LIMIT" in sidecar_help and a.rate_limit:
            # The valid key must be admitted on every request, with the limiter still run.
            sidecar_env["WACRM_RATE_LIMIT"] = self.rate_limit = a.rate_limit
        sidecar = procs.sidecar(self.workdir, redis_url=redis_url, extra_env=sidecar_env)
        self._spawn(sidecar)
        self.sidecar = sidecar
        # The same sidecar on a Unix socket, reaching Redis through its Unix socket.
        unix_sidecar = procs.sidecar(
            self.workdir,
            redis_url=unix_redis_url,
            extra_env=sidecar_env,
            unix_socket=self.sockets / "sidecar.sock",
        )
        self._spawn(unix_sidecar)

        floors = self._floors(workers, env)
        low_floors = self._floors(workers, env, low_level=True)
        low_unix_floor = self._unix_floor(workers, env)
        get_floors = self._floors(workers, env, redis_url=redis_url)

        gate_ports = stack.NginxPorts(
            procs.free_port(), sidecar.port, procs.free_port(), procs.free_port()
        )
        floor_ports = stack.NginxPorts(procs.free_port(), floors[0].port, procs.free_port())
        low_ports = stack.NginxPorts(procs.free_port(), low_floors[0].port, procs.free_port())
        get_ports = stack.NginxPorts(procs.free_port(), get_floors[0].port, procs.free_port())
        unix_ports = stack.NginxPorts(
            procs.free_port(), 0, procs.free_port(), auth_socket=unix_sidecar.unix_socket
        )
        low_unix_ports = stack.NginxPorts(
            procs.free_port(), 0, procs.free_port(), auth_socket=low_unix_floor.unix_socket
        )
        gate_nginx = stack.nginx(self.workdir / "nginx-gate", gate_ports)
        floor_nginx = stack.nginx(self.workdir / "nginx-floor", floor_ports)
        low_nginx = stack.nginx(self.workdir / "nginx-floor-low", low_ports)
        get_nginx = stack.nginx(self.workdir / "nginx-floor-get", get_ports)
        unix_nginx = stack.nginx(self.workdir / "nginx-gate-unix", unix_ports)
        low_unix_nginx = stack.nginx(self.workdir / "nginx-floor-low-unix", low_unix_ports)
        for n in (gate_nginx, floor_nginx, low_nginx, get_nginx, unix_nginx, low_unix_nginx):
            self._spawn(n)
        cluster_cases = self._cluster_cases(minted, sidecar_env) if a.cluster else []
        if workers > 1:
            time.sleep(1.0)  # let every worker listen before nginx opens its keepalive pool

        self.redis_pids = [_pid(redis)]
        sidecar_pids = [_pid(sidecar)]
        floor_pids = [_pid(f) for f in floors]
        low_pids = [_pid(f) for f in low_floors]
        get_pids = [_pid(f) for f in get_floors]
        gate_nginx_pids = [_pid(gate_nginx)]
        floor_nginx_pids = [_pid(floor_nginx)]
        low_nginx_pids = [_pid(low_nginx)]
        get_nginx_pids = [_pid(get_nginx)]
        bearer = f"Bearer {key}"
        valid_many = [f"Bearer {k}" for k in many]
        unknown = [f"Bearer {apikeys.mint().plaintext}" for _ in range(UNKNOWN_POOL)]
        assert gate_ports.ceiling is not None
        cases = [
            Case("ceiling (no auth)", gate_ports.ceiling, 200, [bearer], [], gate_nginx_pids),
            Case("floor (200-only aiohttp)", floor_ports.listen, 200, [bearer], floor_pids,
                 floor_nginx_pids),
            Case("floor, low-level server", low_ports.listen, 200, [bearer], low_pids,
                 low_nginx_pids),
            Case(UNIX_LOW_FLOOR, low_unix_ports.listen, 200, [bearer], [_pid(low_unix_floor)],
                 [_pid(low_unix_nginx)], unix=True),
            Case("floor + one Redis GET", get_ports.listen, 200, [bearer], get_pids,
                 get_nginx_pids),
            Case("gate, valid key", gate_ports.listen, 200, [bearer], sidecar_pids,
                 gate_nginx_pids),
            Case(UNIX_GATE, unix_ports.listen, 200, [bearer], [_pid(unix_sidecar)],
                 [_pid(unix_nginx)], unix=True),
            Case(f"gate, {VALID_POOL:,} valid keys", gate_ports.listen, 200, valid_many,
                 sidecar_pids, gate_nginx_pids),
            Case("gate, unknown keys", gate_ports.listen, 401, unknown, sidecar_pids,
                 gate_nginx_pids),
            Case("gate, garbage", gate_ports.listen, 401, GARBAGE, sidecar_pids,
                 gate_nginx_pids),
        ]  # fmt: skip
        lua = self._openresty(redis_socket, bearer)
        if lua is not None:
            cases.append(lua)
        if cluster_cases:  # side by side with the same cases on the one redis-server
            at = next(
                i for i, c in enumerate(cases) if c.name == f"gate, {VALID_POOL:,} valid keys"
            )
            cases[at + 1 : at + 1] = cluster_cases
        for tree in a.tree:
            cases += self._other_tree(tree, redis_url, unix_redis_url, sidecar_env, bearer)
        for i, case in enumerate(cases):
            case.script = wrk.write_script(
                self.workdir,
                f"case{i}",
                path=stack.PATH,
                authorizations=case.authorizations,
                expected=case.expected,
            )
            _preflight(case, account_id=ACCOUNT_ID if "valid" in case.name else None)
        self.cases = len(cases)
        return cases

    def _cluster_cases(
        self,
        minted: Sequence[tuple[apikeys.MintedKey, records.KeyRecord]],
        env: dict[str, str],
    ) -> list[Case]:
        """Start a Redis Cluster holding the keys *minted*, and a sidecar on it behind an nginx
        of its own; return the valid-key cases through them."""
        # Imported here: only --cluster needs the tests' Cluster.
        from tests.cluster import ClusterNodes

        self.cluster = ClusterNodes(self.workdir / "cluster", masters=CLUSTER_MASTERS)
        self.cluster.start()
        url = self.cluster.urls[0]  # any node: the sidecar finds the Cluster itself
        asyncio.run(put_cluster_keys(url, minted))
        sidecar = procs.sidecar(self.workdir, redis_url=url, extra_env=env)
        self._spawn(sidecar)
        ports = stack.NginxPorts(procs.free_port(), sidecar.port, procs.free_port())
        nginx = stack.nginx(self.workdir / "nginx-gate-cluster", ports)
        self._spawn(nginx)
        nodes = [_pid(n) for n in self.cluster.nodes]
        auth, proxy = [_pid(sidecar)], [_pid(nginx)]
        bearer, *valid_many = [f"Bearer {m.plaintext}" for m, _ in minted]
        return [
            Case(f"gate, valid key{CLUSTER}", ports.listen, 200, [bearer], auth, proxy,
                 redis_pids=nodes),
            Case(f"gate, {VALID_POOL:,} valid keys{CLUSTER}", ports.listen, 200, valid_many,
                 auth, proxy, redis_pids=nodes),
        ]  # fmt: skip

    def _other_tree(
        self, tree: Path, redis_url: str, unix_redis_url: str, env: dict[str, str], bearer: str
    ) -> list[Case]:
        """Start the sidecar of the checkout *tree*, behind an nginx of its own; and, if it
        has WACRM_LISTEN, another on a Unix socket (older trees serve TCP only)."""
        sidecar = procs.sidecar(self.workdir, redis_url=redis_url, extra_env=env, tree=tree)
        self._spawn(sidecar)
        ports = stack.NginxPorts(procs.free_port(), sidecar.port, procs.free_port())
        nginx = stack.nginx(self.workdir / f"nginx-{sidecar.port}", ports)
        self._spawn(nginx)
        cases = [
            Case(
                f"gate, valid key, {tree}",
                ports.listen,
                200,
                [bearer],
                [_pid(sidecar)],
                [_pid(nginx)],
            )
        ]
        if "WACRM_LISTEN" not in _sidecar_help(tree):
            return cases
        self.trees += 1
        unix = procs.sidecar(
            self.workdir,
            redis_url=unix_redis_url,
            extra_env=env,
            tree=tree,
            unix_socket=self.sockets / f"sidecar-tree{self.trees}.sock",
        )
        self._spawn(unix)
        ports = stack.NginxPorts(
            procs.free_port(), 0, procs.free_port(), auth_socket=unix.unix_socket
        )
        nginx = stack.nginx(self.workdir / f"nginx-tree{self.trees}-unix", ports)
        self._spawn(nginx)
        cases.append(
            Case(
                f"{UNIX_GATE}, {tree}",
                ports.listen,
                200,
                [bearer],
                [_pid(unix)],
                [_pid(nginx)],
                unix=True,
            )
        )
        return cases

    def _openresty(self, redis_socket: Path, bearer: str) -> Case | None:
        """Start the OpenResty reference: nginx checking the key in Lua; None if it cannot."""
        if self.args.lua == "off":
            return None
        reason = stack.lua_unavailable(install=self.args.lua == "install")
        if reason is not None:
            self.notes.append(f"**Note:** the {OPENRESTY} row was skipped: {reason}.")
            print(f"bench: skipping the {OPENRESTY} row: {reason}", file=sys.stderr)
            return None
        nginx = stack.lua_nginx(
            self.workdir / "nginx-openresty",
            listen=procs.free_port(),
            upstream=procs.free_port(),
            redis_socket=redis_socket,
            prefix=records.DEFAULT_PREFIX,
        )
        self._spawn(nginx)
        return Case(OPENRESTY, nginx.port, 200, [bearer], [], [_pid(nginx)])

    def _unix_floor(self, workers: int, env: dict[str, str]) -> procs.Process:
        """Start the low-level floor on a Unix socket, its *workers* accepting on it."""
        path = self.sockets / "floor-low.sock"
        argv = [sys.executable, "-m", "bench.floor", "--low-level", "--unix", str(path)]
        floor = procs.Process(
            [*argv, "--workers", str(workers)],
            port=0,
            log=self.workdir / "floor-low-unix.log",
            env={**os.environ, **env},
            unix_socket=path,
        )
        self._spawn(floor)
        return floor

    def _floors(
        self,
        workers: int,
        env: dict[str, str],
        *,
        redis_url: str | None = None,
        low_level: bool = False,
    ) -> list[procs.Process]:
        """Start the floor, one process a worker sharing a port: with *redis_url*, a GET each;
        with *low_level*, on aiohttp's low-level server."""
        port = procs.free_port()
        name = "floor-get" if redis_url else "floor-low" if low_level else "floor"
        floors = [
            procs.Process(
                [sys.executable, "-m", "bench.floor", "--port", str(port)]
                + (["--reuse-port"] if workers > 1 else [])
                + (["--redis-url", redis_url] if redis_url else [])
                + (["--low-level"] if low_level else []),
                port=port,
                log=self.workdir / f"{name}-{i}.log",
                env={**os.environ, **env},
            )
            for i in range(workers)
        ]
        for f in floors:
            self._spawn(f)
        return floors

    def _measure(self, cases: list[Case]) -> None:
        a = self.args
        rss_idle = self._sidecar_rss()
        if a.warmup > 0:
            for case in cases:
                self._wrk(case, a.warmup)
        rss_start = self._sidecar_rss()
        for r in range(a.rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for case in order:
                case.runs.append(self._charged(case, partial(self._wrk, case, a.duration)))
        rss_end = self._sidecar_rss()
        print(self._header())
        print()
        print(_table(cases, floor=cases[1]))
        print()
        print(_targets(cases))
        if a.cluster:
            print()
            print(_cluster_costs(cases))
        print()
        print(
            f"Sidecar RSS ({len(stack.tree(_pid(self.sidecar)))} process(es)):"
            f" {_mib(rss_idle)} idle, {_mib(rss_start)} after warm-up,"
            f" {_mib(rss_end)} after the last measured run."
        )
        for note in self.notes:
            print()
            print(note)

    def _soak(self, case: Case) -> None:
        a = self.args
        assert case.script is not None
        samples = [(0.0, self._sidecar_rss())]

        def load() -> wrk.Result:
            assert case.script is not None
            running = wrk.start(
                case.script,
                case.url,
                duration=a.soak,
                connections=a.connections,
                threads=a.threads,
            )
            began = time.monotonic()
            while running.proc.poll() is None:
                time.sleep(0.2)
                if time.monotonic() - began >= len(samples) * SAMPLE_EVERY:
                    samples.append((time.monotonic() - began, self._sidecar_rss()))
            result = wrk.finish(running)
            if time.monotonic() - began - samples[-1][0] >= 1.0:
                samples.append((time.monotonic() - began, self._sidecar_rss()))
            return result

        case.runs.append(self._charged(case, load))
        print(self._header())
        print()
        print(_table([case], floor=None))
        print()
        print("| t (s) | sidecar RSS |")
        print("|---:|---:|")
        for t, kib in samples:
            print(f"| {t:.0f} | {_mib(kib)} |")
        print()
        rss = [kib for _, kib in samples]
        print(
            f"Sidecar RSS over {a.soak:g} s under load: start {_mib(rss[0])},"
            f" end {_mib(rss[-1])}, max {_mib(max(rss))}"
            f" ({(rss[-1] - rss[0]) / 1024:+.1f} MiB)."
        )
        for note in self.notes:
            print()
            print(note)

    def _charged(self, case: Case, load: Callable[[], wrk.Result]) -> wrk.Result:
        """Run *load* on *case* and add the CPU each process used to the case's account."""
        groups = {
            "auth": [p for root in case.auth_roots for p in stack.tree(root)],
            "nginx": [p for root in case.nginx_roots for p in stack.tree(root)],
            "redis": self.redis_pids if case.redis_pids is None else case.redis_pids,
        }
        before = {k: stack.cpu_seconds(v) for k, v in groups.items()}
        busy = stack.machine_busy_seconds()
        result = load()
        busy = stack.machine_busy_seconds() - busy
        ours = result.cpu
        for k, v in groups.items():
            used = stack.cpu_seconds(v) - before[k]
            case.cpu[k] = case.cpu.get(k, 0.0) + used
            ours += used
        case.cpu["wrk"] = case.cpu.get("wrk", 0.0) + result.cpu
        # Whatever else ran meanwhile (other test suites on a shared machine): noise.
        case.cpu["other"] = case.cpu.get("other", 0.0) + max(0.0, busy - ours)
        return result

    def _wrk(self, case: Case, duration: float) -> wrk.Result:
        assert case.script is not None
        return wrk.run(
            case.script,
            case.url,
            duration=duration,
            connections=self.args.connections,
            threads=self.args.threads,
        )

    def _header(self) -> str:
        a = self.args
        cpu = _cpu_model()
        command = shlex.join([".venv/bin/python", "bench/gate.py", *sys.argv[1:]])
        cluster = (
            f" The Cluster cases: a {CLUSTER_MASTERS}-master Redis Cluster (no replicas), the"
            " sidecar reaching its masters over TCP, their Redis CPU summed over its nodes."
            if a.cluster
            else ""
        )
        mode = (
            f"{a.soak:g} s soak of the valid-key case"
            if a.soak
            else f"{a.rounds} round(s) of the {self.cases} cases, order rotated each round,"
            f" {a.duration:g} s"
            f" a run after a {a.warmup:g} s warm-up; the median round is shown"
        )
        return "\n".join(
            [
                f"Machine: {os.cpu_count()} cores ({cpu}), shared by wrk, nginx, Redis and the"
                " sidecar; load generator and servers compete for the same CPUs.",
                f"Command: `{command}`",
                f"Setup: {_version(['nginx', '-v'])} (worker_processes 1),"
                f" {_version(['wrk', '-v'])} ({a.threads} thread(s), {a.connections}"
                f" connections), {_version(['redis-server', '--version'])},"
                f" Python {platform.python_version()};"
                f" GET {stack.PATH}; {mode}; Redis over"
                f" {'its Unix socket' if a.redis_socket else 'TCP (127.0.0.1)'}, but over its"
                " Unix socket for the cases on a Unix socket and the OpenResty row." + cluster,
                f"Sidecar: {_git_state()}, workers {self.workers}, WACRM_RATE_LIMIT"
                f" {self.rate_limit or '(not set)'}.",
                "Upstream: a `return 200` server inside the same nginx (echoes the injected"
                " account id), so the upstream is never the bottleneck.",
            ]
        )

    def _sidecar_rss(self) -> int:
        return stack.rss_kib(stack.tree(_pid(self.sidecar)))

    def _spawn(self, p: procs.Process) -> None:
        self.started.append(p)
        p.start()


def _table(cases: list[Case], *, floor: Case | None) -> str:
    """Render *cases* as a markdown table, with rates relative to *floor*'s median run."""
    base = floor.median().rate if floor is not None and floor.runs else 0.0
    base_cpu = _cpu_per_request(floor) if floor is not None else 0.0
    rows = [
        "| case | req/s | req/s each round | p50 ms | p99 ms | x floor | x floor by CPU | errors"
        " | CPU us/req: auth app | nginx | Redis | wrk | other load (cores) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        m = c.median()
        total = sum(r.requests for r in c.runs) or 1
        cpu = [f"{c.cpu[k] / total * 1e6:.0f}" if k in c.cpu else "-" for k in _CPU_GROUPS]
        if not c.auth_roots:
            cpu[0] = "-"
        ratio = f"{m.rate / base:.2f}" if base else "-"
        own = _cpu_per_request(c)
        cpu_ratio = f"{base_cpu / own:.2f}" if base_cpu and own else "-"
        seconds = sum(r.seconds for r in c.runs) or 1.0
        cpu.append(f"{c.cpu.get('other', 0.0) / seconds:.2f}")
        rows.append(
            f"| {c.name} | {m.rate:,.0f} | {' / '.join(f'{r.rate:,.0f}' for r in c.runs)}"
            f" | {statistics.median(r.p50_ms for r in c.runs):.2f}"
            f" | {statistics.median(r.p99_ms for r in c.runs):.2f}"
            f" | {ratio} | {cpu_ratio} | {_errors(c)} | {' | '.join(cpu)} |"
        )
    return "\n".join(rows)


_CPU_GROUPS = ("auth", "nginx", "redis", "wrk")

#: The Unix socket's targets: (case, against, at least).
TARGETS = (
    ("gate, valid key, Unix socket", "floor, low-level server", 1.0),
    ("gate, valid key, Unix socket", "floor, low-level server, Unix socket", 0.8),
)


def _targets(cases: list[Case]) -> str:
    """Say how the gate over its Unix socket stands against the low-level floor, both ways."""
    by_name = {c.name: c for c in cases}
    lines = []
    for name, against, target in TARGETS:
        case, base = by_name.get(name), by_name.get(against)
        if case is None or base is None or not case.runs or not base.runs:
            continue
        rate = case.median().rate / base.median().rate
        own, theirs = _cpu_per_request(case), _cpu_per_request(base)
        by_cpu = f"{theirs / own:.2f}x" if own and theirs else "-"
        verdict = "met" if rate >= target else "NOT met"
        lines.append(
            f"- {name} against {against}: {rate:.2f}x ({by_cpu} by CPU);"
            f" target at least {target:.1f}x: {verdict}"
        )
    return "Targets of the Unix socket:\n" + "\n".join(lines)


def _cluster_costs(cases: list[Case]) -> str:
    """Say what the Cluster costs: each Cluster case against the same case on one Redis."""
    by_name = {c.name: c for c in cases}
    lines = []
    for case in cases:
        base = by_name.get(case.name.removesuffix(CLUSTER))
        if not case.name.endswith(CLUSTER) or base is None or not case.runs or not base.runs:
            continue
        parts = [f"{case.median().rate / base.median().rate:.2f}x the req/s"]
        for label, group in (("sidecar CPU", "auth"), ("Redis CPU", "redis")):
            one, many = _group_per_request(base, group), _group_per_request(case, group)
            ratio = f" ({many / one:.2f}x)" if one else ""
            parts.append(f"{label} {one * 1e6:.0f} -> {many * 1e6:.0f} us/req{ratio}")
        one, many = _cpu_per_request(base), _cpu_per_request(case)
        ratio = f" ({many / one:.2f}x)" if one else ""
        parts.append(f"all CPU {one * 1e6:.0f} -> {many * 1e6:.0f} us/req{ratio}")
        lines.append(f"- {base.name}: {'; '.join(parts)}")
    return (
        f"What the Cluster costs (a {CLUSTER_MASTERS}-master Cluster against one redis-server):\n"
        + "\n".join(lines)
    )


def _group_per_request(case: Case, group: str) -> float:
    """Return the CPU seconds a request of *case* cost the processes of *group*."""
    total = sum(r.requests for r in case.runs)
    return case.cpu.get(group, 0.0) / total if total else 0.0


def _cpu_per_request(case: Case) -> float:
    """Return the CPU seconds a request of *case* cost wrk, nginx, Redis and the auth app.

    On a machine shared with other work, throughput swings with their load; this does not,
    and on a CPU-bound box its inverse ratio predicts the throughput ratio.
    """
    total = sum(r.requests for r in case.runs)
    return sum(case.cpu.get(k, 0.0) for k in _CPU_GROUPS) / total if total else 0.0


def _errors(case: Case) -> str:
    """Sum what went wrong over every run of *case*: unexpected statuses, socket errors."""
    counts: dict[str, int] = {}
    for r in case.runs:
        for status, n in r.statuses.items():
            counts[str(status)] = counts.get(str(status), 0) + n
        for kind, n in r.socket_errors.items():
            counts[kind] = counts.get(kind, 0) + n
    if not counts:
        return "0"
    return ", ".join(f"{n:,} x {what}" for what, n in sorted(counts.items()))


def mint_keys(count: int) -> list[tuple[apikeys.MintedKey, records.KeyRecord]]:
    """Mint *count* keys, each with its record: the route's scope, no expiry."""
    keys = []
    for i in range(count):
        minted = apikeys.mint()
        key_id = KEY_ID if i == 0 else f"{KEY_ID[:-6]}{i:06d}"
        record = records.KeyRecord(
            key_id, ACCOUNT_ID, "Bench Inc", minted.key_prefix, (stack.SCOPE,), None
        )
        keys.append((minted, record))
    return keys


def put_keys(
    redis_url: str, keys: Sequence[tuple[apikeys.MintedKey, records.KeyRecord]]
) -> list[str]:
    """Store *keys* the way the loader does and mark the load complete; return their
    plaintexts."""
    keyspace = records.Keyspace()
    version = int(time.time() * 1000)
    plaintexts = []
    with redis_sync.Redis.from_url(redis_url) as r:
        put = r.register_script(records.PUT_SCRIPT)
        for minted, record in keys:
            written = put(
                keys=[keyspace.record(minted.key_hash), keyspace.tombstone(minted.key_hash)],
                args=[records.encode(record, version=version), version, ""],
            )
            if written != 1:
                raise RuntimeError("a key record was not written")
            plaintexts.append(minted.plaintext)
        r.set(keyspace.loaded, version)  # a finished load: an unknown key is a 401
    return plaintexts


async def put_cluster_keys(
    url: str, keys: Sequence[tuple[apikeys.MintedKey, records.KeyRecord]]
) -> None:
    """Store *keys* into the Redis Cluster at *url* through the loader's Mirror, and mark the
    load complete in every slot."""
    # Imported here: only --cluster needs the loader.
    from loader.mirror import Mirror
    from loader.pipe import Batch

    mirror = await Mirror.open(url, records.Keyspace(), connect_timeout=CLUSTER_TIMEOUT)
    try:
        await mirror.begin_load()
        version = await mirror.version()
        batch = Batch()
        await mirror.put([(m.key_hash, r) for m, r in keys], version=version, batch=batch)
        await mirror.wait(batch)
        if batch.applied != len(keys):
            raise RuntimeError(f"{len(keys) - batch.applied} key records were not written")
        if not await mirror.mark_loaded(version):
            raise RuntimeError("the Cluster lost the records while they were written")
    finally:
        await mirror.close()


def _preflight(case: Case, *, account_id: str | None) -> None:
    """Send *case*'s first request once and fail unless it gets the expected answer."""
    conn = http.client.HTTPConnection("127.0.0.1", case.port, timeout=5)
    try:
        conn.request("GET", stack.PATH, headers={"Authorization": case.authorizations[0]})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    finally:
        conn.close()
    if resp.status != case.expected:
        raise SystemExit(
            f"{case.name}: expected {case.expected}, got {resp.status}: {body[:200]!r}"
        )
    if account_id is not None and account_id not in body:
        raise SystemExit(f"{case.name}: the upstream did not get the account id: {body!r}")


def _sidecar_help(tree: Path | None = None) -> str:
    """Return what ``python -m sidecar --help`` says: which settings this sidecar (or the one
    of the checkout *tree*) has."""
    argv, env = [sys.executable, "-m", "sidecar", "--help"], dict(os.environ)
    if tree is not None:  # as procs.sidecar runs it
        argv.insert(1, "-P")
        env["PYTHONPATH"] = str(tree.resolve())
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=procs.ROOT, env=env, check=False
    ).stdout


def _git_state() -> str:
    """Say which code ran: the commit, and whether sidecar/ or nginx/ had local changes."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=procs.ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "sidecar", "nginx")
    return f"working tree at {commit}" + (
        " with uncommitted changes in sidecar/ or nginx/" if dirty else ""
    )


def _pid(p: procs.Process) -> int:
    assert p.proc is not None
    return p.proc.pid


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _version(argv: list[str]) -> str:
    """Return "name x.y.z" for the program run by *argv* (nginx tells on stderr)."""
    try:
        done = subprocess.run(
            [procs.find_binary(argv[0]), *argv[1:]], capture_output=True, text=True, check=False
        )
    except OSError:
        return argv[0]
    found = re.search(r"\d+\.\d+(?:\.\d+)?", done.stdout + done.stderr)
    return f"{argv[0]} {found.group()}" if found else argv[0]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds a run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all the cases (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds per case first (default 2)")
    p.add_argument(
        "--workers", type=int, default=1, help="sidecar processes, as WACRM_WORKERS (default 1)"
    )
    p.add_argument(
        "--rate-limit",
        default="1000000000/1s",
        help="WACRM_RATE_LIMIT for the sidecar, if it has one: high, so the valid key is"
        " admitted while the limiter still runs; '' leaves the sidecar's default",
    )
    p.add_argument(
        "--redis-socket",
        action="store_true",
        help="connect the sidecar (and the floor's GET) to Redis over a Unix socket, not TCP",
    )
    p.add_argument(
        "--lua",
        choices=("install", "installed", "off"),
        default="install",
        help="the OpenResty reference row: install nginx's Lua module and libraries from"
        " Debian when missing (as root; default), run it only if installed, or leave it out",
    )
    p.add_argument(
        "--tree",
        type=Path,
        action="append",
        default=[],
        help="add the valid-key case through the sidecar of this other checkout (repeatable)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help=f"add the valid-key cases through a sidecar on a {CLUSTER_MASTERS}-master Redis"
        " Cluster (over TCP, whatever --redis-socket says)",
    )
    p.add_argument(
        "--soak", type=float, default=0.0, metavar="SECONDS", help="run the soak instead"
    )
    args = p.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.connections < 1 or args.workers < 1:
        p.error("--duration, --rounds, --connections and --workers must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
