"""What the loader needs from a key table, whichever database holds it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from loader.rows import KeyRow


class SourceUnavailable(Exception):
    """The key table cannot be reached, or stopped answering."""


class NotFound(LookupError):
    """The account or key named does not exist (or, for a revocation, is already revoked)."""


@dataclass(slots=True)
class Changes:
    """Keys whose rows may have changed: by hash, by id, or every key of an account."""

    key_hashes: set[str] = field(default_factory=set)
    key_ids: set[str] = field(default_factory=set)
    account_ids: set[str] = field(default_factory=set)
    #: Changes may have been missed: only a full reconcile can catch up.
    lost: bool = False
    #: When the oldest of these changes was made (Unix seconds, the database's clock), if known.
    changed_at: float | None = None

    def __bool__(self) -> bool:
        return bool(self.key_hashes or self.key_ids or self.account_ids or self.lost)

    def update(self, other: Changes) -> None:
        """Add *other*'s changes to these."""
        self.key_hashes |= other.key_hashes
        self.key_ids |= other.key_ids
        self.account_ids |= other.account_ids
        self.lost = self.lost or other.lost
        if other.changed_at is not None and (
            self.changed_at is None or other.changed_at < self.changed_at
        ):
            self.changed_at = other.changed_at


@dataclass(frozen=True, slots=True)
class KeyListing:
    """What Wacrm's dashboard shows of a key: never its hash, never its plaintext."""

    id: str
    account_id: str
    name: str
    key_prefix: str
    scopes: tuple[str, ...]
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key row to insert."""

    id: str
    account_id: str
    name: str
    key_prefix: str
    key_hash: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    created_by: str | None = None


class ChangeFeed(Protocol):
    """Changes committed to the key table since the feed opened."""

    async def next(self, within: float) -> Changes:
        """Return the changes seen within *within* seconds (empty when none)."""
        ...


class Source(Protocol):
    """A table of API keys joined to their accounts."""

    def snapshot(self, batch: int) -> AsyncIterator[list[KeyRow]]:
        """Yield every unrevoked key, *batch* rows at a time, from one consistent snapshot."""
        ...

    async def rows(self, changes: Changes) -> list[KeyRow]:
        """Return the current rows (revoked ones too) named by *changes*."""
        ...

    def feed(self, poll_interval: float) -> AbstractAsyncContextManager[ChangeFeed]:
        """Start watching for committed changes."""
        ...

    async def create_account(self, account_id: str, name: str) -> None:
        """Insert an account."""
        ...

    async def create_key(self, key: NewKey) -> None:
        """Insert *key*; raise NotFound when its account does not exist."""
        ...

    async def list_keys(self, account_id: str | None) -> list[KeyListing]:
        """Return every key (of *account_id* when given), oldest first."""
        ...

    async def revoke_key(self, key_id: str) -> str:
        """Set ``revoked_at`` of the active key *key_id*; return its hash or raise NotFound."""
        ...

    async def touch(self, uses: Mapping[str, int]) -> int:
        """Set ``last_used_at`` of each key id in *uses* to its time (ms) if that is later."""
        ...

    async def close(self) -> None:
        """Release the connections."""
        ...


async def open_source(url: str, *, connect_timeout: float) -> Source:
    """Connect to the key table at *url*; raise SourceUnavailable when that fails."""
    if url.startswith("sqlite:///"):
        from loader.sqlite import SqliteSource

        return await SqliteSource.open(url.removeprefix("sqlite:///"))
    from loader.postgres import PostgresSource

    return await PostgresSource.open(url, connect_timeout=connect_timeout)
