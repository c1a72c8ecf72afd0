"""Wacrm's own PostgreSQL tables as a key source, read as they are."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import asyncpg

from loader.rows import KeyRow, KeyRules, is_valid_hash
from loader.source import Changes, KeyListing, NewKey, NotFound, SourceUnavailable
from sidecar.records import FIELDS

log = logging.getLogger(__name__)

#: The channel the shipped trigger (``wacrm-notify.sql``) notifies on.
CHANNEL = "wacrm_gate"
#: How often the listening connection is checked when no notification arrives.
_HEALTH_EVERY = 5.0
#: Errors that mean the database cannot be reached or dropped the connection.
CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)

_SELECT = """
SELECT k.id::text, k.account_id::text, a.name, a.id IS NOT NULL, k.key_prefix, k.key_hash,
       k.scopes, ceil(extract(epoch FROM k.expires_at) * 1000)::int8, k.revoked_at IS NOT NULL,
       NULL::text
FROM api_keys k LEFT JOIN accounts a ON a.id = k.account_id
"""
#: The rows a change names: $1 key hashes, $2 key ids, $3 account ids.
_ROWS = (
    _SELECT
    + "WHERE k.key_hash = ANY($1::text[]) OR k.id = ANY($2::uuid[])"
    + " OR k.account_id = ANY($3::uuid[])"
)


#: `bodies`: each unrevoked key's hash and, when the SQL can tell what its record is, that
#: record's JSON after the version field exactly as ``sidecar.records.body`` makes it; NULL
#: hash = expired at $2.  $1: known scopes, $2: version (ms), $3/$4 ($5/$6): the ids and JSON
#: rate limits of accounts (keys) with limits of their own; {body} is `_body_sql`'s.
_BODIES = """
SELECT CASE WHEN e.ms <= $2 THEN NULL ELSE k.key_hash END,
       CASE WHEN k.scopes <@ $1::text[] AND (e.ms IS NULL OR e.ms > $2) THEN convert_to(
         {body}, 'UTF8') END
