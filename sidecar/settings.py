"""The sidecar's settings."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sidecar import identity, options
from sidecar.options import Option, SettingError
from sidecar.records import DEFAULT_PREFIX, RateLimit

#: Wacrm's own limit: 120 requests per 60 seconds.
WACRM_RATE_LIMIT = RateLimit(120, 60_000)


def _rate_limit(text: str) -> RateLimit | None:
    return None if text.strip().lower() in ("off", "0") else RateLimit.parse(text)


#: The longest socket path Linux takes (``sun_path`` holds 108 bytes, the last one NUL).
MAX_SOCKET_PATH = 107


def _listen(text: str) -> Path | None:
    """Parse ``unix:/ABSOLUTE/PATH`` into the socket's path; empty is None (TCP)."""
    if not text:
        return None
    form = "must be unix:/ABSOLUTE/PATH (a Unix socket), or empty for TCP"
    if not text.startswith("unix:"):
        raise ValueError(form)
    raw = text.removeprefix("unix:")
    if not raw.startswith("/") or raw.startswith("//") or raw.endswith("/") or "\0" in raw:
        raise ValueError(form)
    if len(os.fsencode(raw)) > MAX_SOCKET_PATH:
        raise ValueError(f"the path is longer than the {MAX_SOCKET_PATH} bytes a socket's may be")
    path = Path(raw)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ValueError(f"the folder {path.parent} does not exist") from None
        return path
    except OSError as e:
        raise ValueError(f"cannot look at {raw}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):  # a stale socket is replaced at start; anything else is kept
        raise ValueError(f"{raw} exists and is not a socket; refusing to replace it")
    return path


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret as given, and where it came from; never shown (see `Settings.identity_key`)."""

    text: str = field(repr=False)
    #: The variable that gave it, or the file that held it.
    origin: str


def _secret(text: str) -> Secret:
    # Checked in Settings, not here: a value that fails to parse is repeated in the error.
    return Secret(text, "WACRM_IDENTITY_SECRET (--identity-secret)")


def _secret_file(text: str) -> Secret:
    try:
        return Secret(Path(text).read_text(), f"WACRM_IDENTITY_SECRET_FILE {text}")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the file: {getattr(e, 'strerror', None) or e}") from None


OPTIONS = (
    Option("host", "WACRM_HOST", str, "127.0.0.1", "address to listen on"),
    Option("port", "WACRM_PORT", options.port, 9180, "TCP port to listen on"),
    Option(
        "listen",
        "WACRM_LISTEN",
        _listen,
        None,
        "unix:/ABSOLUTE/PATH: listen on this Unix socket instead of WACRM_HOST:WACRM_PORT"
        " (e.g. unix:/run/wacrm/sidecar.sock); unset or empty = TCP. The socket is made"
        " mode 0666, so that nginx's user can connect: the folder's permissions decide who"
        " reaches it. A stale socket left there is replaced; any other file is refused",
    ),
    Option(
        "redis_url",
        "WACRM_REDIS_URL",
        options.redis_url,
        "redis://127.0.0.1:6379/0",
        "Redis holding the key records (redis:// or rediss://, unix:// for a socket, or"
        " redis+sentinel:// for a master found through Redis Sentinel)",
    ),
    Option(
        "redis_prefix",
        "WACRM_REDIS_PREFIX",
        options.redis_prefix,
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
    Option(
        "identity_secret",
        "WACRM_IDENTITY_SECRET",
        _secret,
        None,
        "secret with which the sidecar signs the identity it grants (X-Wacrm-Signature,"
        " HMAC-SHA256, see docs/identity-signature.md): at least 32 printable ASCII"
        " characters without spaces; unset = no signature",
    ),
    Option(
        "identity_secret_file",
        "WACRM_IDENTITY_SECRET_FILE",
        _secret_file,
        None,
        "file holding that secret (surrounding white space removed), instead of"
        " WACRM_IDENTITY_SECRET, which must then be unset",
    ),
    options.LOG_LEVEL,
)


@dataclass(frozen=True, slots=True)
class Settings(options.FromEnv):
    """How one sidecar process runs; every field is documented in `OPTIONS` and the README."""

    OPTIONS: ClassVar[Sequence[Option]] = OPTIONS
    PROG: ClassVar[str] = "wacrm-sidecar"
    DESCRIPTION: ClassVar[str] = "Wacrm gate: the auth_request / forward-auth verifier."

    host: str = "127.0.0.1"
    port: int = 9180
    #: The Unix socket to listen on instead of host:port, if any.
    listen: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    redis_timeout: float = 0.5
    routes: Path | None = None
    unknown_routes: str = "deny"
    encoded_slashes: str = "reject"
    rate_limit: RateLimit | None = WACRM_RATE_LIMIT
    last_used_interval: float = 60.0
    workers: int = 1
    #: The secret that signs the identity, as given or read from its file (`identity_key`).
    identity_secret: Secret | None = None
    identity_secret_file: Secret | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.identity_secret is not None and self.identity_secret_file is not None:
            raise SettingError(
                "WACRM_IDENTITY_SECRET and WACRM_IDENTITY_SECRET_FILE are both set: set one"
            )
        # At start, not at the first request.
        _identity_key(self.identity_secret or self.identity_secret_file)

    @property
    def identity_key(self) -> bytes | None:
        """Return the HMAC key that signs the identity, or None when nothing is signed."""
        return _identity_key(self.identity_secret or self.identity_secret_file)


def _identity_key(secret: Secret | None) -> bytes | None:
    """Return the key of *secret*; raise `SettingError` naming where it came from, never
    repeating it, if it is too short or holds anything but printable ASCII without spaces."""
    if secret is None:
        return None
    try:
        return identity.secret_key(secret.text)
    except ValueError as e:
        raise SettingError(f"{secret.origin}: the secret {e}") from None
