"""The gate on a real Redis Cluster: found from any node, every slot served, keys managed.

The tests that change the Cluster (resharding, failover, a node lost) are in
``test_cluster_load.py``; these share one Cluster, each under a Redis prefix of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from demo import procs
from loader.mirror import Mirror
from loader.pipe import Batch, ClusterPipe, Pipe
from sidecar.apikeys import mint
from sidecar.records import KeyRecord, Keyspace, RateLimit, decode, hash_key
from sidecar.resp import RedisUnavailable, RespClient
from sidecar.slots import SLOTS, key_slot, slot_tags, tag_slot
from sidecar.store import NOT_LOADED, KeyStore, Lookup, StoreUnavailable
from tests.cluster import ClusterNodes
from tests.e2e import rawhttp

FOUND = "is a node of a Redis Cluster: 3 masters serve 16384 of 16384 slots"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    nodes = ClusterNodes(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


def keys_in_every_slot() -> dict[int, str]:
    """Return a plaintext key whose record lands in each slot (about 160,000 tries)."""
    found: dict[int, str] = {}
    while len(found) < SLOTS:
        plaintext = mint().plaintext
        found.setdefault(tag_slot(hash_key(plaintext).encode()), plaintext)
    return found


def record(i: int) -> KeyRecord:
    return KeyRecord(f"key-{i}", "acc-1", "Acme", f"wacrm_live_{i:08d}", ("contacts:read",))


async def load(url: str, ks: Keyspace, records: dict[str, KeyRecord]) -> Mirror:
    """Write *records* (hash -> record) as a full reconcile does, marks included."""
    mirror = await Mirror.open(url, ks, connect_timeout=2)
    version = await mirror.version()
    await mirror.begin_load()
    batch = Batch()
    await mirror.put(records.items(), version=version, batch=batch)
    await mirror.wait(batch)
    assert await mirror.mark_loaded(version)
    assert batch.applied == len(records)
    return mirror


async def test_slots_are_computed_as_the_cluster_does(cluster: ClusterNodes) -> None:
    node = RespClient(cluster.urls[0], timeout=2, cluster_node=True)
    ks = Keyspace("t1:")
    keys = [
        ks.record(hash_key("x")),
        ks.rate(hash_key("y")),
        ks.used,
        ks.lock,
        "plain",
        "{}empty-tag",
        "a{b}c{d}",
        "open{only",
        "é{ü}",
        *(f"k{i}" for i in range(300)),
    ]
    try:
        slots = await asyncio.gather(*(node.execute("CLUSTER", "KEYSLOT", k) for k in keys))
        assert [key_slot(k) for k in keys] == slots
        sample = range(0, SLOTS, 7)
        marks = await asyncio.gather(
            *(node.execute("CLUSTER", "KEYSLOT", ks.loaded_in(s)) for s in sample)
        )
        assert marks == list(sample)
    finally:
        await node.aclose()
    assert len(set(slot_tags())) == SLOTS


async def test_any_node_leads_to_the_whole_cluster(cluster: ClusterNodes) -> None:
    for url in cluster.urls:
        client = RespClient(url, timeout=2)
        try:
            assert await KeyStore(client, Keyspace("t2:"), None).problem() is None
            assert client.cluster is not None
            assert sorted(p for _, p in client.cluster.map.masters) == sorted(cluster.ports)
            assert client.cluster.map.unserved() == 0
        finally:
            await client.aclose()
    pipe = await Mirror.open(cluster.urls[1], Keyspace("t2:"), connect_timeout=2)
    try:
        assert isinstance(pipe.pipe, ClusterPipe)
        assert await pipe.problem() is None
    finally:
        await pipe.close()
    # The one-node pipe says what it met, rather than be redirected key by key.
    with pytest.raises(RedisUnavailable, match="is a node of a Redis Cluster"):
        await Pipe.open(cluster.urls[2], connect_timeout=2)


async def test_keys_in_every_slot_are_found_under_concurrency(cluster: ClusterNodes) -> None:
    ks = Keyspace("t3:")
    plaintexts = keys_in_every_slot()
    records = {hash_key(p): record(slot) for slot, p in plaintexts.items()}
    mirror = await load(cluster.urls[0], ks, records)
    await mirror.close()
    unknown = [hash_key(mint().plaintext) for _ in range(3000)]

    client = RespClient(cluster.urls[1], timeout=2)
    store = KeyStore(client, ks, None)
    try:
        hashes = [*records, *unknown]
        found = await asyncio.gather(*(store.check(h) for h in hashes))
        assert client.cluster is not None
        assert len(client.cluster.nodes) == 3  # one connection per master
    finally:
        await client.aclose()
    for h, answer in zip(hashes, found, strict=True):
        if h in records:
            assert isinstance(answer, Lookup)
            assert decode(answer.raw) == records[h]
        else:
            assert answer is None


def test_the_sidecar_says_what_it_found_and_serves_every_master(
    tmp_path: Path, cluster: ClusterNodes
) -> None:
    ks = Keyspace("t4:")
    plaintexts = list(keys_in_every_slot().values())[::41]  # 400 keys, spread over all
    records = {hash_key(p): record(i) for i, p in enumerate(plaintexts)}
    asyncio.run(_load_and_close(cluster.urls[2], ks, records))
    sidecar = procs.sidecar(
        tmp_path, redis_url=cluster.urls[1], extra_env={"WACRM_REDIS_PREFIX": ks.prefix}
    )
    sidecar.start()
    try:
        assert rawhttp.request(sidecar.port, "/readyz").status == 200
        statuses = asyncio.run(_forward_auth(sidecar.port, [*plaintexts, mint().plaintext]))
    finally:
        sidecar.stop()
    assert statuses[:-1] == [(200, f"key-{i}") for i in range(len(plaintexts))]
    assert statuses[-1] == (401, None)
    assert FOUND in sidecar.log.read_text()


async def _load_and_close(url: str, ks: Keyspace, records: dict[str, KeyRecord]) -> None:
    await (await load(url, ks, records)).close()


async def _forward_auth(port: int, plaintexts: list[str]) -> list[tuple[int, str | None]]:
    """Ask the sidecar's /forward-auth for each key, 32 at a time: (status, key id)."""
    limit = asyncio.Semaphore(32)

    async def ask(session: aiohttp.ClientSession, plaintext: str) -> tuple[int, str | None]:
        async with (
            limit,
            session.get(
                f"http://127.0.0.1:{port}/forward-auth",
                headers={
                    "X-Forwarded-Method": "GET",
                    "X-Forwarded-Uri": "/api/v1/contacts",
                    "Authorization": f"Bearer {plaintext}",
                },
            ) as r,
        ):
            await r.read()
            return r.status, r.headers.get("X-Wacrm-Key-Id")

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(ask(session, p) for p in plaintexts)))


