"""The benchmark harness runs every case and cannot make a broken case look fast."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import wrk
from demo import procs

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
]


def test_harness_prints_every_case_with_positive_rates_and_no_errors() -> None:
    # --tree .: this checkout once more, as the other checkout of a side-by-side run.
    # --lua installed: the OpenResty row runs if nginx's Lua module is there; tests install
    # nothing.
    out = subprocess.run(
        [sys.executable, "bench/gate.py", "--duration", "1", "--rounds", "1", "--warmup", "0",
         "--connections", "4", "--tree", ".", "--lua", "installed"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    ).stdout  # fmt: skip
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| ")]  # fmt: skip
    header, rows = table[0], table[1:]
    openresty = "OpenResty/Lua in nginx, valid key (reference)"
    skipped = f"the {openresty} row was skipped: not installed: " in out
    assert [row[0] for row in rows] == [
        "ceiling (no auth)",
        "floor (200-only aiohttp)",
        "floor, low-level server",
        "floor, low-level server, Unix socket",
        "floor + one Redis GET",
        "gate, valid key",
        "gate, valid key, Unix socket",
        "gate, 1,000 valid keys",
        "gate, unknown keys",
        "gate, garbage",
        *([] if skipped else [openresty]),
        "gate, valid key, .",
        "gate, valid key, Unix socket, .",
    ]
    for row in rows:
        assert float(row[header.index("req/s")].replace(",", "")) > 0, row
        assert row[header.index("errors")] == "0", row
    assert "Machine: " in out
    assert "Sidecar RSS" in out
    targets = [line for line in out.splitlines() if line.startswith("- gate, valid key, Unix")]
    assert [line.split(":")[0] for line in targets] == [
        "- gate, valid key, Unix socket against floor, low-level server",
        "- gate, valid key, Unix socket against floor, low-level server, Unix socket",
    ]
    assert "target at least 1.0x" in targets[0] and "target at least 0.8x" in targets[1]


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
@pytest.mark.timeout(150)  # about 30 s; a Cluster's start is slower on a busy machine
def test_cluster_rows_run_beside_the_one_redis_rows_with_two_workers() -> None:
    out = subprocess.run(
        [sys.executable, "bench/gate.py", "--cluster", "--workers", "2", "--duration", "1",
         "--rounds", "1", "--warmup", "1", "--connections", "4", "--lua", "off"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=True,
    ).stdout  # fmt: skip
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| ")]  # fmt: skip
    header, rows = table[0], table[1:]
    names = [row[0] for row in rows]
    at = names.index("gate, 1,000 valid keys")
    assert names[at + 1 : at + 3] == ["gate, valid key, Cluster", "gate, 1,000 valid keys, Cluster"]
    assert len(names) == 12
    for row in rows:
        assert float(row[header.index("req/s")].replace(",", "")) > 0, row
    for row in rows[at + 1 : at + 3]:  # the sidecar's CPU and the Cluster's nodes' were counted
        assert row[header.index("errors")] == "0", row
        assert int(row[header.index("CPU us/req: auth app")]) > 0, row
        assert int(row[header.index("Redis")]) > 0, row
    assert "workers 2" in out
    costs = [line for line in out.splitlines() if line.startswith("- gate, ") and "->" in line]
    assert [line.split(":")[0] for line in costs] == [
        "- gate, valid key",
        "- gate, 1,000 valid keys",
    ]


def test_wrk_counts_every_response_with_another_status_as_an_error(tmp_path: Path) -> None:
    upstream = procs.upstream(tmp_path)
    upstream.start()
    try:
        script = wrk.write_script(
            tmp_path, "expect401", path="/x", authorizations=["Bearer a", ""], expected=401
        )
        result = wrk.run(script, f"http://127.0.0.1:{upstream.port}/x", duration=1, connections=2)
    finally:
        upstream.stop()
    assert result.requests > 0
    assert result.statuses == {200: result.requests}
    assert result.errors >= result.requests


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.timeout(300)  # three apps under callgrind: about 100 s, more on a busy machine
def test_instruction_counts_cover_both_floors_and_the_gate() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--duration", "1", "--connections", "2"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| target")]  # fmt: skip
    assert [row[0] for row in rows] == [
        "floor (web.Application)",
        "floor, low-level server",
        "gate, valid key",
    ]
    per_request = [float(row[2].replace(",", "")) for row in rows]
    assert all(n > 10_000 for n in per_request), rows
    assert rows[0][3] == "1.00"
