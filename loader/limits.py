"""Per-account and per-key rate limits: the file named by WACRM_RATE_LIMITS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.records import UNLIMITED, RateLimit


class LimitsError(ValueError):
    """The rate-limits file is malformed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Rate limits that differ from the sidecar's default, by key id and by account id."""

    keys: Mapping[str, RateLimit] = field(default_factory=dict)
    accounts: Mapping[str, RateLimit] = field(default_factory=dict)

    def of(self, account_id: str, key_id: str) -> RateLimit | None:
        """Return the limit of the key *key_id* of *account_id*; None = the default.

        A key's own limit wins over its account's.
        """
        if not self.keys and not self.accounts:
            return None
        return self.keys.get(key_id) or self.accounts.get(account_id)


NO_LIMITS = Limits()


def parse_limits(text: str, *, source: str = "<limits>") -> Limits:
    """Parse lines ``account ID LIMIT/WINDOW`` and ``key ID LIMIT/WINDOW`` (or ``off``)."""
    keys: dict[str, RateLimit] = {}
    accounts: dict[str, RateLimit] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3 or fields[0] not in ("account", "key"):
            raise LimitsError(f"{source}:{lineno}: expected 'account|key ID LIMIT/WINDOW'")
        kind, ident, spec = fields
        try:
            limit = UNLIMITED if spec.lower() == "off" else RateLimit.parse(spec)
        except ValueError as e:
            raise LimitsError(f"{source}:{lineno}: {e}") from None
        table = keys if kind == "key" else accounts
        if ident in table:
            raise LimitsError(f"{source}:{lineno}: {kind} {ident} is listed twice")
        table[ident] = limit
    return Limits(keys, accounts)


def load_limits(path: Path | None) -> Limits:
    """Load the rate-limits file at *path*; None = no overrides."""
    if path is None:
        return NO_LIMITS
    try:
        text = path.read_text()
    except OSError as e:
        raise LimitsError(f"cannot read rate-limits file {path}: {e.strerror}") from None
    return parse_limits(text, source=str(path))