async def test_a_slot_without_its_mark_answers_not_loaded_and_the_loader_sees_it(
    cluster: ClusterNodes,
) -> None:
    ks = Keyspace("t5:")
    mirror = await load(cluster.urls[0], ks, {})
    client = RespClient(cluster.urls[0], timeout=2)
    store = KeyStore(client, ks, None)
    try:
        # A master that restarts empty loses the marks of its slots, and only those.
        lost = [h for h in (hash_key(mint().plaintext) for _ in range(200))]
        gone_slot = tag_slot(lost[0].encode())
        await client.execute("DEL", ks.loaded_in(gone_slot), slot=gone_slot)
        answers = await asyncio.gather(*(store.check(h) for h in lost))
        for h, answer in zip(lost, answers, strict=True):
            assert answer is (NOT_LOADED if tag_slot(h.encode()) == gone_slot else None)
        # The loader looks at each master's first slot: it notices a master emptied.
        assert isinstance(mirror.pipe, ClusterPipe)
        firsts = [slots[0] for slots in mirror.pipe.map.masters.values()]
        assert await mirror.is_loaded()
        await client.execute("DEL", ks.loaded_in(firsts[1]), slot=firsts[1])
        assert not await mirror.is_loaded()
    finally:
        await client.aclose()
        await mirror.close()


async def test_deletes_are_versioned_and_nothing_revoked_comes_back(
    cluster: ClusterNodes,
) -> None:
    ks = Keyspace("t6:")
    hashes = [hash_key(mint().plaintext) for _ in range(500)]
    records = {h: record(i) for i, h in enumerate(hashes)}
    mirror = await load(cluster.urls[0], ks, records)
    try:
        old = await mirror.version()
        await asyncio.sleep(0.005)
        newer = await mirror.version()
        deletes = Batch()
        await mirror.delete(hashes[:250], version=newer, batch=deletes)
        await mirror.wait(deletes)
        assert deletes.applied == 250
        # An older snapshot writes the revoked keys again: their tombstones keep them out.
        again = Batch()
        await mirror.put(((h, records[h]) for h in hashes[:300]), version=old, batch=again)
        await mirror.wait(again)
        assert again.kept_out == 250
        stored = await mirror.fetch(hashes)
        assert [s is None for s in stored] == [i < 250 for i in range(500)]
        assert stored[300] is not None and decode(stored[300]) == records[hashes[300]]
    finally:
        await mirror.close()


