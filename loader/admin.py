"""Managing accounts and keys in the table, as Wacrm's dashboard does, plus Redis at once."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from loader import rules
from loader.mirror import REDIS_ERRORS, Mirror
from loader.reconcile import refresh
from loader.rows import KeyRules
from loader.runner import key_rules
from loader.settings import Settings
from loader.source import Changes, KeyListing, NewKey, Source, open_source
from sidecar.apikeys import mint
from sidecar.records import Keyspace

log = logging.getLogger(__name__)

#: How long the management commands wait for Redis before leaving the update to the loader.
REDIS_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Created:
    """A key just minted: *plaintext* exists only here."""

    key: NewKey
    plaintext: str
    #: Whether Redis already holds the key (False: it works once the loader syncs it).
    in_redis: bool


async def create_account(settings: Settings, name: str) -> str:
    """Insert an account called *name*; return its id."""
    account_id = str(uuid.uuid4())
    clean = rules.account_name(name)
    async with _source(settings) as source:
        await source.create_account(account_id, clean)
    return account_id


async def create_key(
    settings: Settings,
    *,
    account_id: str,
    name: str,
    scopes: Sequence[str],
    expires_in_days: int | None,
    created_by: str | None = None,
) -> Created:
    """Mint a key by Wacrm's rules, store its hash and put its record in Redis right away."""
    clean_name = rules.key_name(name)
    known = key_rules(settings)
    clean_scopes = rules.scopes(scopes, known.scopes)
    days = rules.lifetime_days(expires_in_days)
    minted = mint()
    key = NewKey(
        id=str(uuid.uuid4()),
        account_id=account_id,
        name=clean_name,
        key_prefix=minted.key_prefix,
        key_hash=minted.key_hash,
        scopes=clean_scopes,
        expires_at=None if days is None else datetime.now(UTC) + timedelta(days=days),
        created_by=created_by,
    )
    async with _source(settings) as source:
        await source.create_key(key)
        in_redis = await _refresh(settings, source, key.key_hash, key.id, known)
    return Created(key, minted.plaintext, in_redis)


async def list_keys(settings: Settings, account_id: str | None) -> list[KeyListing]:
    """Return what Wacrm's dashboard shows of every key (of *account_id* when given)."""
    async with _source(settings) as source:
        return await source.list_keys(account_id)


async def revoke_key(settings: Settings, key_id: str) -> bool:
    """Revoke *key_id* in the table, then remove its record from Redis at once.

    Return whether Redis was updated; raise NotFound for an unknown or revoked key.
    """
    async with _source(settings) as source:
        key_hash = await source.revoke_key(key_id)
        return await _refresh(settings, source, key_hash, key_id, key_rules(settings))


@contextlib.asynccontextmanager
async def _source(settings: Settings) -> AsyncIterator[Source]:
    source = await open_source(settings.require_source(), connect_timeout=settings.timeout)
    try:
        yield source
    finally:
        await source.close()


async def _refresh(
    settings: Settings, source: Source, key_hash: str, key_id: str, known: KeyRules
) -> bool:
    """Make Redis agree with the current row; the version is read after our commit."""
    try:
        mirror = await Mirror.open(
            settings.redis_url,
            Keyspace(settings.redis_prefix),
            connect_timeout=min(settings.timeout, REDIS_TIMEOUT),
        )
        try:
            await refresh(
                source, mirror, Changes(key_hashes={key_hash}, key_ids={key_id}), rules=known
            )
        finally:
            await mirror.close()
    except REDIS_ERRORS as e:
        log.warning("Redis not updated, the loader will catch up: %s", e)
        return False
    return True
