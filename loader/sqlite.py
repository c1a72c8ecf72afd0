"""A SQLite file with Wacrm's columns as a key source: the default for standalone installs."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import orjson

from loader.rows import KeyRow
from loader.source import Changes, KeyListing, NewKey, NotFound, SourceUnavailable

T = TypeVar("T")

#: Change-log rows older than this are pruned; a loader restarted later reconciles anyway.
_CHANGES_KEPT_S = 3600.0
_PRUNE_EVERY_S = 600.0

_SELECT = """
SELECT k.id, k.account_id, a.name, a.id IS NOT NULL, k.key_prefix, k.key_hash, k.scopes,
       k.expires_at, k.revoked_at IS NOT NULL
FROM api_keys k LEFT JOIN accounts a ON a.id = k.account_id
"""


def schema() -> str:
    """Return the SQL that creates the key table, its change log and its triggers."""
    return resources.files("loader").joinpath("sqlite-schema.sql").read_text()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """Return *moment* as the ISO 8601 UTC text the SQLite table stores."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str | None) -> datetime | None:
    """Return the stored timestamp *text* as an aware datetime; raise ValueError if bad."""
    if text is None:
        return None
    moment = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class _Db:
    """One SQLite connection, used from one thread of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self.conn: sqlite3.Connection | None = None

    async def open(self) -> _Db:
        await self.run(self._connect)
        return self

    def _connect(self) -> None:
        conn = sqlite3.connect(
            self.path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        conn.text_factory = _text
        conn.execute("PRAGMA foreign_keys = ON")
        self.conn = conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        with _unavailable(f"SQLite {self.path}"):
            return await loop.run_in_executor(self._executor, fn, *args)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        assert self.conn is not None
        return self.conn.execute(sql, params)

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(self._executor, self.conn.close)
        self._executor.shutdown(wait=False)


class SqliteSource:
    """Read and manage keys in a SQLite file; use `open` to make one."""

    def __init__(self, db: _Db) -> None:
        self.db = db
        self.path = db.path

    @classmethod
    async def open(cls, path: str | Path) -> SqliteSource:
        """Open the file at *path*, creating it and the schema when needed."""
        db = _Db(Path(path))
        await db.open()
        try:
            await db.run(_apply_schema, db)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def close(self) -> None:
        """Release the connection."""
        await self.db.close()

    async def snapshot(self, batch: int) -> AsyncIterator[list[KeyRow]]:
        """Yield every unrevoked key, *batch* rows at a time, from one consistent snapshot."""
        db = await _Db(self.path).open()
        try:
            await db.run(db.execute, "BEGIN")
            cursor = await db.run(db.execute, _SELECT + "WHERE k.revoked_at IS NULL")
            while rows := await db.run(cursor.fetchmany, batch):
                yield [_row(r) for r in rows]
            await db.run(db.execute, "COMMIT")
        finally:
            await db.close()

    async def rows(self, changes: Changes) -> list[KeyRow]:
        """Return the current rows (revoked ones too) named by *changes*."""
        sql = (
            _SELECT
            + "WHERE k.key_hash IN (SELECT value FROM json_each(?))"
            + " OR k.id IN (SELECT value FROM json_each(?))"
            + " OR k.account_id IN (SELECT value FROM json_each(?))"
        )
        params = [
            orjson.dumps(sorted(s)).decode()
            for s in (changes.key_hashes, changes.key_ids, changes.account_ids)
        ]
        rows = await self.db.run(lambda: self.db.execute(sql, params).fetchall())
        return [_row(r) for r in rows]

    @contextlib.asynccontextmanager
    async def feed(self, poll_interval: float) -> AsyncIterator[SqliteFeed]:
        """Watch the file for committed changes, every *poll_interval* seconds."""
        db = await _Db(self.path).open()
        try:
            feed = SqliteFeed(db, poll_interval)
            await feed.start()
            yield feed
        finally:
            await db.close()

    async def create_account(self, account_id: str, name: str) -> None:
        """Insert an account."""
        await self.db.run(
            self.db.execute, "INSERT INTO accounts (id, name) VALUES (?, ?)", (account_id, name)
        )

    async def create_key(self, key: NewKey) -> None:
        """Insert *key*; raise NotFound when its account does not exist."""

        def insert() -> bool:
            if (
                self.db.execute("SELECT 1 FROM accounts WHERE id = ?", (key.account_id,)).fetchone()
                is None
            ):
                return False
            self.db.execute(
                "INSERT INTO api_keys (id, account_id, created_by, name, key_prefix, key_hash,"
                " scopes, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.account_id,
                    key.created_by,
                    key.name,
                    key.key_prefix,
                    key.key_hash,
                    orjson.dumps(list(key.scopes)).decode(),
                    None if key.expires_at is None else format_time(key.expires_at),
                ),
            )
            return True

        if not await self.db.run(insert):
            raise NotFound(f"no account {key.account_id}")

    async def list_keys(self, account_id: str | None) -> list[KeyListing]:
        """Return every key (of *account_id* when given), oldest first."""
        rows = await self.db.run(
            lambda: self.db.execute(
                "SELECT id, account_id, name, key_prefix, scopes, last_used_at, expires_at,"
                " revoked_at, created_at FROM api_keys WHERE ? IS NULL OR account_id = ?"
                " ORDER BY created_at, id",
                (account_id, account_id),
            ).fetchall()
        )
        out = []
        for r in rows:
            created = parse_time(r[8])
            assert created is not None
            out.append(
                KeyListing(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    tuple(s or "?" for s in _scopes(r[4])),
                    parse_time(r[5]),
                    parse_time(r[6]),
                    parse_time(r[7]),
                    created,
                )
            )
        return out

    async def revoke_key(self, key_id: str) -> str:
        """Set ``revoked_at`` of the active key *key_id*; return its hash or raise NotFound."""
        row = await self.db.run(
            lambda: self.db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                " RETURNING key_hash",
                (format_time(datetime.now(UTC)), key_id),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"no active key {key_id}")
        return str(row[0])

    async def touch(self, uses: Mapping[str, int]) -> int:
        """Set ``last_used_at`` of each key id in *uses* to its time (ms) if that is later."""
        params = [
            (at, key_id, at)
            for key_id, ms in uses.items()
            for at in (format_time(datetime.fromtimestamp(ms / 1000, UTC)),)
        ]

        def update() -> int:
            cursor = self.db.execute("BEGIN")
            cursor.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
                params,
            )
            self.db.execute("COMMIT")
            return cursor.rowcount

        return await self.db.run(update) if params else 0


class SqliteFeed:
    """Changes to a SQLite file, found through PRAGMA data_version and the change log."""

    def __init__(self, db: _Db, poll_interval: float) -> None:
        self.db = db
        self.poll_interval = poll_interval
        self._version = 0
        self._cursor = 0
        self._pruned = time.monotonic()

    async def start(self) -> None:
        """Remember where the change log ends now."""
        self._version, self._cursor = await self.db.run(self._position)

    async def next(self, within: float) -> Changes:
        """Return the changes committed within *within* seconds (empty when none)."""
        deadline = time.monotonic() + within
        while True:
            changes = await self.db.run(self._poll)
            if changes or time.monotonic() >= deadline:
                return changes
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def _position(self) -> tuple[int, int]:
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        row = self.db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'wacrm_changes'"
        ).fetchone()
        return int(version), 0 if row is None else int(row[0])

    def _poll(self) -> Changes:
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        changes = Changes()
        if version == self._version:
            return changes
        self._version = version
        rows = self.db.execute(
            "SELECT seq, key_id, key_hash, account_id, changed_at FROM wacrm_changes"
            " WHERE seq > ? ORDER BY seq",
            (self._cursor,),
        ).fetchall()
        # AUTOINCREMENT numbers commits without gaps; a gap means the log was pruned
        # past us, and only a full reconcile can tell what changed.
        changes.lost = bool(rows) and rows[0][0] != self._cursor + 1
        if rows:
            changes.changed_at = _seconds(rows[0][4])
        for seq, key_id, key_hash, account_id, _ in rows:
            self._cursor = max(self._cursor, seq)
            if key_hash:
                changes.key_hashes.add(key_hash)
            if key_id:
                changes.key_ids.add(key_id)
            if account_id:
                changes.account_ids.add(account_id)
        self._prune()
        return changes

    def _prune(self) -> None:
        if time.monotonic() - self._pruned < _PRUNE_EVERY_S:
            return
        self._pruned = time.monotonic()
        cutoff = format_time(datetime.fromtimestamp(time.time() - _CHANGES_KEPT_S, UTC))
        self.db.execute(
            "DELETE FROM wacrm_changes WHERE seq <= ? AND changed_at < ?", (self._cursor, cutoff)
        )
        self._version = int(self.db.execute("PRAGMA data_version").fetchone()[0])


def _seconds(text: str | None) -> float | None:
    """Return the stored timestamp *text* in Unix seconds, or None if it is unreadable."""
    try:
        moment = parse_time(text)
    except (ValueError, TypeError):
        return None
    return None if moment is None else moment.timestamp()


def _apply_schema(db: _Db) -> None:
    assert db.conn is not None
    db.conn.executescript(schema())


def _row(r: Any) -> KeyRow:
    problem = None
    try:
        expires = parse_time(r[7])
    except (ValueError, TypeError):
        expires, problem = None, f"unreadable expires_at {r[7]!r}"
    return KeyRow(
        key_id=str(r[0]),
        account_id=str(r[1]),
        account_name=r[2],
        account_exists=bool(r[3]),
        key_prefix=str(r[4]),
        key_hash=str(r[5]),
        scopes=_scopes(r[6]),
        expires_at_ms=None if expires is None else _ceil_ms(expires),
        revoked=bool(r[8]),
        problem=problem,
    )


def _scopes(raw: Any) -> tuple[str | None, ...]:
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return (None,)
    if not isinstance(value, list):
        return (None,)
    return tuple(s if isinstance(s, str) else None for s in value)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise SourceUnavailable(f"{what}: {e}") from e


def _ceil_ms(moment: datetime) -> int:
    """Return *moment* in Unix milliseconds, rounded up: a key never expires early."""
    since = moment - _EPOCH
    return since.days * 86_400_000 + since.seconds * 1000 + -(-since.microseconds // 1000)
