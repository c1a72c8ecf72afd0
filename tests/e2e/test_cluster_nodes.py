"""The cluster helper of tests/cluster.py, proven against real redis-server nodes: three
masters with a replica each, a reshard, a manual failover, a killed master."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from demo import procs
from tests.cluster import NODE_TIMEOUT_MS, ClusterNodes

ALL_SLOTS = set(range(16384))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    """One 3+3 cluster for the module; each test asks for the roles as they are now."""
    nodes = ClusterNodes(tmp_path_factory.mktemp("cluster-nodes"), masters=3, replicas=1)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def cli(port: int, *args: str) -> str:
    """Run ``redis-cli -c`` (following MOVED and ASK) against 127.0.0.1:*port*."""
    argv = [procs.find_binary("redis-cli"), "-c", "-p", str(port), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def key_in(slots: set[int]) -> str:
    """Return a key whose hash slot is in *slots*."""
    return next(k for k in (f"key-{i}" for i in range(1_000_000)) if key_slot(k.encode()) in slots)


def test_three_masters_with_a_replica_each_start_ok(cluster: ClusterNodes) -> None:
    masters, replicas = cluster.master_ports(), cluster.replica_ports()
    assert len(masters) == len(replicas) == 3
    assert sorted(masters + replicas) == sorted(cluster.ports)
    assert len(cluster.urls) == 6
    assert all(cluster.info(port)["cluster_state"] == "ok" for port in cluster.ports)
    assert {cluster.role(port) for port in masters} == {"master"}
    assert {cluster.role(port) for port in replicas} == {"slave"}
    assert sorted(p for m in masters for p in cluster.replicas_of(m)) == sorted(replicas)
    owned = [cluster.slots_of(port) for port in masters]
    assert sum(map(len, owned)) == len(ALL_SLOTS)
    assert set().union(*owned) == ALL_SLOTS
    assert all(cluster.slots_of(port) == set() for port in replicas)


def test_reshard_moves_exactly_the_slots_with_their_keys(cluster: ClusterNodes) -> None:
    # By their lowest slot: the source's first 100 slots then sort before the target's, so
    # moving 100 back from the target moves the same ones.
    source, target, other = sorted(cluster.master_ports(), key=lambda p: min(cluster.slots_of(p)))
    before = {port: cluster.slots_of(port) for port in (source, target, other)}
    key = key_in(set(sorted(before[source])[:100]))
    cli(source, "set", key, "moved along")

    cluster.reshard(source, target, 100)

    after = {port: cluster.slots_of(port) for port in (source, target, other)}
    moved = before[source] - after[source]
    assert len(moved) == 100
    assert after[source] == before[source] - moved
    assert after[target] == before[target] | moved
    assert after[other] == before[other]
    assert key_slot(key.encode()) in moved
    assert cli(target, "get", key).strip() == "moved along"
    assert next(e for e in cluster.cluster_nodes(other) if e.port == target).slots == after[target]

    # Back again, without waiting: reads keep answering while the slots move.
    proc = cluster.reshard_process(target, source, 100, extra=["--cluster-pipeline", "1"])
    assert isinstance(proc, subprocess.Popen)
    reads = 0
    while proc.poll() is None or reads == 0:
        assert cli(other, "get", key).strip() == "moved along"
        reads += 1
    cluster.finish_reshard(proc)
    assert "Moving slot" in cluster.reshard_log(proc)
    assert {port: cluster.slots_of(port) for port in (source, target, other)} == before


def test_a_slot_a_reshard_left_unowned_is_given_back(cluster: ClusterNodes) -> None:
    source, target, _ = sorted(cluster.master_ports(), key=lambda p: min(cluster.slots_of(p)))
    before = cluster.slots_of(source)
    repairs = len(cluster.repairs)
    proc = cluster.reshard_process(source, target, 1)
    assert proc.wait(60) == 0
    (slot,) = before - cluster.slots_of(source)
    # What Redis 7.0 now and then leaves: the new owner's own view names the old one, which
    # has let go of it; no master claims the slot.
    cli(target, "cluster", "setslot", str(slot), "node", cluster.node_id(source))
    assert slot not in cluster.slots_of(target) | cluster.slots_of(source)

    cluster.finish_reshard(proc)

    assert cluster.repairs[repairs:] == [(slot, target)]
    assert slot in cluster.slots_of(target)
    cluster.reshard(target, source, 1)
    assert cluster.slots_of(source) == before


def test_failover_swaps_the_roles(cluster: ClusterNodes) -> None:
    master = cluster.master_ports()[0]
    (replica,) = cluster.replicas_of(master)
    owned = cluster.slots_of(master)

    took = cluster.failover(replica)

    assert took < 5
    assert replica in cluster.master_ports()
    assert master in cluster.replica_ports()
    assert (cluster.role(replica), cluster.role(master)) == ("master", "slave")
    assert cluster.replicas_of(replica) == [master]
    assert cluster.slots_of(replica) == owned
    assert cluster.slots_of(master) == set()

    with pytest.raises(ValueError, match="not a replica"):
        cluster.failover(replica)


def test_a_killed_master_is_replaced_by_its_replica_and_rejoins(cluster: ClusterNodes) -> None:
    master = cluster.master_ports()[-1]
    (replica,) = cluster.replicas_of(master)
    owned = cluster.slots_of(master)

    cluster.kill(master)
    killed = time.monotonic()
    assert master not in cluster.running_ports()
    # Before the node timeout cluster_state stays ok, but its slots are on a dead node (and
    # its replica has lost its link): not ok yet.
    with pytest.raises(AssertionError, match=r"not ok after 0\.5s: (.* down|.* no link)"):
        cluster.wait_ok(timeout=0.5)
    cluster.wait_ok(timeout=NODE_TIMEOUT_MS / 1000 + 8)
    took = time.monotonic() - killed

    assert took > NODE_TIMEOUT_MS / 1000  # no sooner than the node timeout says it failed
    assert cluster.role(replica) == "master"
    assert cluster.slots_of(replica) == owned
    assert master not in cluster.master_ports() + cluster.replica_ports()

    cluster.restart(master)
    cluster.wait_ok()
    assert master in cluster.replica_ports()
    assert cluster.replicas_of(replica) == [master]
    assert cluster.slots_of(master) == set()
