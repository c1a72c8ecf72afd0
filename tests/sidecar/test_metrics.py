"""The sidecar's counts and their Prometheus exposition, one process and several."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from demo import procs
from sidecar import decision
from sidecar.decision import Denial
from sidecar.metrics import COUNTS_GLOBS, DECISIONS, PROMETHEUS_ENV, Metrics, clear_counts

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(metrics: Metrics) -> Samples:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_refusal_the_gate_makes_has_its_own_series() -> None:
    refusals = [v for v in vars(decision).values() if isinstance(v, Denial)]
    refusals += [decision.rate_limited(3), decision.missing_scope("contacts:read")]
    assert len(refusals) > 8
    for d in refusals:
        assert (d.status, d.reason) in DECISIONS, d


def test_decisions_and_durations_are_counted() -> None:
    m = Metrics()
    m.decided(200, "ok", 0.0003)
    m.decided(200, "ok", 0.003)
    m.decided(401, "unknown", 2.0)
    m.redis_error("timeout")
    s = _samples(m)
    assert s[("wacrm_gate_decisions_total", (("outcome", "allowed"), ("reason", "ok")))] == 2
    assert (
        s[("wacrm_gate_decisions_total", (("outcome", "unauthorized"), ("reason", "unknown")))] == 1
    )
    assert (
        s[("wacrm_gate_decisions_total", (("outcome", "forbidden"), ("reason", "missing_scope")))]
        == 0
    )
    assert s[("wacrm_gate_verify_seconds_bucket", (("le", "0.0005"),))] == 1
    assert s[("wacrm_gate_verify_seconds_bucket", (("le", "0.005"),))] == 2
    assert s[("wacrm_gate_verify_seconds_bucket", (("le", "1.0"),))] == 2
    assert s[("wacrm_gate_verify_seconds_bucket", (("le", "+Inf"),))] == 3
    assert s[("wacrm_gate_verify_seconds_count", ())] == 3
    assert abs(s[("wacrm_gate_verify_seconds_sum", ())] - 2.0033) < 1e-5
    assert s[("wacrm_gate_redis_errors_total", (("kind", "timeout"),))] == 1
    assert s[("wacrm_gate_redis_errors_total", (("kind", "reply"),))] == 0


def test_a_decision_unknown_to_the_table_is_still_counted() -> None:
    m = Metrics()
    m.decided(418, "teapot", 0.001)
    assert (
        _samples(m)[("wacrm_gate_decisions_total", (("outcome", "other"), ("reason", "other")))]
        == 1
    )


def test_workers_counts_add_up_across_processes(tmp_path: Path) -> None:
    count = (
        "import sys; from pathlib import Path; from sidecar.metrics import Metrics;"
        "m = Metrics(Path(sys.argv[1]));"
        "[m.decided(401, 'missing', 0.001) for _ in range(int(sys.argv[2]))]"
    )
    for n in (3, 4):
        subprocess.run(
            [sys.executable, "-c", count, str(tmp_path), str(n)], cwd=procs.ROOT, check=True
        )
    assert len(_pids_with_files(tmp_path)) == 2  # the processes are gone; their counts stay
    mine = Metrics(tmp_path)
    mine.decided(401, "missing", 0.001)
    s = _samples(mine)
    assert (
        s[("wacrm_gate_decisions_total", (("outcome", "unauthorized"), ("reason", "missing")))] == 8
    )
    assert s[("wacrm_gate_verify_seconds_count", ())] == 8


def _pids_with_files(directory: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[1] for g in COUNTS_GLOBS for p in directory.glob(g)}


def _count(directory: str, n: int, told: Connection) -> None:
    """Count like a worker: *n* decisions and a Redis error; say so, then wait to be let go."""
    m = Metrics(Path(directory))
    for _ in range(n):
        m.decided(401, "missing", 0.001)
    m.redis_error("reply")
    told.send(n)
    with contextlib.suppress(EOFError):
        told.recv()  # until the test closes its end


def test_a_scrape_adds_up_live_workers_and_keeps_a_dead_workers_counts(tmp_path: Path) -> None:
    """Spawned as the supervisor spawns them; one is killed and replaced, and nothing is lost."""
    ctx = multiprocessing.get_context("spawn")
    workers: list[tuple[BaseProcess, Connection]] = []

    def start(n: int) -> BaseProcess:
        mine, theirs = ctx.Pipe()
        w = ctx.Process(target=_count, args=(str(tmp_path), n, theirs))
        w.start()
        theirs.close()
        workers.append((w, mine))
        assert mine.poll(60), "the worker did not count"
        assert mine.recv() == n
        return w

    def missing_and_errors(s: Samples) -> tuple[float, float, float]:
        return (
            s[("wacrm_gate_decisions_total", (("outcome", "unauthorized"), ("reason", "missing")))],
            s[("wacrm_gate_verify_seconds_count", ())],
            s[("wacrm_gate_redis_errors_total", (("kind", "reply"),))],
        )

    scrape = Metrics(tmp_path)
    try:
        first = start(3)
        start(4)
        assert missing_and_errors(_samples(scrape)) == (7, 7, 2)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        assert first.exitcode == -signal.SIGKILL
        start(5)  # its replacement
        assert missing_and_errors(_samples(scrape)) == (12, 12, 3)
        assert len(_pids_with_files(tmp_path)) == 4  # the three workers' and this process's
    finally:
        for w, mine in workers:
            mine.close()
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join()


@pytest.mark.parametrize("in_files", [False, True])
def test_every_decision_is_exposed_at_zero_from_the_start_but_other(
    tmp_path: Path, in_files: bool
) -> None:
    s = _samples(Metrics(tmp_path) if in_files else Metrics())
    decisions = {labels for (name, labels) in s if name == "wacrm_gate_decisions_total"}
    assert len(decisions) == len(DECISIONS)
    assert (("outcome", "other"), ("reason", "other")) not in decisions
    assert all(v == 0 for v in s.values())


def test_one_process_and_files_expose_the_same_series(tmp_path: Path) -> None:
    """No `_created` series in one process: the workers' files have none."""

    def count(m: Metrics) -> Samples:
        for seconds in (0.0001, 0.0007, 0.003, 0.04, 0.7, 3.0):
            m.decided(200, "ok", seconds)
        m.decided(503, "not_loaded", 0.002)
        m.decided(418, "teapot", 0.001)
        m.redis_error("connection")
        return _samples(m)

    one, files = count(Metrics()), count(Metrics(tmp_path))
    assert one.keys() == files.keys()
    assert all(abs(one[k] - files[k]) < 1e-9 for k in one)
    assert not [name for name, _ in one if name.endswith("_created")]
    help_lines = [line for line in Metrics().exposition().decode().splitlines() if "HELP" in line]
    assert help_lines == [
        "# HELP wacrm_gate_decisions_total Requests decided by the gate, by outcome and reason.",
        "# HELP wacrm_gate_verify_seconds Time from a check's arrival to its answer, Redis round"
        " trip included.",
        "# HELP wacrm_gate_redis_errors_total Redis calls of the request path that failed, by"
        " kind (timeout, connection, reply).",
    ]


