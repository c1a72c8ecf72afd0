"""Pointed at a node of a real Redis Cluster, the gate says so, and fails closed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo import procs
from loader.pipe import Pipe
from sidecar.resp import RedisUnavailable, RespClient
from tests.cluster import ClusterNodes
from tests.e2e import rawhttp

CLUSTER = "is a node of a Redis Cluster, which the gate does not support yet"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    nodes = ClusterNodes(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


async def test_both_processes_refuse_a_cluster_node_naming_it(cluster: ClusterNodes) -> None:
    client = RespClient(cluster.urls[0], timeout=2)
    try:
        with pytest.raises(RedisUnavailable, match=CLUSTER):
            await client.execute("PING")
    finally:
        await client.aclose()
    with pytest.raises(RedisUnavailable, match=CLUSTER):
        await Pipe.open(cluster.urls[1], connect_timeout=2)


def test_the_sidecar_says_so_at_start_and_is_not_ready(
    tmp_path: Path, cluster: ClusterNodes
) -> None:
    sidecar = procs.sidecar(tmp_path, redis_url=cluster.urls[0])
    sidecar.start()
    try:
        assert rawhttp.request(sidecar.port, "/readyz").status == 503
        refused = rawhttp.request(
            sidecar.port,
            "/auth",
            headers=[
                ("X-Original-URI", "/api/v1/contacts"),
                ("Authorization", "Bearer wacrm_live_" + "A" * 43),
            ],
        )
        assert refused.status == 503
    finally:
        sidecar.stop()
    log = sidecar.log.read_text()
    assert CLUSTER in log
    assert "Redis not usable yet" in log


def test_loader_sync_fails_naming_the_cluster(tmp_path: Path, cluster: ClusterNodes) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loader", "sync"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "WACRM_SOURCE": f"sqlite:///{tmp_path / 'keys.db'}",
            "WACRM_REDIS_URL": cluster.urls[2],
        },
    )
    assert done.returncode == 1
    assert CLUSTER in done.stderr
