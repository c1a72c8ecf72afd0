"""The loader's settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sidecar import options
from sidecar.options import Option
from sidecar.records import DEFAULT_PREFIX


def source_url(raw: str) -> str:
    """Parse a source URL: ``sqlite:///path`` or ``postgresql://...``."""
    value = raw.strip()
    if value.startswith(("postgresql://", "postgres://")):
        return value
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    raise ValueError("must be sqlite:///PATH or postgresql://...")


def lock_ttl(raw: str) -> float:
    """Parse the lock's lifetime: a number of seconds, at least 1."""
    value = options.positive_float(raw)
    if value < 1:
        raise ValueError("must be at least 1 (seconds)")
    return value


OPTIONS = (
    Option(
        "source",
        "WACRM_SOURCE",
        source_url,
        None,
        "the key table: sqlite:///relative.db, sqlite:////absolute.db or postgresql://...",
    ),
    Option(
        "redis_url",
        "WACRM_REDIS_URL",
        options.redis_url,
        "redis://127.0.0.1:6379/0",
        "Redis the gate reads (redis://, rediss://, unix:// or redis+sentinel://)",
    ),
    Option(
        "redis_prefix",
        "WACRM_REDIS_PREFIX",
        options.redis_prefix,
        DEFAULT_PREFIX,
        "prefix of every Redis key the gate uses; must match the sidecar's",
    ),
    Option(
        "routes",
        "WACRM_ROUTES",
        Path,
        None,
        "route policy file whose scopes are the known scopes; unset = Wacrm's own table",
    ),
    Option(
        "rate_limits",
        "WACRM_RATE_LIMITS",
        Path,
        None,
        "file of per-account and per-key rate limits (account|key ID LIMIT/WINDOW|off); "
        "unset = every key gets the sidecar's WACRM_RATE_LIMIT",
    ),
    Option(
        "reconcile_interval",
        "WACRM_RECONCILE_INTERVAL",
        options.positive_float,
        300.0,
        "seconds between the periodic full reconciles of `run` (the safety net)",
    ),
    Option(
        "poll_interval",
        "WACRM_POLL_INTERVAL",
        options.positive_float,
        0.2,
        "seconds between checks for SQLite changes and for a Redis that lost its data",
    ),
    Option(
        "last_used_flush",
        "WACRM_LAST_USED_FLUSH",
        options.positive_float,
        10.0,
        "seconds between copies of the sidecars' last-use notes into api_keys.last_used_at",
    ),
    Option(
        "batch_size",
        "WACRM_BATCH_SIZE",
        options.positive_int,
        5000,
        "keys read from the source and compared with Redis per round trip",
    ),
    Option(
        "retry_max",
        "WACRM_RETRY_MAX",
        options.positive_float,
        5.0,
        "longest pause, in seconds, between reconnection attempts of `run`",
    ),
    Option(
        "timeout",
        "WACRM_LOADER_TIMEOUT",
        options.positive_float,
        5.0,
        "seconds to wait for a connection to the source or Redis",
    ),
    Option(
        "lock_ttl",
        "WACRM_LOADER_LOCK_TTL",
        lock_ttl,
        10.0,
        "seconds the lock naming the one active `run` lasts unless renewed (every third of"
        " it); a standby tries to take it every tenth, so it takes over within about this"
        " long after the active loader dies, and at once after a clean stop",
    ),
    Option(
        "metrics_port",
        "WACRM_LOADER_METRICS_PORT",
        options.port,
        None,
        "TCP port on which `run` serves /metrics (Prometheus), /healthz and /readyz;"
        " unset = no metrics server",
    ),
    Option(
        "metrics_host",
        "WACRM_LOADER_METRICS_HOST",
        str,
        "127.0.0.1",
        "address the metrics server of `run` listens on",
    ),
    options.LOG_LEVEL,
)


@dataclass(frozen=True, slots=True)
class Settings(options.FromEnv):
    """How one loader process runs; every field is documented in `OPTIONS` and the README."""

    OPTIONS: ClassVar[Sequence[Option]] = OPTIONS
    PROG: ClassVar[str] = "wacrm-loader"
    DESCRIPTION: ClassVar[str] = "Wacrm gate: keep Redis equal to the table of API keys."

    source: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    routes: Path | None = None
    rate_limits: Path | None = None
    reconcile_interval: float = 300.0
    poll_interval: float = 0.2
    last_used_flush: float = 10.0
    batch_size: int = 5000
    retry_max: float = 5.0
    timeout: float = 5.0
    lock_ttl: float = 10.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"

    def require_source(self) -> str:
        """Return the source URL; raise SettingError when none is configured."""
        if self.source is None:
            raise options.SettingError(
                "WACRM_SOURCE is not set (sqlite:///PATH or postgresql://...)"
            )
        return self.source
