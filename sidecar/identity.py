"""Signed identity: the gate's HMAC-SHA256 over the identity it grants, and its check.

When the sidecar has a secret (``WACRM_IDENTITY_SECRET``), every allowed answer carries
``X-Wacrm-Signature: v1 t=<unix seconds> s=<64 hex digits>`` beside the three identity
headers, and the proxy passes it upstream.  The signature covers the identity (account id,
key id, scopes as sent), the method and request target the gate checked, and the time, so an
upstream that verifies it cannot be fooled by a request that reached it around the proxy.
docs/identity-signature.md is the specification, with test vectors, for other languages.

This module uses the standard library only and imports nothing else from the gate: a Python
upstream copies it as is (``contrib/python/wacrm_identity.py`` is this file).  Use:

    import wacrm_identity

    SECRETS = wacrm_identity.parse_secrets(os.environ["WACRM_IDENTITY_SECRETS"])

    # aiohttp (request.headers is case-insensitive; raw_path is the target as received):
    who = wacrm_identity.verify(request.headers, request.method, request.raw_path, SECRETS)
    # any WSGI application (Flask, Django, ...), from its environ:
    who = wacrm_identity.verify_wsgi(environ, SECRETS)

Each raises `InvalidSignature` for a request whose identity the gate did not sign (answer it
401), and returns the `Identity` to use: read the account from it, never from the headers.
During a rotation of the secret, give both the old and the new one (``parse_secrets``).
"""

from __future__ import annotations

import hmac
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The header that carries the signature; the others are the identity it signs.
SIGNATURE_HEADER = "X-Wacrm-Signature"
ACCOUNT_HEADER = "X-Wacrm-Account-Id"
KEY_HEADER = "X-Wacrm-Key-Id"
SCOPES_HEADER = "X-Wacrm-Scopes"
#: The version tag of the header's format and of the signed string.
VERSION = "v1"
#: The first field of the signed string: no other message signed with the secret starts so.
LABEL = "wacrm-identity-v1"
#: Seconds by which a signature's time may differ from the verifier's clock, either way.
MAX_AGE = 30.0
#: The fewest characters a secret may have.
MIN_SECRET_LENGTH = 32
#: X-Wacrm-Scopes of a key without scopes.
NO_SCOPES = "-"

_SIGNATURE = re.compile(r"v1 t=(0|[1-9][0-9]{0,11}) s=([0-9a-f]{64})")
_SECRET = re.compile(r"[!-~]+")  # printable ASCII, no space


class InvalidSignature(Exception):
    """The request's identity was not signed by the gate, or not for this request, or not now."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Whose key the gate let through, as signed at *signed_at* (Unix seconds)."""

    account_id: str
    key_id: str
    #: The key's scopes, in the order the gate sent them (empty for a key without scopes).
    scopes: tuple[str, ...]
    signed_at: int


def secret_key(text: str) -> bytes:
    """Return the HMAC key of the secret *text*, its surrounding white space removed.

    Raise ValueError, without repeating *text*, unless what remains is at least
    `MIN_SECRET_LENGTH` printable ASCII characters without spaces.
    """
    text = text.strip()
    if not text:
        raise ValueError("is empty")
    if not _SECRET.fullmatch(text):
        raise ValueError("must be printable ASCII characters without spaces")
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"is {len(text)} characters long, fewer than {MIN_SECRET_LENGTH}: make one with"
            " python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return text.encode("ascii")


def parse_secrets(text: str) -> list[bytes]:
    """Return the keys of the secrets in *text*, separated by white space (old and new ones)."""
    keys = [secret_key(part) for part in text.split()]
    if not keys:
        raise ValueError("no secret given")
    return keys


def canonical(
    timestamp: int, method: str, target: str | bytes, account_id: str, key_id: str, scopes: str
) -> bytes:
    """Return the bytes that are signed: each field as a netstring (``<length>:<bytes>,``).

    The fields, in this order: `LABEL`, *timestamp* in decimal, *method*, *target* (the path,
    then ``?`` and the query when the query is not empty), *account_id*, *key_id* and
    *scopes* (the X-Wacrm-Scopes value as sent).  A str is taken as UTF-8; a str target may
    hold the surrogate escapes with which aiohttp keeps bytes that are not UTF-8.
    """
    raw = target if isinstance(target, bytes) else target.encode("utf-8", "surrogateescape")
    path, _, query = raw.partition(b"?")
    fields = (
        LABEL.encode(),
        str(timestamp).encode(),
        method.encode(),
        path + b"?" + query if query else path,
        account_id.encode(),
        key_id.encode(),
        scopes.encode(),
    )
    return b"".join(b"%d:%s," % (len(f), f) for f in fields)


