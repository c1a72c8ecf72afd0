"""Prometheus metrics of the sidecar, shared by its worker processes when there are several."""

from __future__ import annotations

import os
import struct

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: Where worker processes keep their metrics; set by the supervisor before they start.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

OUTCOMES = {
    200: "allowed",
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    429: "rate_limited",
    500: "error",
    503: "unavailable",
}


class Metrics:
    """The sidecar's counters and histograms, and their exposition."""

    def __init__(self) -> None:
        self.multiprocess = MULTIPROC_ENV in os.environ
        # In multiprocess mode values live in files; exposition gathers them from there.
        self.registry = CollectorRegistry()
        registry = None if self.multiprocess else self.registry
        self.decisions = Counter(
            "wacrm_gate_decisions",
            "Requests decided by the gate, by outcome and reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "wacrm_gate_verify_seconds",
            "Time from a check's arrival to its answer, Redis round trip included.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.redis_errors = Counter(
            "wacrm_gate_redis_errors",
            "Redis calls of the request path that failed, by kind (timeout, connection, reply).",
            ["kind"],
            registry=registry,
        )
        self._children: dict[tuple[int, str], Counter] = {}

    def decided(self, status: int, reason: str, seconds: float) -> None:
        """Count one decision with *status* and *reason*, taken in *seconds*."""
        child = self._children.get((status, reason))
        if child is None:
            child = self.decisions.labels(OUTCOMES.get(status, str(status)), reason)
            self._children[(status, reason)] = child
        child.inc()
        self.latency.observe(seconds)

    def exposition(self) -> bytes:
        """Return every metric in Prometheus's text format.

        Raise `MetricsBusy` when a worker is creating its metrics file at this very moment
        (prometheus-client reads it half-made); asking again a moment later succeeds.
        """
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        try:
            return generate_latest(registry)
        except struct.error as e:
            raise MetricsBusy(str(e)) from e


class MetricsBusy(Exception):
    """Another worker's metrics file is being created; try again."""