def test_counting_in_files_leaves_later_metrics_in_memory(tmp_path: Path) -> None:
    """prometheus-client's choice of memory or files is global; a Metrics makes its own."""
    chosen, folder = values.ValueClass, os.environ.get(PROMETHEUS_ENV)
    files = Metrics(tmp_path)
    files.decided(418, "teapot", 0.001)  # a series made after start-up, in the files
    assert values.ValueClass is chosen  # other code's metrics still count where they did
    assert os.environ.get(PROMETHEUS_ENV) == folder
    before = set(tmp_path.rglob("*"))
    memory = Metrics()
    memory.decided(200, "ok", 0.001)
    assert set(tmp_path.rglob("*")) == before
    ok = ("wacrm_gate_decisions_total", (("outcome", "allowed"), ("reason", "ok")))
    other = ("wacrm_gate_decisions_total", (("outcome", "other"), ("reason", "other")))
    assert _samples(memory)[ok] == 1
    assert _samples(files)[other] == 1
    assert len(_pids_with_files(tmp_path)) == 1


def test_clearing_removes_the_counts_and_nothing_else(tmp_path: Path) -> None:
    Metrics(tmp_path).decided(200, "ok", 0.001)
    (tmp_path / "keys.db").write_bytes(b"SQLite format 3\0")
    clear_counts(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keys.db"]
