"""Instructions a request costs the auth app, counted by valgrind's callgrind.

Run ``.venv/bin/python -m bench.instructions [--tree PATH ...]``.

Throughput and CPU seconds on a small shared machine swing from one run to the next; the
number of instructions a process executes for a request does not (within about 1% here).
Each target runs under callgrind and is loaded with wrk straight on its ``/auth``, with the
headers nginx's subrequest carries and a valid key.  Its counters are zeroed after a warm-up
and read after the measured run.  Only user-space instructions count: system calls and the
kernel's network work do not, so this measures Python and its libraries, not the round trips.

Targets: the floor (bench/floor.py) in a `web.Application` and on aiohttp's low-level server,
and the sidecar of this checkout with a valid key.  Each ``--tree PATH`` adds the sidecar of
another checkout (a git worktree of an older commit, say), measured the same way in the same
run.  Under callgrind a process runs tens of times slower, so requests queue and the
sidecar's batches fill up to the connection count, as they do under load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import stack, wrk
from bench.gate import mint_keys, put_keys
from demo import procs


@dataclass(frozen=True, slots=True)
class Target:
    """An auth app to count: how to start it, and from which checkout."""

    name: str
    module: list[str]
    tree: Path


def main(argv: Sequence[str] | None = None) -> int:
    """Count each target's instructions per request and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, action="append", default=[], help="another checkout")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--duration", type=float, default=20, help="measured seconds (default 20)")
    args = p.parse_args(argv)
    here = procs.ROOT
    targets = [
        Target("floor (web.Application)", ["bench.floor"], here),
        Target("floor, low-level server", ["bench.floor", "--low-level"], here),
        Target("gate, valid key", ["sidecar"], here),
    ] + [Target(f"gate, valid key, {tree}", ["sidecar"], tree.resolve()) for tree in args.tree]
    with tempfile.TemporaryDirectory(prefix="wacrm-instructions-") as tmp:
        workdir = Path(tmp)
        redis = procs.redis_server(workdir)
        redis.start()
        try:
            redis_url = f"redis://127.0.0.1:{redis.port}/0"
            (key,) = put_keys(redis_url, mint_keys(1))
            script = wrk.write_script(
                workdir,
                "auth",
                path="/auth",
                authorizations=[f"Bearer {key}"],
                expected=200,
                headers={"X-Original-URI": stack.PATH, "X-Original-Method": "GET"},
            )
            rows = [_count(t, workdir, script, redis_url, args) for t in targets]
        finally:
            redis.stop()
    floor = rows[0][2]
    print(f"callgrind, wrk with {args.connections} connections for {args.duration:g} s a target")
    print()
    print("| target | requests | instructions per request | x floor |")
    print("|---|---:|---:|---:|")
    for name, requests, per_request in rows:
        print(f"| {name} | {requests:,} | {per_request:,.0f} | {per_request / floor:.2f} |")
    return 0


def _count(
    target: Target, workdir: Path, script: Path, redis_url: str, args: argparse.Namespace
) -> tuple[str, int, float]:
    port = procs.free_port()
    out = workdir / f"callgrind-{port}.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    argv += ["-P", "-m", *target.module]  # -P: the target's PYTHONPATH, not the cwd, comes first
    if target.module[0] == "bench.floor":
        argv += ["--port", str(port)]
    env = {
        **os.environ,
        "PYTHONPATH": str(target.tree),
        "WACRM_PORT": str(port),
        "WACRM_REDIS_URL": redis_url,
        "WACRM_RATE_LIMIT": "1000000000/1s",  # as in bench/gate.py: counted, never refused
    }
    app = procs.Process(argv, port=port, log=workdir / f"app-{port}.log", env=env)
    app.start(timeout=120)
    try:
        url = f"http://127.0.0.1:{port}/auth"
        wrk.run(script, url, duration=3, connections=args.connections, timeout=30)
        assert app.proc is not None
        pid = str(app.proc.pid)
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
        result = wrk.run(
            script, url, duration=args.duration, connections=args.connections, timeout=30
        )
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
    finally:
        app.stop(timeout=60)
    if result.errors or not result.requests:
        raise RuntimeError(f"{target.name}: {result.errors} errors in {result.requests} requests")
    dumps = sorted(workdir.glob(f"{out.name}.*"), key=lambda f: f.stat().st_mtime)
    return target.name, result.requests, _total(dumps[0]) / result.requests


def _total(dump: Path) -> int:
    """Return the instructions counted in the callgrind *dump*."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals")


if __name__ == "__main__":
    sys.exit(main())
