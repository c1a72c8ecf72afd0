"""Redis through Sentinel: connect to the master the sentinels name, and leave it once they don't.

`connect_master` asks every sentinel of a ``redis+sentinel://`` URL at once, picks the master
of the newest configuration (`choose`), checks with ``ROLE`` that the node it reaches is a
master, and then authenticates and selects the database as `sidecar.resp.connect` does.  The
connection it returns is watched: every `WATCH_INTERVAL` seconds the sentinels are asked
again, and the connection is dropped as soon as they name another master, report a failover
in progress, or fewer than a majority of them answer.  Whoever holds the connection then
connects again, through the sentinels: the sidecar's ``RespClient`` on its next command, the
loader's ``run`` by starting a new session, which reconciles in full.

Why watch: after ``SENTINEL FAILOVER`` the old master stays a writable master, keeping its
clients, until the sentinels get round to demoting it, seconds after new clients already
reach the new master; a sidecar still reading the old one would accept keys revoked on the
new one, and the loader's writes to it would be lost.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.options import SentinelTarget, redact_url, sentinel_target
from sidecar.resp import (
    Connection,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
    encode_command,
)

log = logging.getLogger(__name__)

#: Seconds between two checks, for each open connection, that the sentinels still name its node.
WATCH_INTERVAL = 0.1
#: Longest wait for one sentinel's answer (when connecting, at most half the connect timeout too).
SENTINEL_TIMEOUT = 1.0
#: Flags by which a sentinel says the master is being replaced.
_FAILING_OVER = frozenset({"failover_in_progress", "o_down"})

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """What one sentinel said of the master: where it is, or why it could not say."""

    #: The sentinel, as ``host:port``.
    sentinel: str
    address: Address | None = None
    #: The configuration epoch of that answer: a failover makes a greater one.
    epoch: int = -1
    flags: frozenset[str] = frozenset()
    #: Why the sentinel gave no answer (None: it answered, perhaps that it knows no such master).
    error: str | None = None


def choose(master: str, answers: Sequence[Answer]) -> Answer:
    """Return the answer naming *master* that *answers*, one a sentinel, agree on.

    A majority of the sentinels must have answered, none may report a failover in progress,
    and of the addresses named, the one of the newest configuration epoch wins (a sentinel
    that missed the last failover names the old master under an older epoch).  Raise
    `RedisUnavailable` saying why there is no master to use.
    """
    heard = [a for a in answers if a.error is None]
    if not heard:
        why = "; ".join(f"{a.sentinel}: {a.error}" for a in answers)
        raise RedisUnavailable(f"no sentinel answered ({why})")
    if len(heard) <= len(answers) // 2:
        silent = "; ".join(f"{a.sentinel}: {a.error}" for a in answers if a.error is not None)
        raise RedisUnavailable(
            f"only {len(heard)} of {len(answers)} sentinels answered, not a majority ({silent})"
        )
    named = [a for a in heard if a.address is not None]
    if not named:
        raise RedisUnavailable(f"the sentinels know no master named {master!r}")
    for a in named:
        if a.flags & _FAILING_OVER:
            flags = ",".join(sorted(a.flags))
            raise RedisUnavailable(
                f"a failover of {master!r} is in progress (sentinel {a.sentinel}: {flags})"
            )
    newest = max(named, key=lambda a: a.epoch)
    if any(a.address != newest.address for a in named if a.epoch == newest.epoch):
        raise RedisUnavailable(f"the sentinels disagree on the master of {master!r}")
    return newest


async def connect_master(url: str, *, connect_timeout: float) -> Connection:
    """Connect to the master the sentinels of *url* name, in *connect_timeout* seconds.

    Raise `RedisTimeout`, or `RedisUnavailable` naming the URL without its passwords and
    saying why: no sentinel answered, the master is unknown, a failover is in progress, or
    the node named is not a master.
    """
    target = sentinel_target(url)
    where = redact_url(url)
    each = min(SENTINEL_TIMEOUT, connect_timeout / 2)
    sentinels = [_Sentinel(target, host, port) for host, port in target.sentinels]
    try:
        async with asyncio.timeout(connect_timeout):
            chosen = choose(target.master, await _ask_all(sentinels, each))
            conn = await _open_master(target, chosen)
    except TimeoutError as e:
        _close_all(sentinels)
        raise RedisTimeout(f"cannot connect to Redis at {where}: timed out") from e
    except (OSError, RedisError) as e:
        _close_all(sentinels)
        raise RedisUnavailable(
            f"cannot connect to Redis at {where}: {e or type(e).__name__}"
        ) from e
    watcher = asyncio.ensure_future(_watch(conn, target, sentinels, chosen))
    conn.on_lost(lambda _: watcher.cancel())
    return conn


async def _watch(
    conn: Connection, target: SentinelTarget, sentinels: list[_Sentinel], chosen: Answer
) -> None:
    """Drop *conn*, to the master *chosen* named, once the sentinels stop vouching for it."""
    assert chosen.address is not None
    where = _name(chosen.address)
    try:
        while conn.error is None:
            await asyncio.sleep(WATCH_INTERVAL)
            why = await _objection(target.master, sentinels, chosen)
            if why is not None and conn.error is None:
                log.warning("leaving the Redis master at %s: %s", where, why)
                conn.abort(f"left the master at {where}: {why}")
    finally:
        _close_all(sentinels)


async def _objection(master: str, sentinels: list[_Sentinel], chosen: Answer) -> str | None:
    """Ask *sentinels* about *master* again; return why to leave the *chosen* one, or None.

    A sentinel that reports a failover, or names a master of a newer epoch, is heeded at
    once, without waiting for the slower ones; otherwise `choose` judges every answer.
    """
    asking = [asyncio.ensure_future(s.ask(SENTINEL_TIMEOUT)) for s in sentinels]
    answers: list[Answer] = []
    try:
        for next_answer in asyncio.as_completed(asking):
            answer = await next_answer
            if answer.address is not None and (
                answer.flags & _FAILING_OVER or answer.epoch > chosen.epoch
            ):
                answers = [answer]  # enough on its own: the others cannot outvote it
                break
            answers.append(answer)
    finally:
        for task in asking:
            task.cancel()
    try:
        now = choose(master, answers)
    except RedisUnavailable as e:
        return str(e)
    if now.address == chosen.address:
        return None
    assert now.address is not None
    return f"the sentinels now name {_name(now.address)} the master of {master!r}"


async def _open_master(target: SentinelTarget, chosen: Answer) -> Connection:
    """Connect to the node *chosen* names, authenticate, check that it is a master, select."""
    assert chosen.address is not None
    address = chosen.address
    host, port = address
    conn = Connection()
    loop = asyncio.get_running_loop()
    try:
        tls = ssl.create_default_context() if target.tls else None
        await loop.create_connection(lambda: conn, host, port, ssl=tls)
        setup: list[asyncio.Future[Any]] = []
        user, secret = target.username, target.password
        if secret is not None:
            setup.append(_send(conn, ("AUTH", user, secret) if user else ("AUTH", secret)))
        role = _send(conn, ("ROLE",))
        if target.db:
            setup.append(_send(conn, ("SELECT", target.db)))
        conn.flush()
        await asyncio.gather(role, *setup)
        said = role.result()[0]
        if said != b"master":
            raise RedisUnavailable(
                f"{_name(address)}, which the sentinels name the master of {target.master!r},"
                f" is a {said.decode(errors='replace')} (a sentinel may lag in a failover)"
            )
    except BaseException:
        conn.abort("connect failed")
        raise
    return conn


def _send(conn: Connection, args: tuple[Any, ...]) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    conn.send(encode_command(args), fut)
    return fut


class _Sentinel:
    """One sentinel, asked over a connection kept open between questions."""

    def __init__(self, target: SentinelTarget, host: str, port: int) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.name = _name((host, port))
        self.conn: Connection | None = None

    async def ask(self, within: float) -> Answer:
        """Ask what this sentinel knows of the master, *within* seconds."""
        try:
            async with asyncio.timeout(within):
                if self.conn is None or self.conn.error is not None:
                    self.conn = await self._connect()
                reply = await self.conn.call("SENTINEL", "MASTER", self.target.master)
            return _answer(self.name, reply)
        except ReplyError as e:
            if "no such master" in str(e).lower():
                return Answer(self.name)
            self.close()
            return Answer(self.name, error=str(e))
        except TimeoutError:
            self.close()
            return Answer(self.name, error="timed out")
        except (OSError, RedisUnavailable, ValueError, LookupError, TypeError) as e:
            self.close()
            return Answer(self.name, error=str(e) or type(e).__name__)

    async def _connect(self) -> Connection:
        conn = Connection()
        loop = asyncio.get_running_loop()
        try:
            tls = ssl.create_default_context() if self.target.tls else None
            await loop.create_connection(lambda: conn, self.host, self.port, ssl=tls)
            secret, user = self.target.sentinel_password, self.target.sentinel_username
            if secret is not None:
                await conn.call(*(("AUTH", user, secret) if user else ("AUTH", secret)))
        except BaseException:
            conn.abort("connect failed")
            raise
        return conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


async def _ask_all(sentinels: Sequence[_Sentinel], within: float) -> list[Answer]:
    return list(await asyncio.gather(*(s.ask(within) for s in sentinels)))


def _close_all(sentinels: Sequence[_Sentinel]) -> None:
    for s in sentinels:
        s.close()


def _answer(sentinel: str, reply: Any) -> Answer:
    """Read a ``SENTINEL MASTER`` reply: a flat list of field names and values."""
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    return Answer(
        sentinel,
        address=(fields[b"ip"].decode(), int(fields[b"port"])),
        epoch=int(fields[b"config-epoch"]),
        flags=frozenset(fields[b"flags"].decode().split(",")),
    )


def _name(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