def test_the_loader_commands_work_on_a_cluster(tmp_path: Path, cluster: ClusterNodes) -> None:
    db = tmp_path / "keys.db"
    env = {**os.environ, "WACRM_SOURCE": f"sqlite:///{db}", "WACRM_REDIS_URL": cluster.urls[2]}

    def loader(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "loader", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        return done

    account = loader("accounts", "create", "Acme").stdout.split()[-1]
    minted = []
    for i in range(6):  # six keys: several masters hold one
        made = loader(
            "keys", "create", "--account", account, "--name", f"k{i}", "--scope", "contacts:read"
        )
        assert "Redis not reachable" not in made.stdout + made.stderr
        minted.append(made.stdout.split()[-1])
    ids = {
        (row := json.loads(line))["name"]: row["id"]
        for line in loader("keys", "list", "--json").stdout.splitlines()
    }
    sidecar = procs.sidecar(tmp_path, redis_url=cluster.urls[0])
    sidecar.start()
    try:
        # `keys create` wrote each key into its master at once: no sync needed.
        assert [s for s, _ in asyncio.run(_forward_auth(sidecar.port, minted))] == [200] * 6
        assert "reconciled: 6 active keys" in loader("sync").stderr
        # Revoked by the command: refused at once.  Revoked in the table: after a sync.
        loader("keys", "revoke", ids["k0"])
        assert asyncio.run(_forward_auth(sidecar.port, minted[:1])) == [(401, None)]
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = '2026-01-01T00:00:00Z' WHERE id = ?",
                (ids["k1"],),
            )
        assert "1 deleted" in loader("sync").stderr
        statuses = asyncio.run(_forward_auth(sidecar.port, minted))
    finally:
        sidecar.stop()
    assert [s for s, _ in statuses] == [401, 401, 200, 200, 200, 200]


async def test_a_slot_in_migration_is_followed_by_ask_then_moved(cluster: ClusterNodes) -> None:
    """A slot halfway to another master: a check whose keys all moved is answered there (ASK,
    after ASKING); one whose keys are split is refused (TRYAGAIN: 503), and a write waits for
    the slot to settle.  Once the slot has moved, the stale map is corrected (MOVED)."""
    ks = Keyspace("t7:")
    h = hash_key(mint().plaintext)
    slot = tag_slot(h.encode())
    other = next(
        o for o in (hash_key(str(i)) for i in range(10**6)) if tag_slot(o.encode()) == slot
    )
    mirror = await load(cluster.urls[0], ks, {h: record(7)})
    client = RespClient(cluster.urls[0], timeout=2)
    store = KeyStore(client, ks, RateLimit(1000, 60_000))  # so each check keeps rate state
    assert isinstance(mirror.pipe, ClusterPipe)
    source = mirror.pipe.map.owners[slot]
    assert source is not None
    target = next(a for a in mirror.pipe.masters if a != source)
    nodes = {
        a: RespClient(f"redis://{a[0]}:{a[1]}/0", timeout=2, cluster_node=True)
        for a in mirror.pipe.masters
    }
    try:
        assert isinstance(await store.check(h), Lookup)
        ids = {a: (await n.execute("CLUSTER", "MYID")).decode() for a, n in nodes.items()}
        await nodes[target].execute("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await nodes[source].execute("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        keys = [ks.record(h), ks.rate(h), ks.loaded_in(slot)]
        await nodes[source].execute("MIGRATE", *target, "", 0, 5000, "KEYS", *keys)
        # Every key of the check moved: ASK to the target, which answers after ASKING.
        found = await store.check(h)
        assert isinstance(found, Lookup) and decode(found.raw) == record(7)
        # A key of the slot without rate state there: its check spans moved and missing keys.
        with pytest.raises(StoreUnavailable, match="TRYAGAIN"):
            await store.check(other)
        # A revocation's delete (record and tombstone, which is missing) waits for the slot.
        deletes = Batch()
        await mirror.delete([h], version=await mirror.version(), batch=deletes)
        waiting = asyncio.ensure_future(mirror.wait(deletes))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        # The slot's other keys (other tests' records) move too, then the slot itself.
        while rest := await nodes[source].execute("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await nodes[source].execute("MIGRATE", *target, "", 0, 5000, "KEYS", *rest)
        for n in nodes.values():
            await n.execute("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        assert (await asyncio.wait_for(waiting, 5)).applied == 1
        assert await store.check(h) is None  # deleted on the target, whose mark says loaded
        assert client.cluster is not None and client.cluster.map.owners[slot] == target
    finally:
        for n in nodes.values():
            await n.aclose()
        await client.aclose()
        await mirror.close()
