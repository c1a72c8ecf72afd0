"""Make Redis hold what the key table says: a full reconcile, or a refresh of a few rows.

Every write carries a version read from Redis's clock *before* the rows it writes were read
(see `sidecar.records`), so a reconcile that read the table just before a revocation can
never write the revoked key back, whatever order the writes reach Redis in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from binascii import unhexlify
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from loader.mirror import Mirror, unversioned
from loader.pipe import Batch
from loader.rows import KeyRow, KeyRules, is_valid_hash, judge
from loader.source import Changes, Source
from sidecar.records import KeyRecord

log = logging.getLogger(__name__)

#: Problems logged one by one per reconcile; the rest are only counted.
MAX_PROBLEMS_LOGGED = 20
#: Full reconciles tried in a row while Redis keeps losing its data under them.
MAX_ATTEMPTS = 3


@dataclass(slots=True)
class Report:
    """What a reconcile or refresh did."""

    version: int = 0
    active: int = 0
    written: int = 0
    kept_out: int = 0
    deleted: int = 0
    skipped: int = 0
    problems: int = 0
    seconds: float = 0.0
    #: False when Redis lost its data while the reconcile ran.
    complete: bool = True


class _Problems:
    """Log each row's problems, naming the key, up to a limit; count the rest."""

    def __init__(self) -> None:
        self.count = 0

    def note(self, key_id: str, problems: tuple[str, ...]) -> None:
        for problem in problems:
            self.count += 1
            if self.count <= MAX_PROBLEMS_LOGGED:
                log.warning("key %s: %s", key_id, problem, extra={"key_id": key_id})

    def summarise(self) -> None:
        if self.count > MAX_PROBLEMS_LOGGED:
            log.warning(
                "%d more problems in the key table not logged", self.count - MAX_PROBLEMS_LOGGED
            )


async def reconcile(
    source: Source,
    reads: Mirror,
    writes: Mirror,
    *,
    rules: KeyRules,
    batch_size: int,
) -> Report:
    """Make Redis hold exactly the active keys of *source*, writing only the differences.

    *reads* and *writes* are two connections to the same Redis, so comparisons are not
    queued behind the writes in flight.  Records are never removed and re-added, so a
    valid key is never missing, not even briefly.  When Redis loses its data while this
    runs (a restart or flush between its writes), it starts over.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with _no_cyclic_gc():
            report = await _reconcile(source, reads, writes, rules, batch_size)
        if report.complete:
            break
        log.warning("Redis lost its data during the reconcile (attempt %d); starting over", attempt)
    return report


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cycle collector: a million rows would make it rescan the heap for seconds.

    Nothing a reconcile allocates forms cycles that must be freed before it ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def _reconcile(
    source: Source,
    reads: Mirror,
    writes: Mirror,
    rules: KeyRules,
    batch_size: int,
) -> Report:
    started = time.monotonic()
    report = Report(version=await reads.version())
    await writes.begin_load()
    version = report.version
    seen: set[bytes] = set()
    problems = _Problems()
    puts = Batch()
    seen_add = seen.add
    async for rows in _prefetch(source.snapshot(batch_size)):
        hashes: list[str] = []
        records: list[KeyRecord] = []
        for row in rows:
            record, trouble = judge(row, rules, version)
            if trouble:
                problems.note(row[0], trouble)
            if record is None:
                report.skipped += 1
            else:
                hashes.append(row[5])
                records.append(record)
                seen_add(unhexlify(row[5]))
        stored = await reads.fetch(hashes)
        changed = []
        for key_hash, record, raw in zip(hashes, records, stored, strict=True):
            body = unversioned(record)
            if raw is None or raw[raw.find(b",") :] != body:
                changed.append((key_hash, body, record.expires_at_ms))
        await writes.put_bodies(changed, version=version, batch=puts)
        report.active += len(hashes)
    deletes = Batch()
    async for page in reads.scan_hashes():
        gone = [h.decode() for h in page if not _seen(seen, h)]
        await writes.delete(gone, version=version, batch=deletes)
    await writes.wait(puts)
    await writes.wait(deletes)
    report.complete = await writes.mark_loaded(version)
    problems.summarise()
    report.written, report.kept_out = puts.applied, puts.kept_out + deletes.kept_out
    report.deleted = deletes.applied
    report.problems = problems.count
    report.seconds = time.monotonic() - started
    log.info(
        "reconciled: %d active keys, %d written, %d kept out by newer changes, %d deleted,"
        " %d rows skipped, in %.2f s",
        report.active,
        report.written,
        report.kept_out,
        report.deleted,
        report.skipped,
        report.seconds,
        extra={"version": version},
    )
    return report


async def refresh(source: Source, mirror: Mirror, changes: Changes, *, rules: KeyRules) -> Report:
    """Re-read the rows named by *changes* and make Redis agree with them now."""
    started = time.monotonic()
    version = await mirror.version()
    rows = await source.rows(changes)
    puts: dict[str, KeyRecord] = {}
    gone = {h for h in changes.key_hashes if is_valid_hash(h)}
    problems = _Problems()
    for row in rows:
        record, trouble = judge(row, rules, version)
        problems.note(row.key_id, trouble)
        if record is not None:
            puts[row.key_hash] = record
        elif is_valid_hash(row.key_hash):
            gone.add(row.key_hash)
    gone -= puts.keys()
    put_tally, delete_tally = Batch(), Batch()
    await mirror.put(puts.items(), version=version, batch=put_tally)
    await mirror.delete(sorted(gone), version=version, batch=delete_tally)
    await mirror.wait(put_tally)
    await mirror.wait(delete_tally)
    return Report(
        version=version,
        active=len(puts),
        written=put_tally.applied,
        kept_out=put_tally.kept_out + delete_tally.kept_out,
        deleted=delete_tally.applied,
        problems=problems.count,
        seconds=time.monotonic() - started,
    )


def _seen(seen: set[bytes], key_hash: bytes) -> bool:
    try:
        return unhexlify(key_hash) in seen
    except ValueError:  # binascii.Error: not hex
        return False


async def _prefetch(chunks: AsyncIterator[list[KeyRow]]) -> AsyncIterator[list[KeyRow]]:
    """Yield *chunks* while the next one is already being read."""
    queue: asyncio.Queue[list[KeyRow] | BaseException | None] = asyncio.Queue(maxsize=2)

    async def produce() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(None)
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put(e)

    task = asyncio.create_task(produce())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
