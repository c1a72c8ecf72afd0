"""Reading key records from Redis, with the rate limit counted in the same round trip."""

from __future__ import annotations

import asyncio
import enum
import hashlib
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from sidecar.records import CHECK_SCRIPT, UNLIMITED, Keyspace, RateLimit
from sidecar.resp import RedisTimeout, RedisUnavailable, ReplyError, RespClient, bulk, encode_bulks
from sidecar.slots import key_slot, tag_slot

if TYPE_CHECKING:
    from sidecar.cluster import ClusterClient

_CHECK_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest().encode()
#: The start of a script call, encoded once: by the script's SHA1, or with the script itself.
_CALL_BY_SHA = (bulk(b"EVALSHA"), bulk(_CHECK_SHA))
_CALL_WITH_SCRIPT = (bulk(b"EVAL"), bulk(CHECK_SCRIPT))


def _unavailable(e: BaseException, doing: str) -> StoreUnavailable:
    """Return the refusal for *e*, raised while connecting or by a reply: every failure,
    expected or not, refuses the checks rather than leaving them waiting."""
    if isinstance(e, RedisTimeout):
        return StoreUnavailable("timeout", str(e))
    if isinstance(e, RedisUnavailable):
        return StoreUnavailable("connection", str(e))
    if isinstance(e, asyncio.CancelledError):  # the sidecar stops
        return StoreUnavailable("connection", "stopping")
    if isinstance(e, ReplyError):
        return StoreUnavailable("reply", str(e))
    return StoreUnavailable("reply", f"{doing}: {e!r}")  # a reply of another shape


def _noscript(e: BaseException) -> bool:
    """Tell whether *e* is Redis saying it does not hold the script (restarted, flushed)."""
    return isinstance(e, ReplyError) and str(e).startswith("NOSCRIPT")