FROM api_keys k
CROSS JOIN LATERAL (SELECT ceil(extract(epoch FROM k.expires_at) * 1000)::int8 AS ms) e
LEFT JOIN (
  SELECT a.id, coalesce(al.l, 'null') AS l, '"' || a.id::text || '"' AS id_json,
         coalesce(to_json(a.name)::text, 'null') AS name_json
  FROM accounts a LEFT JOIN unnest($3::text[], $4::text[]) AS al(id, l) ON al.id = a.id::text
  OFFSET 0
) a ON a.id = k.account_id
{key_join}WHERE k.revoked_at IS NULL
"""
#: Scopes that JSON writes as they are, so the SQL may quote them without escaping.
_PLAIN_SCOPE = re.compile(r"[A-Za-z0-9:_.\-]+")


def parse_payload(payload: str) -> Changes | None:
    """Return the rows a notification names, or None when *payload* is not one of ours.

    A last field ``@<unix seconds>`` is when the change was made (triggers installed before
    it was added send none).
    """
    fields = payload.split()
    changed_at = _stamp(fields.pop()) if len(fields) > 2 and fields[-1][:1] == "@" else None
    if len(fields) in (3, 4) and fields[0] == "k" and _is_uuid(fields[1]):
        hashes = {h for h in fields[2:] if is_valid_hash(h)}
        return Changes(key_hashes=hashes, key_ids={fields[1]}, changed_at=changed_at)
    if len(fields) == 2 and fields[0] == "a" and _is_uuid(fields[1]):
        return Changes(account_ids={fields[1]}, changed_at=changed_at)
    return None


class PostgresSource:
    """Read and manage keys in Wacrm's ``api_keys`` and ``accounts`` tables."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, timeout: float) -> None:
        self.pool = pool
        self.dsn = dsn
        self.timeout = timeout

    @classmethod
    async def open(cls, dsn: str, *, connect_timeout: float) -> PostgresSource:
        """Connect to the database at *dsn*."""
        with _unavailable("cannot connect to PostgreSQL"):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=4,
                timeout=connect_timeout,
                command_timeout=None,
                init=_warm,
            )
        return cls(pool, dsn, connect_timeout)

    async def close(self) -> None:
        """Release the connections."""
        await self.pool.close()

    def snapshot(self, batch: int) -> AsyncIterator[list[KeyRow]]:
        """Yield every unrevoked key, *batch* rows at a time, from one consistent snapshot.

        The rows are asyncpg's own, in `KeyRow`'s field order: a million named tuples would
        cost seconds, and `judge` only unpacks them.
        """
        return self._stream(batch, _SELECT + "WHERE k.revoked_at IS NULL")

    def bodies(
        self, batch: int, *, version: int, rules: KeyRules
    ) -> AsyncIterator[list[tuple[str | None, bytes | None]]]:
        """Yield (hash, record body) of every unrevoked key, from one consistent snapshot.

        The body is ``encode(record, version=...)`` after the version field, built by the
        SQL for the rows it can judge (account present, scopes all known, not expired at
        *version*, rate limit from *rules*), else None.  The hash is None for a key expired
        at *version*.  A body is never wrong in a way that could match what the loader
        wrote to Redis, but it may differ from ``encode`` (names it would clean, duplicate
        scopes): only equality with a stored record proves it current.
        """
        query, args = _bodies(version, rules)
        return self._stream(batch, query, *args)

    async def _stream(self, batch: int, query: str, *args: object) -> AsyncIterator[list[Any]]:
        """Yield the rows of *query*, *batch* at a time, from one consistent snapshot."""
        with _unavailable("reading api_keys failed"):
            async with (
                self.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                cursor = await conn.cursor(query, *args)
                while rows := await cursor.fetch(batch):
                    yield rows

    async def rows(self, changes: Changes) -> list[KeyRow]:
        """Return the current rows (revoked ones too) named by *changes*."""
        with _unavailable("reading api_keys failed"):
            records = await self.pool.fetch(
                _ROWS,
                sorted(changes.key_hashes),
                sorted(i for i in changes.key_ids if _is_uuid(i)),
                sorted(i for i in changes.account_ids if _is_uuid(i)),
            )
        return [_row(r) for r in records]

    @contextlib.asynccontextmanager
    async def feed(self, poll_interval: float) -> AsyncIterator[PostgresFeed]:
        """Listen for the trigger's notifications on a connection of its own."""
        with _unavailable("cannot connect to PostgreSQL"):
            conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
        feed = PostgresFeed(conn)
        try:
            with _unavailable("cannot LISTEN"):
                await conn.add_listener(CHANNEL, feed.notified)
            conn.add_termination_listener(feed.terminated)
            yield feed
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await asyncio.wait_for(conn.close(), 2)
            conn.terminate()

    async def create_account(self, account_id: str, name: str) -> None:
        """Insert an account."""
        with _unavailable("cannot write to PostgreSQL"):
            await self.pool.execute(
                "INSERT INTO accounts (id, name) VALUES ($1::uuid, $2)", account_id, name
            )

    async def create_key(self, key: NewKey) -> None:
        """Insert *key*; raise NotFound when its account does not exist."""
        if not _is_uuid(key.account_id):
            raise NotFound(f"no account {key.account_id!r}")
        with _unavailable("cannot write to PostgreSQL"):
            try:
                await self.pool.execute(
                    "INSERT INTO api_keys (id, account_id, created_by, name, key_prefix,"
                    " key_hash, scopes, expires_at)"
                    " VALUES ($1::uuid, $2::uuid, $3::uuid, $4, $5, $6, $7, $8)",
                    key.id,
                    key.account_id,
                    key.created_by,
                    key.name,
                    key.key_prefix,
                    key.key_hash,
                    list(key.scopes),
                    key.expires_at,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"no account {key.account_id}") from None

    async def list_keys(self, account_id: str | None) -> list[KeyListing]:
        """Return every key (of *account_id* when given), oldest first."""
        if account_id is not None and not _is_uuid(account_id):
            raise NotFound(f"no account {account_id!r}")
        with _unavailable("reading api_keys failed"):
            records = await self.pool.fetch(
                "SELECT id::text, account_id::text, name, key_prefix, scopes, last_used_at,"
                " expires_at, revoked_at, created_at FROM api_keys"
                " WHERE $1::uuid IS NULL OR account_id = $1::uuid ORDER BY created_at, id",
                account_id,
            )
        return [
            KeyListing(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6], r[7], r[8]) for r in records
        ]

    async def revoke_key(self, key_id: str) -> str:
        """Set ``revoked_at`` of the active key *key_id*; return its hash or raise NotFound."""
        if not _is_uuid(key_id):
            raise NotFound(f"no active key {key_id!r}")
        with _unavailable("cannot write to PostgreSQL"):
            key_hash = await self.pool.fetchval(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1::uuid"
                " AND revoked_at IS NULL RETURNING key_hash",
                key_id,
            )
        if key_hash is None:
            raise NotFound(f"no active key {key_id}")
        return str(key_hash)

    async def touch(self, uses: Mapping[str, int]) -> int:
        """Set ``last_used_at`` of each key id in *uses* to its time (ms) if that is later."""
        ids = [i for i in uses if _is_uuid(i)]
        if not ids:
            return 0
        with _unavailable("cannot write to PostgreSQL"):
            status = await self.pool.execute(
                "UPDATE api_keys k SET last_used_at = u.at FROM"
                " (SELECT id, to_timestamp(ms / 1000.0)"
                " AS at FROM unnest($1::uuid[], $2::int8[]) AS x(id, ms)) u"
                " WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
                ids,
                [uses[i] for i in ids],
            )
        return int(status.split()[-1])


