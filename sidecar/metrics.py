"""The sidecar's metrics: plain integer counts on the request path, Prometheus text on a scrape.

Every count lives in one array of integers, so counting a decision is three integer additions.
In a single process the array is a list.  With several workers, each worker's array holds 64-bit
integers in a memory-mapped file of its own, in a folder the supervisor makes; a scrape of any
worker adds up every file there (a worker that died and was replaced keeps its file, so no count
ever goes backwards).
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

#: The folder the supervisor gives its workers for their counts (a temporary one unless set).
MULTIPROC_ENV = "WACRM_METRICS_DIR"
#: The names of the workers' count files in that folder.
COUNTS_GLOB = "gate-*.counts"

OUTCOMES = {
    200: "allowed",
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    429: "rate_limited",
    431: "bad_request",
    500: "error",
    503: "unavailable",
}

#: Every (status, reason) the gate decides: the allowed case and decision.py's refusals.
DECISIONS = (
    (200, "ok"),
    (400, "bad_path"),
    (400, "spoofed_headers"),
    (400, "method_override"),
    (400, "routing_header"),
    (431, "too_many_headers"),
    (401, "missing"),
    (401, "malformed"),
    (401, "unknown"),
    (401, "expired"),
    (403, "missing_scope"),
    (403, "unlisted_route"),
    (429, "rate_limited"),
    (500, "misconfigured"),
    (503, "unavailable"),
    (503, "not_loaded"),
)
#: Where a decision missing from DECISIONS is counted (a test keeps this at zero).
_OTHER = (0, "other")
#: Upper bounds, in seconds, of the buckets of the check-duration histogram.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REDIS_ERROR_KINDS = ("timeout", "connection", "reply")

# The layout of the counts: decisions, then histogram buckets (the last is +Inf), then the
# histogram's sum in microseconds, then Redis errors by kind.
_DECISION_SLOT = {d: i for i, d in enumerate((*DECISIONS, _OTHER))}
_OTHER_SLOT = _DECISION_SLOT[_OTHER]
_BUCKET0 = len(_DECISION_SLOT)
_SUM = _BUCKET0 + len(BUCKETS) + 1
_ERROR_SLOT = {k: _SUM + 1 + i for i, k in enumerate(REDIS_ERROR_KINDS)}
_SLOTS = _SUM + 1 + len(REDIS_ERROR_KINDS)
_FILE_SIZE = _SLOTS * 8


class Metrics:
    """Count the gate's decisions and Redis failures; render them for Prometheus.

    When *directory* is given (the supervisor's folder of worker counts, by default from
    ``WACRM_METRICS_DIR``), counts go to a file of this process's there and a scrape adds
    up all the files.
    """

    def __init__(self, directory: Path | None = None) -> None:
        if directory is None and MULTIPROC_ENV in os.environ:
            directory = Path(os.environ[MULTIPROC_ENV])
        self.directory = directory
        # One process: a list, the cheapest to count into.  Workers: their shared files.
        self._counts: list[int] | memoryview[int]
        if directory is None:
            self._counts = [0] * _SLOTS
        else:
            path = directory / f"gate-{os.getpid()}.counts"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, _FILE_SIZE)
                self._map = mmap.mmap(fd, _FILE_SIZE)
            finally:
                os.close(fd)
            self._counts = memoryview(self._map).cast("q")

    def decided(self, status: int, reason: str, seconds: float) -> None:
        """Count one decision with *status* and *reason*, taken in *seconds*."""
        c = self._counts
        c[_DECISION_SLOT.get((status, reason), _OTHER_SLOT)] += 1
        c[_BUCKET0 + bisect_left(BUCKETS, seconds)] += 1
        c[_SUM] += int(seconds * 1_000_000)

    def redis_error(self, kind: str) -> None:
        """Count one failed Redis call of the request path, by *kind*."""
        self._counts[_ERROR_SLOT[kind]] += 1

    def totals(self) -> list[int]:
        """Return the counts of this process, or of every worker's process."""
        if self.directory is None:
            return list(self._counts)
        total = [0] * _SLOTS
        for path in self.directory.glob(COUNTS_GLOB):
            try:
                data = path.read_bytes()
            except OSError:  # a worker's file went away: nothing to add
                continue
            if len(data) != _FILE_SIZE:  # being created this instant: all zeros anyway
                continue
            for i, n in enumerate(memoryview(data).cast("q")):
                total[i] += n
        return total

    def exposition(self) -> bytes:
        """Return every metric in Prometheus's text format."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.totals()))
        return generate_latest(registry)


class _Collector:
    """Turn one reading of the counts into metric families."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        decisions = CounterMetricFamily(
            "wacrm_gate_decisions",
            "Requests decided by the gate, by outcome and reason.",
            labels=["outcome", "reason"],
        )
        for (status, reason), slot in _DECISION_SLOT.items():
            if (status, reason) != _OTHER or c[slot]:
                decisions.add_metric([OUTCOMES.get(status, "other"), reason], c[slot])
        yield decisions
        cumulative, buckets = 0, []
        for i, bound in enumerate((*BUCKETS, float("inf"))):
            cumulative += c[_BUCKET0 + i]
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "wacrm_gate_verify_seconds",
            "Time from a check's arrival to its answer, Redis round trip included.",
            buckets=buckets,
            sum_value=c[_SUM] / 1_000_000,
        )
        errors = CounterMetricFamily(
            "wacrm_gate_redis_errors",
            "Redis calls of the request path that failed, by kind (timeout, connection, reply).",
            labels=["kind"],
        )
        for kind, slot in _ERROR_SLOT.items():
            errors.add_metric([kind], c[slot])
        yield errors
