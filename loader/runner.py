"""``sync`` and ``run``: one full reconcile, or keeping Redis equal to the table for good."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from loader.limits import LimitsError, load_limits
from loader.lock import Lock, LockLost
from loader.metrics import LoaderMetrics, serving
from loader.mirror import REDIS_ERRORS, Mirror
from loader.reconcile import Report, reconcile, refresh
from loader.rows import KeyRules
from loader.settings import Settings
from loader.source import ChangeFeed, Source, SourceUnavailable, open_source
from sidecar.records import Keyspace
from sidecar.resp import RedisUnavailable
from sidecar.routes import PolicyError, load_policy

log = logging.getLogger(__name__)

#: What makes `run` reconnect and retry rather than stop.
RETRIED = (SourceUnavailable, *REDIS_ERRORS)
#: First pause before retrying; it doubles up to the retry_max setting.
FIRST_RETRY = 0.2
#: Longest wait, in seconds, for a connection to close (a stop must not hang on one).
CLOSE_TIMEOUT = 2.0


def key_rules(settings: Settings) -> KeyRules:
    """Return the scopes of the route policy the sidecar uses (WACRM_ROUTES) and the
    per-account and per-key rate limits (WACRM_RATE_LIMITS)."""
    return KeyRules(load_policy(settings.routes).scopes, load_limits(settings.rate_limits))


async def sync(settings: Settings) -> Report:
    """Run one full reconcile; raise SourceUnavailable or a Redis error when one is down."""
    rules = key_rules(settings)
    async with _connected(settings) as (source, reads, writes):
        return await reconcile(source, reads, writes, rules=rules, batch_size=settings.batch_size)


async def run(settings: Settings, metrics: LoaderMetrics | None = None) -> None:
    """Keep Redis equal to the key table until cancelled, reconnecting when either goes away.

    Work only while this loader holds the loader lock (`loader.lock`): one ``run`` is active,
    any other stands by and takes over, with a full reconcile, once the lock is free.
    Record what it does in *metrics*, served over HTTP when the metrics_port setting is set.
    On SIGHUP, read the rate-limits and route files again (see `Rules.reload`).
    """
    metrics = metrics or LoaderMetrics()
    rules = Rules(settings, metrics)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        if settings.metrics_port is not None:
            await stack.enter_async_context(
                serving(metrics, settings.metrics_host, settings.metrics_port)
            )
        loop.add_signal_handler(signal.SIGHUP, rules.reload)
        stack.callback(loop.remove_signal_handler, signal.SIGHUP)
        await _follow(settings, rules, metrics)


class Rules:
    """The rules `run` applies, which SIGHUP reads again from their files."""

    def __init__(self, settings: Settings, metrics: LoaderMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current = key_rules(settings)
        #: Set to ask the running session for a full reconcile under new rules.
        self.due: asyncio.Event | None = None

    def reload(self) -> None:
        """Read the rate-limits and route files again; reconcile in full if they changed.

        A file that cannot be read or parsed is logged, and the rules in force are kept.
        """
        try:
            rules = key_rules(self.settings)
        except (LimitsError, PolicyError) as e:
            log.error("reload refused, keeping the rules in force: %s", e)
            self.metrics.reloads.labels("refused").inc()
            return
        if rules == self.current:
            log.info("reload: the rate limits and route scopes are unchanged")
            self.metrics.reloads.labels("unchanged").inc()
            return
        self.metrics.reloads.labels("applied").inc()
        self.current = rules
        log.info("reload: new rate limits or route scopes; reconciling in full")
        if self.due is not None:
            self.due.set()


async def _follow(settings: Settings, rules: Rules, metrics: LoaderMetrics) -> None:
    """Stand by until this loader holds the lock, then work until it is lost; and again."""
    lock = Lock(
        settings.redis_url,
        Keyspace(settings.redis_prefix),
        ttl=settings.lock_ttl,
        timeout=settings.timeout,
    )
    try:
        while True:
            await lock.acquire(metrics.standing_by)
            log.info("active: this loader (token %s) holds the loader lock", lock.token)
            metrics.became_active()
            try:
                # Cancelling the work waits for its tasks to end: none sends a command after it.
                await _first_failure(lock.keep(), _work(settings, rules, metrics))
            except LockLost as e:
                log.warning("%s; work stopped, standing by", e)
            metrics.standing_by(None)
    finally:
        # Only once the work has stopped: the standby that takes over may start at once.
        metrics.standing_by(None)
        await _bounded(_release(lock), "Redis")


async def _release(lock: Lock) -> None:
    try:
        if await lock.release(within=CLOSE_TIMEOUT / 2):
            log.info("released the loader lock")
    except REDIS_ERRORS as e:
        log.warning("could not release the loader lock (it expires by itself): %s", e)
    finally:
        await lock.close()


async def _work(settings: Settings, rules: Rules, metrics: LoaderMetrics) -> None:
    """Run sessions, each starting with a full reconcile, reconnecting after a failure."""
    backoff = _Backoff(settings.retry_max)
    failed = False
    while True:
        try:
            await _session(settings, rules, backoff, metrics, reconnecting=failed)
        except RETRIED as e:
            failed = True
            metrics.failed("source" if isinstance(e, SourceUnavailable) else "redis")
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


async def _session(
    settings: Settings,
    rules: Rules,
    backoff: _Backoff,
    metrics: LoaderMetrics,
    *,
    reconnecting: bool,
) -> None:
    async with (
        _connected(settings) as (source, reads, writes),
        source.feed(settings.poll_interval) as feed,
        _mirror(settings) as incremental,
    ):
        if reconnecting:
            metrics.reconnects.inc()
        state = _State(asyncio.Event())
        state.due.set()
        rules.due = state.due
        await _first_failure(
            _reconcile_loop(settings, rules, source, reads, writes, state, backoff, metrics),
            _change_loop(rules, feed, source, incremental, state, metrics),
            _watch_loop(settings, incremental, state),
            _usage_loop(settings, source, incremental, metrics),
        )


async def _reconcile_loop(
    settings: Settings,
    rules: Rules,
    source: Source,
    reads: Mirror,
    writes: Mirror,
    state: _State,
    backoff: _Backoff,
    metrics: LoaderMetrics,
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.due.wait(), settings.reconcile_interval)
        state.due.clear()
        state.reconciling = True
        report = await reconcile(
            source, reads, writes, rules=rules.current, batch_size=settings.batch_size
        )
        metrics.reconciled(report)
        state.reconciling = False
        backoff.reset()


async def _change_loop(
    rules: Rules,
    feed: ChangeFeed,
    source: Source,
    mirror: Mirror,
    state: _State,
    metrics: LoaderMetrics,
) -> None:
    while True:
        changes = await feed.next(1.0)
        seen = time.time()
        if changes.lost:
            log.warning("changes may have been missed; reconciling in full")
            state.due.set()
        if changes.key_hashes or changes.key_ids or changes.account_ids:
            report = await refresh(source, mirror, changes, rules=rules.current)
            # Without the change's own time (an older trigger), the lag counts from its arrival.
            metrics.refreshed(report, changed_at=changes.changed_at or seen)
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
        if (problem := await mirror.problem()) is not None:
            raise RedisUnavailable(problem)  # not ready: the session starts again, later
        if state.reconciling or state.due.is_set():
            continue
        if not await mirror.is_loaded():
            log.warning("Redis lost the loaded keys; reloading them")
            state.due.set()


async def _usage_loop(
    settings: Settings, source: Source, mirror: Mirror, metrics: LoaderMetrics
) -> None:
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
        except asyncio.CancelledError:
            # Stopping mid-write: hand the notes back (newer ones win) for the next flush.
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(mirror.restore_used(uses), CLOSE_TIMEOUT)
            raise
        metrics.last_used_rows.inc(updated)
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
        await _bounded(source.close(), "the source")


@contextlib.asynccontextmanager
async def _mirror(settings: Settings) -> AsyncIterator[Mirror]:
    mirror = await Mirror.open(
        settings.redis_url, Keyspace(settings.redis_prefix), connect_timeout=settings.timeout
    )
    try:
        yield mirror
    finally:
        await _bounded(mirror.close(), "Redis")


async def _bounded(closing: Coroutine[Any, Any, None], what: str) -> None:
    """Await *closing*, but no longer than CLOSE_TIMEOUT: a stop must not hang on a close."""
    try:
        await asyncio.wait_for(closing, CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("closing the connection to %s took too long; leaving it", what)
