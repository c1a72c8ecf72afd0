"""The sidecar's settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar import options
from sidecar.options import Option
from sidecar.records import DEFAULT_PREFIX, RateLimit

#: Wacrm's own limit: 120 requests per 60 seconds.
WACRM_RATE_LIMIT = RateLimit(120, 60_000)


def _rate_limit(text: str) -> RateLimit | None:
    return None if text.strip().lower() in ("off", "0") else RateLimit.parse(text)


OPTIONS = (
    Option("host", "WACRM_HOST", str, "127.0.0.1", "address to listen on"),
    Option("port", "WACRM_PORT", options.port, 9180, "TCP port to listen on"),
    Option(
        "redis_url",
        "WACRM_REDIS_URL",
        options.redis_url,
        "redis://127.0.0.1:6379/0",
        "Redis holding the key records (redis:// or rediss://, or unix:// for a socket)",
    ),
    Option(
        "redis_prefix",
        "WACRM_REDIS_PREFIX",
        str,
        DEFAULT_PREFIX,
        "prefix of every Redis key the gate uses; lets deployments share one Redis",
    ),
    Option(
        "redis_timeout",
        "WACRM_REDIS_TIMEOUT",
        options.positive_float,
        0.5,
        "seconds Redis may take to answer a batch of lookups before its requests are refused with"
        " 503 (a lookup may first wait for the batch in flight: about twice this at most)",
    ),
    Option(
        "routes",
        "WACRM_ROUTES",
        Path,
        None,
        "route policy file (METHODS PATH SCOPE lines); unset = Wacrm's own route table",
    ),
    Option(
        "unknown_routes",
        "WACRM_UNKNOWN_ROUTES",
        options.choice("deny", "allow"),
        "deny",
        "what a valid key gets on a route the policy does not list: deny (403) or allow",
    ),
    Option(
        "encoded_slashes",
        "WACRM_ENCODED_SLASHES",
        options.choice("reject", "keep"),
        "reject",
        "a path with %%2F: reject (400), or keep it as data inside its segment (only for"
        " upstreams whose router never decodes %%2F before matching)",
    ),
    Option(
        "rate_limit",
        "WACRM_RATE_LIMIT",
        _rate_limit,
        WACRM_RATE_LIMIT,
        "each key's rate limit, LIMIT/WINDOW with s, m or h (Wacrm's 120/60s), or off; "
        "the loader's WACRM_RATE_LIMITS file sets per-account and per-key limits",
    ),
    Option(
        "last_used_interval",
        "WACRM_LAST_USED_INTERVAL",
        options.positive_float,
        60.0,
        "seconds between two notes of the same key's use by one process (for last_used_at)",
    ),
    Option(
        "workers",
        "WACRM_WORKERS",
        options.positive_int,
        1,
        "processes serving the port together (SO_REUSEPORT); one per core is the most useful",
    ),
    options.LOG_LEVEL,
)


@dataclass(frozen=True, slots=True)
class Settings:
    """How one sidecar process runs; every field is documented in `OPTIONS` and the README."""

    host: str = "127.0.0.1"
    port: int = 9180
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    redis_timeout: float = 0.5
    routes: Path | None = None
    unknown_routes: str = "deny"
    encoded_slashes: str = "reject"
    rate_limit: RateLimit | None = WACRM_RATE_LIMIT
    last_used_interval: float = 60.0
    workers: int = 1
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] | None = None) -> Settings:
        """Read settings from *environ*, overridden by the flags in *argv*."""
        values = options.read(
            OPTIONS,
            environ,
            argv,
            prog="wacrm-sidecar",
            description="Wacrm gate: the auth_request / forward-auth verifier.",
        )
        return cls(**values)