class PostgresFeed:
    """The notifications of one listening connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._queue: asyncio.Queue[Changes] = asyncio.Queue()
        self._lost = False
        self._checked = time.monotonic()

    def notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        """Queue the rows a notification names."""
        changes = parse_payload(payload)
        if changes is None:
            # Never log the payload itself: it may carry a key's hash.
            log.warning("ignoring a notification on %s that names no row", channel)
        else:
            self._queue.put_nowait(changes)

    def terminated(self, conn: Any) -> None:
        """Note that the listening connection is gone."""
        self._lost = True
        self._queue.put_nowait(Changes(lost=True))

    async def next(self, within: float) -> Changes:
        """Return the changes notified within *within* seconds (empty when none)."""
        changes = Changes()
        try:
            changes.update(await asyncio.wait_for(self._queue.get(), within))
        except TimeoutError:
            await self._health_check()
        while not self._queue.empty():
            changes.update(self._queue.get_nowait())
        if self._lost:
            raise SourceUnavailable("the PostgreSQL connection listening for changes closed")
        return changes

    async def _health_check(self) -> None:
        if time.monotonic() - self._checked < _HEALTH_EVERY:
            return
        self._checked = time.monotonic()
        with _unavailable("the PostgreSQL connection listening for changes broke"):
            await self.conn.fetchval("SELECT 1", timeout=_HEALTH_EVERY)


def _bodies(version: int, rules: KeyRules) -> tuple[str, list[Any]]:
    """Return `_BODIES` for *rules* and its arguments at *version*."""
    limits = rules.limits
    if all(_PLAIN_SCOPE.fullmatch(s) for s in rules.scopes):
        scopes = (
            "CASE WHEN cardinality(k.scopes) = 0 THEN '[]'"
            " ELSE '[\"' || array_to_string(k.scopes, '\",\"') || '\"]' END"
        )
    else:
        scopes = "to_json(k.scopes)::text"
    # A key's own limit wins over its account's (`Limits.of`); the join costs a little per
    # row, so it is there only when some key has a limit of its own.
    key_join, limit = "", "a.l"
    if limits.keys:
        key_join = "LEFT JOIN unnest($5::text[], $6::text[]) AS kl(id, l) ON kl.id = k.id::text\n"
        limit = "coalesce(kl.l, a.l)"
    query = _BODIES.format(body=_body_sql(limit=limit, scopes=scopes), key_join=key_join)
    args: list[Any] = [
        sorted(rules.scopes),
        version,
        list(limits.accounts),
        [f"[{r.limit},{r.window_ms}]" for r in limits.accounts.values()],
    ]
    if limits.keys:
        args += [list(limits.keys), [f"[{r.limit},{r.window_ms}]" for r in limits.keys.values()]]
    return query, args


def _body_sql(*, limit: str, scopes: str) -> str:
    """Return the SQL text expression of a record's body: its fields in `FIELDS`'s order."""
    json_of = {  # each field's JSON, as SQL text
        "l": limit,
        "k": "'\"' || k.id::text || '\"'",  # a uuid's text needs no JSON escape
        "a": "a.id_json",
        "n": "a.name_json",
        "p": "to_json(k.key_prefix)::text",
        "s": scopes,
        "e": "coalesce(e.ms::text, 'null')",
    }
    names = [name for name, _ in FIELDS[1:]]  # the version is not in the body
    if sorted(names) != sorted(json_of):
        raise ValueError(f"the SQL builds fields {sorted(json_of)}, a record has {names}")
    return " || ".join(f"',\"{name}\":' || {json_of[name]}" for name in names) + " || '}'"


def _row(r: Any) -> KeyRow:
    return KeyRow(*r)


async def _warm(conn: asyncpg.Connection) -> None:
    """Prepare the query of `PostgresSource.rows` on a new connection of the pool.

    A revocation is applied by that query: its first run on a connection (planning it, and
    the new backend reading the tables' catalogue) would otherwise delay the first change
    applied after every connect.
    """
    await conn.fetch(_ROWS, [], [], [])


def _stamp(field: str) -> float | None:
    try:
        value = float(field[1:])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as e:
        raise SourceUnavailable(f"{what}: {e or type(e).__name__}") from e
