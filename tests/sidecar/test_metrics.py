"""The sidecar's counts and their Prometheus exposition, one process and several."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from demo import procs
from sidecar import decision
from sidecar.decision import Denial
from sidecar.metrics import DECISIONS, Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
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
    assert (
        len(list(tmp_path.glob("gate-*.counts"))) == 2
    )  # the processes are gone; their counts stay
    mine = Metrics(tmp_path)
    mine.decided(401, "missing", 0.001)
    s = _samples(mine)
    assert (
        s[("wacrm_gate_decisions_total", (("outcome", "unauthorized"), ("reason", "missing")))] == 8
    )
    assert s[("wacrm_gate_verify_seconds_count", ())] == 8
