"""The sidecar's metrics: prometheus-client's Counter and Histogram, one process or several.

In a single process the counts are in memory.  With several workers, each worker counts into
prometheus-client's multiprocess files in a folder the supervisor makes, and a scrape of any
worker adds up every file there (a worker that died and was replaced leaves its files, so no
count ever goes backwards).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

#: The folder the supervisor gives its workers for their counts (a temporary one unless set).
MULTIPROC_ENV = "WACRM_METRICS_DIR"
#: The workers' count files in that folder: prometheus-client's, one of each a process.
COUNTS_GLOBS = ("counter_*.db", "histogram_*.db")
#: The variable prometheus-client reads the multiprocess folder from.
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"

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
#: The labels under which a decision missing from DECISIONS is counted (a test keeps it at zero).
_OTHER = ("other", "other")
#: Upper bounds, in seconds, of the buckets of the check-duration histogram.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REDIS_ERROR_KINDS = ("timeout", "connection", "reply")


class Metrics:
    """Count the gate's decisions and Redis failures; render them for Prometheus.

    When *directory* is given (the supervisor's folder of worker counts, by default from
    ``WACRM_METRICS_DIR``), counts go to this process's files there and a scrape adds up all
    the files.  A process holds at most one such instance per folder.
    """

    def __init__(self, directory: Path | None = None) -> None:
        if directory is None and MULTIPROC_ENV in os.environ:
            directory = Path(os.environ[MULTIPROC_ENV])
        self.directory = directory
        self._value_class: type = values.MutexValue
        if directory is not None:
            self._value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        with self._counting():
            self._decisions = Counter(
                "wacrm_gate_decisions",
                "Requests decided by the gate, by outcome and reason.",
                ["outcome", "reason"],
                registry=None,
            )
            self._verify = Histogram(
                "wacrm_gate_verify_seconds",
                "Time from a check's arrival to its answer, Redis round trip included.",
                buckets=BUCKETS,
                registry=None,
            )
            errors = Counter(
                "wacrm_gate_redis_errors",
                "Redis calls of the request path that failed, by kind"
                " (timeout, connection, reply).",
                ["kind"],
                registry=None,
            )
            # Every series exists from the start, at zero, and counting looks none up.
            self._decided = {
                (status, reason): self._decisions.labels(OUTCOMES[status], reason)
                for status, reason in DECISIONS
            }
            self._errors = {kind: errors.labels(kind) for kind in REDIS_ERROR_KINDS}
        self._registry = CollectorRegistry(auto_describe=False)
        if directory is None:
            self._registry.register(_InMemory(self._decisions, self._verify, errors))
        else:
            MultiProcessCollector(self._registry, path=str(directory))  # type: ignore[no-untyped-call]

    def decided(self, status: int, reason: str, seconds: float) -> None:
        """Count one decision with *status* and *reason*, taken in *seconds*."""
        counter = self._decided.get((status, reason))
        if counter is None:
            counter = self._other()
        counter.inc()
        self._verify.observe(seconds)

    def redis_error(self, kind: str) -> None:
        """Count one failed Redis call of the request path, by *kind*."""
        self._errors[kind].inc()

    def exposition(self) -> bytes:
        """Return every metric in Prometheus's text format."""
        return generate_latest(self._registry)

    def _other(self) -> Counter:
        """Return the series of decisions missing from DECISIONS, made on first use."""
        with self._counting():
            return self._decisions.labels(*_OTHER)

    @contextmanager
    def _counting(self) -> Iterator[None]:
        """Make the series created in the block count in this instance's memory or files.

        prometheus-client picks where counts go from PROMETHEUS_MULTIPROC_DIR: the kind of value
        when it is imported, the folder when a file is first opened.  Choosing here lets one
        process hold either kind (the tests do), whatever its environment held at import.
        """
        saved_class, saved_dir = values.ValueClass, os.environ.get(PROMETHEUS_ENV)
        values.ValueClass = self._value_class
        if self.directory is not None:
            os.environ[PROMETHEUS_ENV] = str(self.directory)
        try:
            yield
        finally:
            values.ValueClass = saved_class
            if saved_dir is None:
                os.environ.pop(PROMETHEUS_ENV, None)
            else:
                os.environ[PROMETHEUS_ENV] = saved_dir


def clear_counts(directory: Path) -> None:
    """Remove the count files of earlier processes from *directory*, and nothing else there."""
    for pattern in COUNTS_GLOBS:
        for old in directory.glob(pattern):
            old.unlink(missing_ok=True)


class _InMemory:
    """Collect metrics of this process without their ``_created`` series.

    The workers' files have no such series, so one process and several expose the same ones.
    """

    def __init__(self, *metrics: Counter | Histogram) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family
