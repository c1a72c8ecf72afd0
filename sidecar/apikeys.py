"""Wacrm's API-key format: minting a key and reading one from an ``Authorization`` header."""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass

from sidecar.records import hash_key

LIVE_PREFIX = "wacrm_live_"
#: ``wacrm_live_`` + 8 characters: what dashboards and logs may show of a key.
DISPLAY_PREFIX_LENGTH = 19
KEY_LENGTH = len(LIVE_PREFIX) + 43

_KEY = r"wacrm_live_[A-Za-z0-9_-]{43}"
_KEY_RE = re.compile(_KEY)
#: An Authorization value carrying a key: ``Bearer`` (any case), spaces, the key, spaces; or
#: the bare key alone.  One regex, as the request path reads this on every request.
_AUTHORIZATION_RE = re.compile(rf"[Bb][Ee][Aa][Rr][Ee][Rr] +({_KEY}) *|({_KEY})")


@dataclass(frozen=True, slots=True)
class MintedKey:
    """A new key: *plaintext* is shown once, the rest is what gets stored."""

    plaintext: str
    key_hash: str
    key_prefix: str


def mint() -> MintedKey:
    """Create a new live key from 32 random bytes."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    plaintext = LIVE_PREFIX + body
    return MintedKey(plaintext, hash_key(plaintext), plaintext[:DISPLAY_PREFIX_LENGTH])


def is_well_formed(candidate: str) -> bool:
    """Tell whether *candidate* has the exact shape of a Wacrm key."""
    return len(candidate) == KEY_LENGTH and _KEY_RE.fullmatch(candidate) is not None


def key_from_authorization(value: str | None) -> str | None:
    """Return the well-formed key carried by the header *value*, or None.

    ``Bearer <key>`` is the documented form (scheme matched case-insensitively, RFC 7235);
    Wacrm also accepts the bare key as the whole value.
    """
    m = _AUTHORIZATION_RE.fullmatch(value) if value else None
    return None if m is None else m[1] or m[2]