class StoreUnavailable(Exception):
    """Redis did not answer, or not in time: the request must be refused.

    *kind* is ``timeout``, ``connection`` or ``reply``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Lookup(NamedTuple):
    """A found record and where its key stands against its rate limit, as the script says."""

    raw: bytes
    #: 1 when the request is within the limit, 0 when it is over.
    allowed: int
    #: Requests left right now; -1 when the key has no limit.
    remaining: int
    #: Unix seconds at which the key's allowance is full again.
    reset: int
    #: Seconds to wait before the next request may pass (on a refusal).
    retry_after: int
    limit: int


class NotLoaded(enum.Enum):
    """No record, in a Redis that holds no finished load: the key may be valid, not loaded yet."""

    NOT_LOADED = "not_loaded"


NOT_LOADED = NotLoaded.NOT_LOADED

#: What a check finds: the record with its rate-limit verdict, none, or none in an unloaded Redis.
Found = Lookup | NotLoaded | None

_Batch = list[tuple[str, asyncio.Future[Found]]]

#: Most checks one script call carries.
MAX_BATCH = 256


class KeyStore:
    """Look up key records through *client* under *keyspace*, counting *rate_limit*.

    Checks travel in batches, one script call each, with at most one call in flight: the
    checks asked for while Redis works on a call go together in the next, sent the moment it
    answers (or when the event loop turns over, if none is in flight).  Redis runs the script
    once for the whole batch, and each check still reads Redis after it was asked: batching
    saves system calls and script runs, never a lookup.
    """

    def __init__(
        self, client: RespClient, keyspace: Keyspace, rate_limit: RateLimit | None
    ) -> None:
        self.client = client
        self.keyspace = keyspace
        limit = rate_limit or UNLIMITED
        self._limit_args = (bulk(limit.limit), bulk(limit.window_ms))
        self._loaded_arg = bulk(keyspace.loaded)
        self._marks: dict[int, str] = {}  # a Cluster's loaded mark of each slot, as used
        self._used_slot = key_slot(keyspace.used)
        self._queue: _Batch = []
        self._busy = False  # a call is in flight, or one is due when the loop turns over
        # The task connecting to Redis, if one is: held so that it is not garbage-collected.
        self._connecting: asyncio.Future[Any] | None = None

    def check(self, key_hash: str) -> asyncio.Future[Found]:
        """Return the future of *key_hash*'s record with its rate-limit verdict.

        Without a record, the future holds None, or `NOT_LOADED` when Redis holds no finished
        load (see `Keyspace.loaded`).  It fails with `StoreUnavailable` when Redis does not
        answer, or not in time.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Found] = loop.create_future()
        self._queue.append((key_hash, fut))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._send)
        return fut

    def _send(self) -> None:
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if not batch:
            self._busy = False
            return
        client = self.client
        if not client.connected:  # connect first, in a task of its own
            self._connecting = asyncio.ensure_future(self._connect(batch))
        elif client.cluster is not None:
            self._send_each(batch, client.cluster)
        else:
            self._send_together(batch)

    async def _connect(self, batch: _Batch) -> None:
        try:
            await self.client.connect()
        except (Exception, asyncio.CancelledError) as e:  # refuse, never leave them waiting
            self._fail(batch, _unavailable(e, "cannot connect"))
        else:
            self._queue[:0] = batch
            self._send()

    def _send_together(self, batch: _Batch) -> None:
        """Send *batch* in one script call (one Redis)."""
        try:
            ks = self.keyspace
            keys = [bulk(k) for h, _ in batch for k in (ks.record(h), ks.rate(h))]
            keys.append(self._loaded_arg)
            args = [bulk(len(keys)), *keys, *self._limit_args]  # the script's, encoded
            reply = self.client.send_encoded(encode_bulks([*_CALL_BY_SHA, *args]), flush=True)
            if reply is None:
                raise RedisUnavailable("connection lost")
        except RedisUnavailable as e:  # the connection broke this instant
            self._fail(batch, StoreUnavailable("connection", str(e)))
            return
        except Exception as e:  # refuse the batch rather than leave it waiting forever
            self._fail(batch, StoreUnavailable("reply", f"cannot send: {e!r}"))
            return
        reply.add_done_callback(partial(self._answer, batch, args, False))

    def _send_each(self, batch: _Batch, cluster: ClusterClient) -> None:
        """Send each check of *batch* in a script call of its own, to its slot's master.

        A Cluster refuses a call whose keys span slots; the calls of one tick for one master
        still travel in one write.  The next batch goes once every check is answered.
        """
        ks = self.keyspace
        left = _Countdown(len(batch), self._send)
        for key_hash, fut in batch:
            try:
                slot = tag_slot(key_hash.encode())
                keys = (ks.record(key_hash), ks.rate(key_hash), self._loaded_in(slot))
                args = [bulk(3), *map(bulk, keys), *self._limit_args]
                reply = cluster.send_encoded(encode_bulks([*_CALL_BY_SHA, *args]), slot)
            except Exception as e:
                fut.set_exception(StoreUnavailable("reply", f"cannot send: {e!r}"))
                left.done()
                continue
            answer = partial(self._answer_one, fut, cluster, slot, args, False, left)
            reply.add_done_callback(answer)

    def _answer_one(
        self,
        fut: asyncio.Future[Found],
        cluster: ClusterClient,
        slot: int,
        args: list[bytes],
        sent_script: bool,
        left: _Countdown,
        reply: Any,
    ) -> None:
        try:
            (r,) = reply.result()
            answer = Lookup._make(r) if r else (None if r is None else NOT_LOADED)
        except (Exception, asyncio.CancelledError) as e:
            if _noscript(e) and not sent_script:
                retry = cluster.send_encoded(encode_bulks([*_CALL_WITH_SCRIPT, *args]), slot)
                retry.add_done_callback(
                    partial(self._answer_one, fut, cluster, slot, args, True, left)
                )
                return
            error = _unavailable(e, "unexpected reply")
        else:
            if not fut.done():
                fut.set_result(answer)
            left.done()
            return
        if not fut.done():
            fut.set_exception(error)
        left.done()

    def _loaded_in(self, slot: int) -> str:
        mark = self._marks.get(slot)
        if mark is None:
            mark = self._marks[slot] = self.keyspace.loaded_in(slot)
        return mark

    def _answer(self, batch: _Batch, args: list[bytes], sent_script: bool, reply: Any) -> None:
        try:
            results = reply.result()
            # A record's answer is a non-empty list; nil is no record, 0 none and not loaded.
            answers = [
                Lookup._make(r) if r else (None if r is None else NOT_LOADED) for r in results
            ]
            if len(answers) != len(batch):
                raise ValueError(f"{len(answers)} answers to {len(batch)} checks")
        except (Exception, asyncio.CancelledError) as e:
            if _noscript(e) and not sent_script:
                # Redis restarted or dropped its scripts: send the script itself, once.
                retry = self.client.send_encoded(
                    encode_bulks([*_CALL_WITH_SCRIPT, *args]), flush=True
                )
                if retry is not None:
                    retry.add_done_callback(partial(self._answer, batch, args, True))
                    return
            self._fail(batch, _unavailable(e, "unexpected reply"))
        else:
            for (_, fut), answer in zip(batch, answers, strict=True):
                if not fut.done():
                    fut.set_result(answer)
            self._send()

    def _fail(self, batch: _Batch, error: StoreUnavailable) -> None:
        """Refuse *batch* and the checks queued behind it: Redis just failed them."""
        queued, self._queue = self._queue, []
        self._busy = False
        for _, fut in batch + queued:
            if not fut.done():
                fut.set_exception(error)

    def touch(self, key_id: str, now_ms: int) -> None:
        """Note that *key_id* was used at *now_ms*, without waiting for Redis to answer."""
        fut = self.client.send(
            b"ZADD", self.keyspace.used, b"GT", b"%d" % now_ms, key_id, slot=self._used_slot
        )
        if fut is not None:
            fut.add_done_callback(_ignore)

    async def problem(self) -> str | None:
        """Return why Redis cannot serve checks now (within the timeout), or None if it can.

        A Cluster must serve every slot, each master saying ``cluster_state:ok``.
        """
        try:
            async with asyncio.timeout(2 * self.client.timeout):
                await self.client.connect()
                if (cluster := self.client.cluster) is not None:
                    return await cluster.problem()
                if await self.client.execute(b"PING") != b"PONG":
                    return "Redis does not answer PING with PONG"
        except TimeoutError:
            return "Redis did not answer in time"
        except (RedisUnavailable, ReplyError) as e:
            return str(e)
        return None


class _Countdown:
    """Call *then* once `done` was called *count* times."""

    __slots__ = ("left", "then")

    def __init__(self, count: int, then: Any) -> None:
        self.left = count
        self.then = then

    def done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.then()


def _ignore(fut: asyncio.Future[object]) -> None:
    # Retrieve the outcome so asyncio does not log it; a lost touch only delays last_used_at.
    if not fut.cancelled():
        fut.exception()
