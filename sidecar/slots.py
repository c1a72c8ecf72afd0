"""Redis Cluster's key slots: which of the 16,384 slots a Redis key lives in.

A Cluster hashes a key to a slot with CRC16 (XMODEM), of the key's hash tag when it has one:
the part between its first ``{`` and the next ``}``, when that part is not empty.  Every
per-key Redis key of the gate carries the key hash as its tag (see `sidecar.records`), so a
key's record, tombstone and rate state share a slot.
"""

from __future__ import annotations

import binascii
import functools

#: How many slots a Redis Cluster has.
SLOTS = 16384


def tag_slot(tag: bytes) -> int:
    """Return the slot of a key whose hash tag is *tag*."""
    return binascii.crc_hqx(tag, 0) & (SLOTS - 1)


def key_slot(key: str | bytes) -> int:
    """Return the slot of the Redis key *key*, as a Redis Cluster computes it."""
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1 : end]
    return tag_slot(k)


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """Return, for each slot, a short hash tag that lands in it (found once, in about 0.2 s)."""
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = b"%x" % n
        slot = tag_slot(tag)
        if tags[slot] is None:
            tags[slot] = tag.decode()
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)
