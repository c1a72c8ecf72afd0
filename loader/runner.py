"""``sync`` and ``run``: one full reconcile, or keeping Redis equal to the table for good."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from loader.limits import load_limits
from loader.mirror import REDIS_ERRORS, Mirror
from loader.reconcile import Report, reconcile, refresh
from loader.rows import KeyRules
from loader.settings import Settings
from loader.source import ChangeFeed, Source, SourceUnavailable, open_source
from sidecar.records import Keyspace
from sidecar.routes import load_policy

log = logging.getLogger(__name__)

#: What makes `run` reconnect and retry rather than stop.
RETRIED = (SourceUnavailable, *REDIS_ERRORS)
#: First pause before retrying; it doubles up to the retry_max setting.
FIRST_RETRY = 0.2


def key_rules(settings: Settings) -> KeyRules:
    """Return the scopes of the route policy the sidecar uses (WACRM_ROUTES) and the
    per-account and per-key rate limits (WACRM_RATE_LIMITS)."""
    return KeyRules(load_policy(settings.routes).scopes, load_limits(settings.rate_limits))


async def sync(settings: Settings) -> Report:
    """Run one full reconcile; raise SourceUnavailable or a Redis error when one is down."""
    rules = key_rules(settings)
    async with _connected(settings) as (source, reads, writes):
        return await reconcile(source, reads, writes, rules=rules, batch_size=settings.batch_size)


async def run(settings: Settings) -> None:
    """Keep Redis equal to the key table until cancelled, reconnecting when either goes away."""
    rules = key_rules(settings)
    backoff = _Backoff(settings.retry_max)
    while True:
        try:
            await _session(settings, rules, backoff)
        except RETRIED as e:
            delay = backoff.next()
            log.warning("%s; retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)


@dataclass(slots=True)
class _Backoff:
    longest: float
    delay: float = 0.0

    def next(self) -> float:
        self.delay = min(self.longest, max(FIRST_RETRY, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


@dataclass(slots=True)
class _State:
    due: asyncio.Event
    reconciling: bool = True
    last: float = 0.0


async def _session(settings: Settings, rules: KeyRules, backoff: _Backoff) -> None:
    async with (
        _connected(settings) as (source, reads, writes),
        source.feed(settings.poll_interval) as feed,
        _mirror(settings) as incremental,
    ):
        state = _State(asyncio.Event())
        state.due.set()
        await _first_failure(
            _reconcile_loop(settings, rules, source, reads, writes, state, backoff),
            _change_loop(rules, feed, source, incremental, state),
            _watch_loop(settings, incremental, state),
            _usage_loop(settings, source, incremental),
        )


async def _reconcile_loop(
    settings: Settings,
    rules: KeyRules,
    source: Source,
    reads: Mirror,
    writes: Mirror,
    state: _State,
    backoff: _Backoff,
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.due.wait(), settings.reconcile_interval)
        state.due.clear()
        state.reconciling = True
        await reconcile(source, reads, writes, rules=rules, batch_size=settings.batch_size)
        state.reconciling = False
        state.last = time.monotonic()
        backoff.reset()


async def _change_loop(
    rules: KeyRules, feed: ChangeFeed, source: Source, mirror: Mirror, state: _State
) -> None:
    while True:
        changes = await feed.next(1.0)
        if changes.lost:
            log.warning("changes may have been missed; reconciling in full")
            state.due.set()
        if changes.key_hashes or changes.key_ids or changes.account_ids:
            report = await refresh(source, mirror, changes, rules=rules)
            log.info(
                "applied changes: %d keys written, %d removed, %d kept out by newer changes",
                report.written,
                report.deleted,
                report.kept_out,
            )


async def _watch_loop(settings: Settings, mirror: Mirror, state: _State) -> None:
    """Notice that Redis lost its data (restart without persistence, failover, flush)."""
    while True:
        await asyncio.sleep(settings.poll_interval)
        if state.reconciling or state.due.is_set():
            continue
        if not await mirror.is_loaded():
            log.warning("Redis lost the loaded keys; reloading them")
            state.due.set()


async def _usage_loop(settings: Settings, source: Source, mirror: Mirror) -> None:
    """Copy the sidecars' last-use notes into ``last_used_at``, as Wacrm keeps it."""
    while True:
        await asyncio.sleep(settings.last_used_flush)
        uses = await mirror.drain_used()
        if not uses:
            continue
        try:
            updated = await source.touch(uses)
        except SourceUnavailable:
            await mirror.restore_used(uses)
            raise
        log.debug("last_used_at updated for %d of %d keys", updated, len(uses))


async def _first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run *coros* together until one fails; cancel the others and raise its error."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[tuple[Source, Mirror, Mirror]]:
    source = await open_source(settings.require_source(), connect_timeout=settings.timeout)
    try:
        async with _mirror(settings) as reads, _mirror(settings) as writes:
            yield source, reads, writes
    finally:
        await source.close()


@contextlib.asynccontextmanager
async def _mirror(settings: Settings) -> AsyncIterator[Mirror]:
    mirror = await Mirror.open(
        settings.redis_url, Keyspace(settings.redis_prefix), connect_timeout=settings.timeout
    )
    try:
        yield mirror
    finally:
        await mirror.close()
