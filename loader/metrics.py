"""Prometheus metrics of ``loader run``, and the small HTTP server that exposes them."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loader.reconcile import Report

log = logging.getLogger(__name__)

#: Seconds from a change in the key table to Redis agreeing with it.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsUnavailable(Exception):
    """The metrics server cannot listen where it was told to."""


class LoaderMetrics:
    """What `run` has done, in Prometheus's terms, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.last_reconcile = Gauge(
            "wacrm_loader_last_reconcile_success_timestamp_seconds",
            "Unix time at which the last successful full reconcile ended (0: none yet).",
            registry=r,
        )
        self.reconcile_seconds = Gauge(
            "wacrm_loader_last_reconcile_duration_seconds",
            "How long the last successful full reconcile took.",
            registry=r,
        )
        self.reconciles = Counter(
            "wacrm_loader_reconciles",
            "Full reconciles finished, by result (ok, or incomplete: Redis kept losing its data).",
            ["result"],
            registry=r,
        )
        self.keys_loaded = Gauge(
            "wacrm_loader_keys_loaded",
            "Active keys in Redis after the last successful full reconcile.",
            registry=r,
        )
        self.changes = Counter(
            "wacrm_loader_changes_applied",
            "Redis records written or deleted, or kept out by a newer change, by kind and by"
            " what found them (reconcile or notification).",
            ["kind", "via"],
            registry=r,
        )
        self.lag = Histogram(
            "wacrm_loader_change_lag_seconds",
            "Seconds from a change in the key table (the oldest of a batch; as the database's"
            " clock saw it) to Redis agreeing with it.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.last_used_rows = Counter(
            "wacrm_loader_last_used_rows_written",
            "Rows of the key table whose last_used_at the loader moved forward.",
            registry=r,
        )
        self.errors = Counter(
            "wacrm_loader_errors",
            "Failures that made `run` pause and reconnect, by what failed (source, redis).",
            ["kind"],
            registry=r,
        )
        self.reconnects = Counter(
            "wacrm_loader_reconnects",
            "Times `run` connected to the source and Redis again after a failure.",
            registry=r,
        )
        self.reloads = Counter(
            "wacrm_loader_reloads",
            "SIGHUP reloads of the rate-limits and route files, by result"
            " (applied, unchanged, refused).",
            ["result"],
            registry=r,
        )
        self.active = Gauge(
            "wacrm_loader_active",
            "1 while this loader holds the loader lock and does the work; 0 while it stands"
            " by (another loader is active, or Redis cannot be reached).",
            registry=r,
        )
        for result in ("applied", "unchanged", "refused"):
            self.reloads.labels(result)
        for kind in ("written", "deleted", "kept_out"):
            for via in ("reconcile", "notification"):
                self.changes.labels(kind, via)
        for kind in ("source", "redis"):
            self.errors.labels(kind)
        for result in ("ok", "incomplete"):
            self.reconciles.labels(result)
        #: Active, connected, and a full reconcile completed since: what /readyz reports.
        self.ready = False
        #: Whether this loader holds the lock; if not, the token of the one that does, as
        #: last seen (None: Redis not reached).
        self.is_active = False
        self.active_token: str | None = None

    def became_active(self) -> None:
        """Record that this loader took the lock: it is not ready before a full reconcile."""
        self.is_active = True
        self.active_token = None
        self.active.set(1)
        self.ready = False

    def standing_by(self, holder: str | None) -> None:
        """Record that this loader stands by while *holder* (a token, or None: Redis not
        reached) holds the lock."""
        self.is_active = False
        self.active_token = holder
        self.active.set(0)
        self.ready = False

    def reconciled(self, report: Report) -> None:
        """Record a full reconcile's *report*."""
        self._applied(report, "reconcile")
        if not report.complete:
            self.reconciles.labels("incomplete").inc()
            return
        self.reconciles.labels("ok").inc()
        self.last_reconcile.set(time.time())
        self.reconcile_seconds.set(report.seconds)
        self.keys_loaded.set(report.active)
        self.ready = True

    def refreshed(self, report: Report, *, changed_at: float) -> None:
        """Record a refresh's *report* for changes made at *changed_at* (Unix seconds)."""
        self._applied(report, "notification")
        self.lag.observe(max(0.0, time.time() - changed_at))

    def failed(self, kind: str) -> None:
        """Count a failure of *kind* (source or redis) that ended a session."""
        self.errors.labels(kind).inc()
        self.ready = False

    def exposition(self) -> bytes:
        """Return every metric in Prometheus's text format."""
        return generate_latest(self.registry)

    def _applied(self, report: Report, via: str) -> None:
        for kind, n in (
            ("written", report.written),
            ("deleted", report.deleted),
            ("kept_out", report.kept_out),
        ):
            if n:
                self.changes.labels(kind, via).inc(n)


metrics_key = web.AppKey("metrics", LoaderMetrics)


def create_app(metrics: LoaderMetrics) -> web.Application:
    """Build the app serving *metrics* on ``/metrics``, with ``/healthz`` and ``/readyz``."""
    app = web.Application()
    app[metrics_key] = metrics
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


@contextlib.asynccontextmanager
async def serving(metrics: LoaderMetrics, host: str, port: int) -> AsyncIterator[None]:
    """Serve *metrics* on *host*:*port* while the block runs; raise MetricsUnavailable if
    it cannot listen there."""
    runner = web.AppRunner(
        create_app(metrics), access_log=None, handle_signals=False, shutdown_timeout=0.5
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            raise MetricsUnavailable(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, port)
        yield
    finally:
        await runner.cleanup()


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[metrics_key].exposition(),
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    metrics = request.app[metrics_key]
    if metrics.is_active:
        if metrics.ready:
            return web.json_response({"status": "ready", "role": "active"})
        return web.json_response({"status": "not reconciled", "role": "active"}, status=503)
    # A standby that reaches Redis is healthy: ready to take over.
    if metrics.active_token is not None:
        return web.json_response(
            {"status": "ready", "role": "standby", "active": metrics.active_token}
        )
    return web.json_response({"status": "no redis", "role": "standby"}, status=503)