def sign(
    key: bytes,
    *,
    timestamp: int,
    method: str,
    target: str | bytes,
    account_id: str,
    key_id: str,
    scopes: str,
) -> str:
    """Return the X-Wacrm-Signature value for these fields (see `canonical`), signed with *key*."""
    message = canonical(timestamp, method, target, account_id, key_id, scopes)
    return f"{VERSION} t={timestamp} s={_digest(key, message)}"


def verify(
    headers: Mapping[str, str],
    method: str,
    target: str | bytes,
    keys: Iterable[bytes],
    *,
    max_age: float = MAX_AGE,
    now: float | None = None,
) -> Identity:
    """Return the identity in *headers* if the gate signed it for *method* and *target*.

    *headers* is the request's, looked up case-insensitively (as every framework's are);
    *method* and *target* are the request's method and its target exactly as received on
    the request line (the raw path, not a decoded one, and the query).  A signature made with
    any of *keys*, at most *max_age* seconds from *now* (the clock), either way, is accepted.
    Raise `InvalidSignature` saying why not.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("no key to verify with")
    signature = headers.get(SIGNATURE_HEADER)
    account_id, key_id = headers.get(ACCOUNT_HEADER), headers.get(KEY_HEADER)
    scopes = headers.get(SCOPES_HEADER)
    if signature is None or account_id is None or key_id is None or scopes is None:
        raise InvalidSignature("no signed identity")
    parsed = _SIGNATURE.fullmatch(signature)
    if parsed is None:
        raise InvalidSignature(f"{SIGNATURE_HEADER} is not 'v1 t=<seconds> s=<64 hex digits>'")
    timestamp, given = int(parsed.group(1)), parsed.group(2)
    age = (time.time() if now is None else now) - timestamp
    if age > max_age:
        raise InvalidSignature("the signature is stale")
    if age < -max_age:
        raise InvalidSignature("the signature is from the future")
    message = canonical(timestamp, method, target, account_id, key_id, scopes)
    # Every key is tried, so the time taken does not tell which one matched.
    matched = [hmac.compare_digest(_digest(k, message), given) for k in keys]
    if not any(matched):
        raise InvalidSignature("the signature does not match this identity and request")
    return Identity(
        account_id, key_id, () if scopes == NO_SCOPES else tuple(scopes.split(" ")), timestamp
    )


def verify_wsgi(
    environ: Mapping[str, object],
    keys: Iterable[bytes],
    *,
    max_age: float = MAX_AGE,
    now: float | None = None,
) -> Identity:
    """`verify` the request of the WSGI *environ*.

    The target is the raw one that gunicorn (``RAW_URI``), uWSGI and Apache's mod_wsgi
    (``REQUEST_URI``) keep.  A server that keeps neither (wsgiref, waitress) gives only the
    decoded path: it is escaped again, as the gate's path rule lets a client send it, so a
    request whose path escapes a character that needs no escape (``%21`` for ``!``) is refused.
    """
    headers = {
        name: value
        for name in (SIGNATURE_HEADER, ACCOUNT_HEADER, KEY_HEADER, SCOPES_HEADER)
        if isinstance(value := environ.get("HTTP_" + name.upper().replace("-", "_")), str)
    }
    method = str(environ.get("REQUEST_METHOD", ""))
    return verify(headers, method, wsgi_target(environ), keys, max_age=max_age, now=now)


def _digest(key: bytes, message: bytes) -> str:
    return hmac.digest(key, message, "sha256").hex()


def wsgi_target(environ: Mapping[str, object]) -> bytes:
    """Return the request target of the WSGI *environ*, as its request line held it."""
    for name in ("RAW_URI", "REQUEST_URI"):
        raw = environ.get(name)
        if isinstance(raw, str) and raw:
            return raw.encode("latin-1")
    # WSGI strings hold the request's bytes as Latin-1 characters (PEP 3333).
    path = f"{environ.get('SCRIPT_NAME', '')}{environ.get('PATH_INFO', '')}".encode("latin-1")
    query = str(environ.get("QUERY_STRING", "")).encode("latin-1")
    escaped = urllib.parse.quote_from_bytes(path, safe="/-._~!$&'()*+,=:@").encode("ascii")
    return escaped + b"?" + query if query else escaped
