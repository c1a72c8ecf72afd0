"""bench/cluster.py runs every case against a real Cluster and a real redis-server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from demo import procs


def _installed(name: str) -> bool:
    try:
        procs.find_binary(name)
    except FileNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(
        not (_installed("redis-server") and _installed("redis-cli")),
        reason="redis-server or redis-cli is not installed",
    ),
]


@pytest.mark.timeout(120)  # about 10 s; a Cluster's start is slower on a busy machine
def test_quick_run_prints_both_tables_with_every_row_and_positive_figures() -> None:
    out = subprocess.run(
        [sys.executable, "bench/cluster.py", "--quick"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    ).stdout
    tables: list[list[list[str]]] = []
    for line in out.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells[0] in ("client", "Redis"):
            tables.append([cells])
        elif not set(cells[0]) <= {"-"}:
            tables[-1].append(cells)
    assert [[row[0] for row in table] for table in tables] == [
        ["client", "resp RespClient.execute", "redis.asyncio RedisCluster"],
        ["Redis", "one redis-server", "Cluster, 3 masters"],
    ], out
    for header, *rows in tables:
        for row in rows:
            figures = dict(zip(header, row, strict=True))
            for name in ("wall s", header[2], "µs", "Redis µs", "CPU x", "Redis CPU x", "wall x"):
                assert float(figures[name]) > 0, (name, row)
            assert figures["bad"] == "0", row  # every call answered, every record found
        assert rows[0][header.index("CPU x")] == "1.00"
    assert "(hiredis parser), " in out and "median of 1 round(s); load average " in out
    assert "request path: redis-py's RedisCluster spends " in out
    assert "check: on the Cluster a check costs " in out
