"""What counting one decision costs: this checkout's metrics against another checkout's.

Run ``.venv/bin/python -m bench.metrics_cost --tree PATH``, where PATH is a checkout of the
hand-written slot array (``git worktree add -f /tmp/wt-metrics d3fdbbb``; remove it after with
``git worktree remove --force /tmp/wt-metrics``).  Without ``--tree`` only this checkout runs.

Each implementation runs in one process (counts in memory) and as a worker does (counts in
files in a temporary folder), on the same list of calls: ``Metrics.decided(status, reason,
seconds)`` with a mix of outcomes and durations, and one ``redis_error`` every
*--errors-every* decisions.  The cases alternate in rounds (the order rotated each round), and
the table shows each case's median round in CPU microseconds per decision (process time, so a
busy machine's waits are not counted), next to an empty ``Metrics`` that shows the harness's
own cost.  The differences are given as a share of the sidecar's CPU per request
(*--request-us*).  "scrape ms" is one ``exposition()`` with the case's counts.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol

from sidecar import metrics as this_metrics

ROOT = Path(__file__).resolve().parent.parent
#: Sidecar CPU per request through nginx, valid key (README, request-path benchmark).
REQUEST_US = 174.0
#: The decisions of the benchmark's traffic, and how often each comes.
MIX = (
    ((200, "ok"), 90),
    ((401, "unknown"), 4),
    ((403, "missing_scope"), 3),
    ((429, "rate_limited"), 2),
    ((401, "malformed"), 1),
)


class Counting(Protocol):
    def decided(self, status: int, reason: str, seconds: float) -> None: ...
    def redis_error(self, kind: str) -> None: ...
    def exposition(self) -> bytes: ...


class Empty:
    """Count nothing: what the harness's loop and calls cost by themselves."""

    def decided(self, status: int, reason: str, seconds: float) -> None:
        pass

    def redis_error(self, kind: str) -> None:
        pass

    def exposition(self) -> bytes:
        return b""


@dataclass
class Case:
    name: str
    impl: str  # which implementation, to pair the cases of one mode
    mode: str
    metrics: Counting
    rounds: list[float] = field(default_factory=list)  # µs per decision
    scrape_ms: float = 0.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    calls = _calls(args.decisions, args.errors_every)
    with tempfile.TemporaryDirectory(prefix="wacrm-metrics-bench-") as tmp:
        cases = [Case("empty Metrics (harness)", "empty", "-", Empty())]
        impls: list[tuple[str, ModuleType]] = [("prometheus-client", this_metrics)]
        if args.tree is not None:
            impls.insert(0, (f"--tree at {_commit(args.tree)}", _load(args.tree)))
        for impl, module in impls:
            folder = Path(tmp) / f"{len(cases)}"
            folder.mkdir()
            cases.append(Case(f"{impl}, one process", impl, "one", module.Metrics()))
            cases.append(Case(f"{impl}, files", impl, "files", module.Metrics(folder)))
        for case in cases:  # warm-up, untimed
            _run(case.metrics, calls[: len(calls) // 10])
        for r in range(args.rounds):
            shift = r % len(cases)
            for case in cases[shift:] + cases[:shift]:
                case.rounds.append(_run(case.metrics, calls) / args.decisions)
        for case in cases:
            case.scrape_ms = _scrape_ms(case.metrics)
    _report(cases, args)
    return 0


def _calls(decisions: int, errors_every: int) -> list[list[tuple[int, str, float]]]:
    """Return *decisions* calls in chunks of *errors_every*, the same in every run."""
    rng = random.Random(13)
    chosen = rng.choices([d for d, _ in MIX], [w for _, w in MIX], k=decisions)
    # Checks take about a millisecond, a few far longer: every bucket gets some.
    calls = [(s, r, rng.lognormvariate(-6.9, 1.0)) for s, r in chosen]
    return [calls[i : i + errors_every] for i in range(0, decisions, errors_every)]


def _run(metrics: Counting, chunks: list[list[tuple[int, str, float]]]) -> float:
    """Return the CPU microseconds *metrics* took for *chunks*, a Redis error after each."""
    decided, redis_error = metrics.decided, metrics.redis_error
    gc.collect()
    gc.disable()
    try:
        started = time.process_time_ns()
        for chunk in chunks:
            for status, reason, seconds in chunk:
                decided(status, reason, seconds)
            redis_error("timeout")
        return (time.process_time_ns() - started) / 1000
    finally:
        gc.enable()


def _scrape_ms(metrics: Counting) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        metrics.exposition()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _report(cases: list[Case], args: argparse.Namespace) -> None:
    prometheus = importlib.metadata.version("prometheus-client")
    print(
        f"Python {sys.version.split()[0]}, prometheus-client {prometheus},"
        f" this checkout at {_commit(ROOT)}; {args.rounds} rounds of {args.decisions:,}"
        f" decisions (a Redis error every {args.errors_every}), median round"
    )
    print()
    print("| case | µs per decision | rounds' range | net of harness | scrape ms |")
    print("|---|---:|---:|---:|---:|")
    harness = statistics.median(cases[0].rounds)
    for c in cases:
        median = statistics.median(c.rounds)
        net = "-" if c.impl == "empty" else f"{median - harness:.2f}"
        spread = f"{min(c.rounds):.2f} to {max(c.rounds):.2f}"
        print(f"| {c.name} | {median:.2f} | {spread} | {net} | {c.scrape_ms:.2f} |")
    impls = list(dict.fromkeys(c.impl for c in cases[1:]))
    if len(impls) < 2:
        return
    print()
    old, new = impls
    for mode in ("one", "files"):
        [a] = [c for c in cases if c.impl == old and c.mode == mode]
        [b] = [c for c in cases if c.impl == new and c.mode == mode]
        more = statistics.median(b.rounds) - statistics.median(a.rounds)
        share = more / args.request_us * 100
        print(
            f"{new} against {old}, {'one process' if mode == 'one' else 'files'}:"
            f" {more:+.2f} µs a decision, {share:+.2f}% of {args.request_us:g} µs"
            " of sidecar CPU a request"
        )


def _load(tree: Path) -> ModuleType:
    """Import *tree*'s sidecar/metrics.py under a name of its own."""
    path = tree / "sidecar" / "metrics.py"
    spec = importlib.util.spec_from_file_location("tree_metrics", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"metrics_cost: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _commit(tree: Path) -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(tree), *argv], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "sidecar/metrics.py")
    return commit + (" (sidecar/metrics.py changed)" if dirty else "")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tree", type=Path, help="a checkout whose sidecar/metrics.py to compare")
    p.add_argument("--rounds", type=_positive, default=9, help="rounds of all cases (default 9)")
    p.add_argument(
        "--decisions", type=_positive, default=200_000, help="decisions a round (default 200,000)"
    )
    p.add_argument(
        "--errors-every",
        type=_positive,
        default=100,
        help="one redis_error after this many decisions (default 100)",
    )
    p.add_argument(
        "--request-us",
        type=float,
        default=REQUEST_US,
        help=f"sidecar CPU µs a request, for the shares (default {REQUEST_US:g}, from README)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
