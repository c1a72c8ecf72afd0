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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from loader.mirror import Mirror
from loader.pipe import Batch
from loader.rows import KeyRow, KeyRules, is_valid_hash, judge, judge_fields
from loader.source import Changes, Source
from sidecar.records import Fields, KeyRecord, body_of, body_of_fields

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Problems logged one by one per reconcile; the rest are only counted.
MAX_PROBLEMS_LOGGED = 20
#: Full reconciles tried in a row while Redis keeps losing its data under them.
MAX_ATTEMPTS = 3
_HEX_BYTES = b"0123456789abcdef"


@runtime_checkable
class BodySource(Protocol):
    """A source that can build each key's record body itself (see `PostgresSource.bodies`)."""

    def bodies(
        self, batch: int, *, version: int, rules: KeyRules
    ) -> AsyncIterator[list[tuple[str | None, bytes | None]]]:
        """Yield (hash or None if expired, body or None) of every unrevoked key."""
        ...


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
    # Comparing the source's own record bodies only pays when Redis already holds most
    # keys; into an empty Redis every key is written, so every row is judged here anyway.
    warm = isinstance(source, BodySource) and await reads.is_loaded()
    await writes.begin_load()
    run = _Run(source, reads, writes, rules, report)
    # Look for records to delete while the rows are read: SCAN returns every record that
    # exists throughout, which is every stray the reconcile must remove.
    strays = asyncio.create_task(_unseen(writes, run.seen))
    try:
        if isinstance(source, BodySource) and warm:
            chunks = source.bodies(batch_size, version=report.version, rules=rules)
            # Each batch's MGET is sent before the previous batch is settled, so Redis
            # answers one while the loader compares the other.
            asked: _Asked | None = None
            try:
                async for bodies in _prefetch(chunks):
                    previous, asked = asked, run.ask(bodies)
                    if previous is not None:
                        await run.settle(previous)
                if asked is not None:
                    await run.settle(asked)
            finally:
                if asked is not None:
                    asked.stored.cancel()
        else:
            async for rows in _prefetch(source.snapshot(batch_size)):
                await run.load_rows(rows, compare=False)
        candidates = await strays
    finally:
        strays.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await strays
    deletes = Batch()
    seen = run.seen
    gone = reads.keyspace.hashes_in([k for k in candidates if k not in seen])
    for i in range(0, len(gone), batch_size):
        await writes.delete(gone[i : i + batch_size], version=report.version, batch=deletes)
    await writes.wait(run.puts)
    await writes.wait(deletes)
    report.complete = await writes.mark_loaded(report.version)
    run.problems.summarise()
    report.written, report.kept_out = run.puts.applied, run.puts.kept_out + deletes.kept_out
    report.deleted = deletes.applied
    report.problems = run.problems.count
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
        extra={"version": report.version},
    )
    return report


@dataclass(slots=True)
class _Asked:
    """A batch of bodies whose stored records are being read."""

    keys: list[bytes]
    expected: list[bytes]
    #: Hashes to judge again whatever Redis holds.
    again: list[str]
    stored: asyncio.Future[list[bytes | None]]


class _Run:
    """The state of one full reconcile: what it has seen, written and complained about."""

    def __init__(
        self, source: Source, reads: Mirror, writes: Mirror, rules: KeyRules, report: Report
    ) -> None:
        self.source = source
        self.reads = reads
        self.writes = writes
        self.rules = rules
        self.report = report
        #: The Redis keys of the records Redis must hold; every other record is deleted.
        self.seen: set[bytes] = set()
        self.problems = _Problems()
        self.puts = Batch()

    async def load_rows(self, rows: Sequence[KeyRow], *, compare: bool = True) -> None:
        """Judge *rows* here, and write the records that Redis does not hold as they are.

        Without *compare*, write every record without reading Redis first: cheaper when
        Redis holds next to nothing (the write itself leaves an identical record alone).
        """
        report, version, rules = self.report, self.report.version, self.rules
        note = self.problems.note
        hashes: list[str] = []
        records: list[Fields] = []
        for row in rows:
            record, trouble = judge_fields(row, rules, version)
            if trouble:
                note(row[0], trouble)
            if record is None:
                report.skipped += 1
            else:
                hashes.append(row[5])
                records.append(record)
        keys = self.reads.keyspace.record_keys(hashes)
        self.seen.update(keys)
        if compare:
            stored = await self.reads.fetch_keys(keys)
            changed = []
            for key_hash, record, raw in zip(hashes, records, stored, strict=True):
                body = body_of_fields(record)
                if raw is None or body_of(raw) != body:
                    changed.append((key_hash, body, record[5]))
        else:
            changed = [(h, body_of_fields(r), r[5]) for h, r in zip(hashes, records, strict=True)]
        await self.writes.put_bodies(changed, version=version, batch=self.puts)
        report.active += len(hashes)

    def ask(self, bodies: Sequence[tuple[str | None, bytes | None]]) -> _Asked:
        """Sort *bodies* out and start reading the records they are compared with.

        A body equal to the stored record proves the record current: the source builds
        either ``encode``'s exact bytes or bytes the loader never writes.  Every other row
        is read again, judged and written as in `load_rows` (see `settle`).
        """
        hashes: list[str] = []
        expected: list[bytes] = []
        again: list[str] = []
        skipped = 0
        for key_hash, body in bodies:
            if key_hash is None:
                skipped += 1  # expired
            elif body is None:
                again.append(key_hash)
            else:
                hashes.append(key_hash)
                expected.append(body)
        self.report.skipped += skipped
        if "".join(hashes).encode().translate(None, _HEX_BYTES):
            # Some hash is not lowercase hex (rare): leave those to load_rows().
            valid = [is_valid_hash(h) for h in hashes]
            again += [h for h, ok in zip(hashes, valid, strict=True) if not ok]
            expected = [b for b, ok in zip(expected, valid, strict=True) if ok]
            hashes = [h for h, ok in zip(hashes, valid, strict=True) if ok]
        # A hash of the wrong length names no record the loader writes: it differs below.
        keys = self.reads.keyspace.record_keys(hashes)
        return _Asked(keys, expected, again, asyncio.ensure_future(self.reads.fetch_keys(keys)))

    async def settle(self, asked: _Asked) -> None:
        """Keep the keys of *asked* that Redis holds as they are; judge the others again."""
        keys, expected, again = asked.keys, asked.expected, asked.again
        stored = await asked.stored
        held = [
            key
            for key, body, raw in zip(keys, expected, stored, strict=True)
            if raw and body_of(raw) == body
        ]
        self.seen.update(held)
        self.report.active += len(held)
        if len(held) < len(keys):
            kept = set(held)
            again += self.reads.keyspace.hashes_in([k for k in keys if k not in kept])
        if again:
            # The rows as they are now, not as the snapshot had them: anything read after
            # the version may be written at it (refresh does the same).
            await self.load_rows(await self.source.rows(Changes(key_hashes=set(again))))


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


async def _unseen(mirror: Mirror, seen: set[bytes]) -> list[bytes]:
    """Return the Redis keys of the stored records not in *seen* (yet) as SCAN finds them."""
    out: list[bytes] = []
    async for page in mirror.scan_keys():
        out.extend([k for k in page if k not in seen])
    return out


async def _prefetch(chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield *chunks* while the next one is already being read."""
    queue: asyncio.Queue[T | BaseException | None] = asyncio.Queue(maxsize=2)

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
