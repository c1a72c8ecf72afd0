"""bench/revocation.py revokes keys with plain SQL on both sources and sees every one refused."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from demo import procs
from tests.loader.conftest import ADMIN_DSN

pytestmark = pytest.mark.bench


@pytest.mark.timeout(120)  # about 15 s; more on a busy machine
def test_a_short_run_prints_both_sources_with_every_key_refused() -> None:
    done = subprocess.run(
        [sys.executable, "bench/revocation.py", "--trials", "5", "--pg", ADMIN_DSN,
         "--database", f"wacrm_test_bench_{uuid.uuid4().hex[:10]}"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, (out, done.stderr)  # 1: a key never refused, or let in again
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| ")]  # fmt: skip
    header, rows = table[0], table[1:]
    assert header[:5] == ["source", "trials", "refused after: p50 ms", "p99 ms", "max ms"]
    assert [row[0] for row in rows] == ["PostgreSQL NOTIFY", "SQLite polling"]
    for row in rows:
        assert row[1] == "5", row
        refused = [float(v) for v in row[2:5]]  # p50 <= p99 <= max, all figures present
        allowed = [float(v) for v in row[5:8]]
        assert refused == sorted(refused) and allowed == sorted(allowed), row
        assert refused[2] < 5000, row  # each within the script's give-up bound
        assert int(row[8].replace(",", "")) > 5, row  # the keys were requested throughout
    verdicts = [line for line in out.splitlines() if line.startswith("- ")]
    assert [v.split(":")[0] for v in verdicts] == ["- PostgreSQL NOTIFY", "- SQLite polling"]
    assert all("(target < " in v and v.endswith(("met", "MISSED")) for v in verdicts), verdicts
    counts = [line.strip() for line in out.splitlines() if line.startswith("  never refused")]
    assert counts == ["never refused: 0; allowed after a refusal: 0; other answers: 0"] * 2
    assert "load average " in out
