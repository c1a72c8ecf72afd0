"""The pure parts of the Cluster client: slot maps, redirections, node URLs (no server)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from sidecar.cluster import SlotMap, node_url, redirection, remember, seeds
from sidecar.slots import SLOTS, key_slot, slot_tags, tag_slot


def test_a_slot_map_names_the_master_of_every_slot() -> None:
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],  # a node that names no host: the seed's
        [10923, 16383, [b"10.0.0.3", 7002, b"id3"]],
    ]
    m = SlotMap(reply, "seed.example")
    assert m.owners[0] == m.owners[5460] == ("10.0.0.1", 7000)
    assert m.owners[5461] == ("seed.example", 7001)
    assert m.owners[16383] == ("10.0.0.3", 7002)
    assert m.unserved() == 0
    assert m.masters == {
        ("10.0.0.1", 7000): [0],
        ("seed.example", 7001): [5461],
        ("10.0.0.3", 7002): [10923],
    }


def test_slots_no_master_serves_are_counted() -> None:
    m = SlotMap([[0, 99, [b"h", 1, b"id"]]], "h")
    assert m.unserved() == SLOTS - 100
    assert m.owners[100] is None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("MOVED 3999 127.0.0.1:6381", (("127.0.0.1", 6381), False)),
        ("ASK 3999 10.0.0.2:7000", (("10.0.0.2", 7000), True)),
        ("MOVED 12 :7001", (("seed", 7001), False)),
        ("MOVED 12 ::1:7001", (("::1", 7001), False)),
        ("TRYAGAIN Multiple keys request during rehashing of slot", (None, False)),
        ("CLUSTERDOWN The cluster is down", None),
        ("NOSCRIPT No matching script", None),
    ],
)
def test_redirections_are_read(error: str, expected: object) -> None:
    assert redirection(error, "seed") == expected


@pytest.mark.parametrize(
    ("seed", "addr", "url"),
    [
        ("redis://127.0.0.1:7000/0", ("10.0.0.2", 7001), "redis://10.0.0.2:7001/0"),
        ("rediss://u:p%40w@h:7000/0", ("10.0.0.2", 7001), "rediss://u:p%40w@10.0.0.2:7001/0"),
        ("redis://:pw@h/0?x=1", ("::1", 7001), "redis://:pw@[::1]:7001/0?x=1"),
        ("unix:///run/redis.sock", ("127.0.0.1", 7001), "redis://127.0.0.1:7001/0"),
    ],
)
def test_a_nodes_url_keeps_the_seeds_scheme_and_credentials(
    seed: str, addr: tuple[str, int], url: str
) -> None:
    assert node_url(urlsplit(seed), addr) == url


def test_the_masters_seen_are_the_seeds_after_the_url() -> None:
    url = "redis://:pw@node-a:7000/0"
    assert seeds(url) == [url]
    remember(url, SlotMap([[0, 16383, [b"10.0.0.9", 7009, b"id"]]], "node-a"))
    assert seeds(url) == [url, "redis://:pw@10.0.0.9:7009/0"]


def test_slot_tags_land_in_their_slots() -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS
    assert all(tag_slot(t.encode()) == s for s, t in enumerate(tags))
    # A key's slot is its tag's: the first {...} that is not empty.
    assert key_slot("wacrm:key:{abc}") == tag_slot(b"abc")
    assert key_slot("a{}b{c}") == tag_slot(b"a{}b{c}")
    assert key_slot("open{only") == tag_slot(b"open{only")
