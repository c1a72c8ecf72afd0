"""The gate on a Redis Cluster that changes under load: resharding, failover, a master lost.

nginx, the sidecar and ``loader run`` reach the Cluster through one node's URL.  Every request
of the load is recorded and judged (see `tests.e2e.load`): no key is accepted by a request
that started after Redis acknowledged its revocation, and valid keys are served again within
seconds, with no restart.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from sidecar.records import KeyRecord, Keyspace, hash_key
from sidecar.slots import tag_slot
from tests.cluster import ClusterNodes
from tests.e2e import rawhttp
from tests.e2e.load import Deployment, Key, Load, revoked_keys_accepted, wait_valid_keys_back
from tests.e2e.test_cluster import load, record

KS = Keyspace()
#: Records under another prefix, so that a resharding has keys to move besides the test's.
FILLER = 30_000


class ClusterDeployment(Deployment):
    """The gate reaching the Redis Cluster *nodes* through the URL of its first node."""

    def __init__(self, workdir: Path, nodes: ClusterNodes, seed: int = 0) -> None:
        super().__init__(workdir, nodes.urls[seed], self._loaded)
        self.nodes = nodes

    def _loaded(self) -> int | None:
        """The oldest loaded mark of the first slot of each master (None: one is missing)."""
        marks = []
        try:
            for port in self.nodes.master_ports():
                with redis_sync.Redis(port=port) as r:
                    mark = r.get(KS.loaded_in(min(self.nodes.slots_of(port))))
                if mark is None:
                    return None
                marks.append(int(mark))
        except (redis_sync.RedisError, OSError, ValueError):
            return None
        return min(marks) if marks else None

    def master_of(self, key: Key) -> int:
        slot = tag_slot(hash_key(key.plaintext).encode())
        return next(p for p in self.nodes.master_ports() if slot in self.nodes.slots_of(p))


@pytest.fixture
def gate(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterDeployment]:
    nodes = ClusterNodes(tmp_path / "cluster", replicas=getattr(request, "param", 0))
    nodes.start()
    deployment = ClusterDeployment(tmp_path, nodes)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
        nodes.stop()


def _roles(moving: list[Key]) -> tuple[list[Key], list[Key], list[Key]]:
    """Split the keys of the master that changes: kept valid, revoked before, and during."""
    assert len(moving) >= 5, "too few keys on the master that changes; mint more"
    return moving[:2], moving[2:3], moving[3:]


def _under_load(
    gate: ClusterDeployment, keys: list[Key], revoked: list[Key]
) -> tuple[Load, list[threading.Thread]]:
    """Start the load on *keys*; after 0.3 s of it, revoke *revoked* (Redis acknowledging)."""
    load = Load(gate.nginx.port, keys)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        for k in revoked:
            gate.revoke(k)
            assert k.revoked_at is not None
    except BaseException:
        _stop(load, threads)
        raise
    return load, threads


def _stop(load: Load, threads: list[threading.Thread]) -> None:
    load.stop.set()
    for t in threads:
        t.join()


def _judge(gate: ClusterDeployment, load: Load, revoked: list[Key], valid: list[Key]) -> str:
    """Assert what the load saw; return a line of figures."""
    statuses = {r.status for r in load.sent}
    assert statuses <= {200, 401, 503}, statuses
    accepted = revoked_keys_accepted(load)
    assert accepted == [], accepted[:5]
    for k in revoked:
        assert gate.status(k) == 401
    for k in valid:
        assert gate.status(k) == 200
    assert gate.sidecar.running and gate.loader.running
    unavailable = [r for r in load.sent if r.status == 503]
    span = (unavailable[-1].ended - unavailable[0].started) if unavailable else 0.0
    return (
        f"{len(load.sent)} requests, {len(unavailable)} answered 503 over {span:.2f} s;"
        f" revoked keys accepted: {len(accepted)}"
    )


def test_a_resharding_under_load_accepts_no_revoked_key(gate: ClusterDeployment) -> None:
    nodes = gate.nodes
    filler = {hash_key(f"filler {i}"): record(i) for i in range(FILLER)}
    asyncio.run(_fill(nodes.urls[1], filler))
    keys = gate.mint(30)
    source, target = nodes.master_ports()[:2]
    moving = [k for k in keys if gate.master_of(k) == source]
    valid, before, during = _roles(moving)
    pids = (gate.sidecar.proc.pid, gate.loader.proc.pid)  # type: ignore[union-attr]

    load, threads = _under_load(gate, keys, before)
    try:
        started = time.monotonic()
        # Every slot of the source moves, with its keys (the filler's too).
        reshard = nodes.reshard_process(source, target, len(nodes.slots_of(source)))
        for k in during:  # revoked while slots move, a few at a time
            time.sleep(0.3)
            gate.revoke(k)
        nodes.finish_reshard(reshard)
        finished = time.monotonic()
        recovered = wait_valid_keys_back(load, valid, after=finished, within=10.0)
        time.sleep(0.5)
    finally:
        _stop(load, threads)

    assert nodes.slots_of(source) == set()
    assert all(gate.master_of(k) == target for k in moving)
    assert all(k.revoked_at is not None for k in before + during)
    figures = _judge(gate, load, before + during, valid + [k for k in keys if k not in moving])
    assert (gate.sidecar.proc.pid, gate.loader.proc.pid) == pids  # type: ignore[union-attr]
    print(
        f"\nresharding {finished - started:.2f} s with {FILLER} other records: {figures};"
        f" valid keys served {recovered:.2f} s after it ended"
    )
    assert recovered < 5.0


async def _fill(url: str, records: dict[str, KeyRecord]) -> None:
    await (await load(url, Keyspace("filler:"), records)).close()


@pytest.mark.parametrize("gate", [1], indirect=True, ids=["replicas"])
@pytest.mark.parametrize("how", ["cluster failover", "master killed"])
def test_a_failover_under_load_accepts_no_revoked_key(gate: ClusterDeployment, how: str) -> None:
    nodes = gate.nodes
    keys = gate.mint(30)
    old = gate.master_of(keys[0])
    (new,) = nodes.replicas_of(old)
    valid, before, during = _roles([k for k in keys if gate.master_of(k) == old])

    load, threads = _under_load(gate, keys, before)
    try:
        started, started_ms = time.monotonic(), int(time.time() * 1000)
        if how == "master killed":
            nodes.kill(old)
        else:
            nodes.failover(new)
        for k in during:
            gate.revoke(k)
            time.sleep(0.3)
        recovered = wait_valid_keys_back(load, valid, after=started, within=15.0)
        time.sleep(0.5)
    finally:
        _stop(load, threads)

    assert nodes.role(new) == "master"
    # A revocation while its master was down was not acknowledged (`keys revoke` says the
    # loader will catch up): the full reconcile of the loader's next session makes it.
    caught_up = gate.wait_loaded(newer_than_ms=started_ms) if how == "master killed" else 0.0
    figures = _judge(gate, load, before + during, valid)
    print(
        f"\n{how}: {figures}; valid keys back to 200 {recovered:.2f} s after it began;"
        f" revocations acknowledged during it: {sum(k.revoked_at is not None for k in during)}"
        f" of {len(during)}; the loader reconciled again {caught_up:.2f} s after the load"
    )
    assert recovered < (10.0 if how == "master killed" else 5.0)


def test_a_master_lost_makes_both_unready_and_its_return_empty_is_reloaded(
    gate: ClusterDeployment,
) -> None:
    nodes = gate.nodes
    keys = gate.mint(12)
    lost = gate.master_of(keys[0])
    on_lost = [k for k in keys if gate.master_of(k) == lost]
    elsewhere = [k for k in keys if gate.master_of(k) != lost]
    assert rawhttp.request(gate.sidecar.port, "/readyz").status == 200
    nodes.kill(lost)
    # The keys of the lost master's slots are refused with 503; the others are served.
    assert [gate.status(k) for k in on_lost] == [503] * len(on_lost)
    assert [gate.status(k) for k in elsewhere] == [200] * len(elsewhere)
    assert rawhttp.request(gate.sidecar.port, "/readyz").status == 503
    assert _ready_within(gate.loader_port, 503, 5.0)
    # Back with no data (no persistence): 503, not 401, until the loader has reloaded it.
    nodes.restart(lost)
    nodes.wait_ok()
    seen: list[int] = []
    started = time.monotonic()
    while time.monotonic() - started < 10:
        seen.append(gate.status(on_lost[0]))
        if seen[-1] == 200:
            break
        time.sleep(0.02)
    took = time.monotonic() - started
    assert set(seen) <= {200, 503} and seen[-1] == 200, seen
    assert [gate.status(k) for k in on_lost] == [200] * len(on_lost)
    assert rawhttp.request(gate.sidecar.port, "/readyz").status == 200
    assert _ready_within(gate.loader_port, 200, 5.0)
    print(f"\nmaster back empty: served again {took:.2f} s after the Cluster was ok")


def _ready_within(port: int, status: int, seconds: float) -> bool:
    """Tell whether /readyz on *port* answers *status* within *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rawhttp.request(port, "/readyz").status == status:
            return True
        time.sleep(0.05)
    return False
