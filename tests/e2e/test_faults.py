"""Faults on the serving path under load: Redis killed or slow, the sidecar killed or frozen.

Real nginx, the sidecar, Redis and ``loader run`` (see `tests.e2e.load`), with a few client
threads sending requests throughout.  Every answer a client saw is recorded (start, end,
status, body, ``Retry-After``) and judged: while a fault lasts, nothing is allowed and every
answer is Wacrm's 503 JSON with ``Retry-After: 1``, never a 401 for a valid key; once it ends,
valid keys are served again within seconds, with no process restarted but the one that failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.e2e import keepalive
from tests.e2e.load import (
    Deployment,
    Key,
    Load,
    Sent,
    revoked_keys_accepted,
    wait_valid_keys_back,
)
from tests.e2e.slowproxy import SlowProxy
from tests.e2e.test_outage import UNAVAILABLE

KS = Keyspace()
CLIENTS = 3
JSON = b"application/json"


@dataclass
class Answer(Sent):
    """One request of the load, with what its client saw besides the status (status 0: the
    connection failed or timed out, no answer)."""

    body: bytes = b""
    content_type: bytes | None = None
    retry_after: bytes | None = None

    def unavailable(self) -> bool:
        """Tell whether this is the outage's answer: 503, Wacrm's JSON, ``Retry-After: 1``."""
        if (self.status, self.content_type, self.retry_after) != (503, JSON, b"1"):
            return False
        try:
            return bool(orjson.loads(self.body) == UNAVAILABLE)
        except orjson.JSONDecodeError:
            return False


class _Client(keepalive.Connection):
    """A kept-alive connection that also keeps the head of the last response it read."""

    def __init__(self, port: int, *, timeout: float) -> None:
        super().__init__(port, timeout=timeout)
        self.head: list[bytes] = [b""]

    def _line(self) -> bytes:
        line = super()._line()
        if line.startswith(b"HTTP/1.1 "):
            self.head = [line]
        elif self.head[-1]:  # still in the head: the blank line ends it
            self.head.append(line)
        return line

    def header(self, name: bytes) -> bytes | None:
        for line in self.head[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


class Watched(Load):
    """A `Load` whose every request is recorded as an `Answer`."""

    def connect(self) -> keepalive.Connection:
        return _Client(self.port, timeout=10)

    def send(self, conn: keepalive.Connection, which: int, head: bytes) -> Sent:
        assert isinstance(conn, _Client)
        started = time.monotonic()
        try:
            status, body = conn.request(head)
        except (OSError, EOFError) as e:
            conn.close()
            return Answer(which, started, time.monotonic(), 0, repr(e).encode())
        answer = Answer(which, started, time.monotonic(), status, body)
        answer.content_type = conn.header(b"content-type")
        answer.retry_after = conn.header(b"retry-after")
        return answer

    def answers(self, since: float = 0.0, until: float = float("inf")) -> list[Answer]:
        """Return the answers to requests that started at *since* or later and ended by
        *until*."""
        return [
            a
            for a in list(self.sent)
            if isinstance(a, Answer) and a.started >= since and a.ended <= until
        ]


class FaultDeployment(Deployment):
    """A `Deployment` on the redis-server *redis*; the sidecar reaches it at *sidecar_url* if
    given (through a `SlowProxy`), the loader directly."""

    def __init__(
        self, workdir: Path, redis: procs.Process, *, sidecar_url: str | None = None
    ) -> None:
        self.redis = redis
        super().__init__(workdir, f"redis://127.0.0.1:{redis.port}/0", self._loaded)
        if sidecar_url is not None:
            assert self.sidecar.env is not None
            self.sidecar.env["WACRM_REDIS_URL"] = sidecar_url

    def _loaded(self) -> int | None:
        try:
            with redis_sync.Redis(port=self.redis.port) as r:
                mark = r.get(KS.loaded)
        except (redis_sync.RedisError, OSError):
            return None
        return None if mark is None else int(mark)

    def pids(self) -> tuple[int, int]:
        assert self.sidecar.proc is not None and self.loader.proc is not None
        assert self.sidecar.running and self.loader.running
        return self.sidecar.proc.pid, self.loader.proc.pid


@contextlib.contextmanager
def deployed(
    workdir: Path, *, aof: bool = False, slow: bool = False
) -> Iterator[tuple[FaultDeployment, SlowProxy | None]]:
    """Run a `FaultDeployment` on a redis-server of its own: with *aof*, one that keeps its
    data across a crash; with *slow*, the sidecar reaching it through a `SlowProxy`."""
    extra = ["--appendonly", "yes", "--appendfsync", "always"] if aof else []
    redis = procs.redis_server(workdir, extra=extra)
    redis.start()
    proxy = SlowProxy(redis.port) if slow else None
    try:
        url = None
        if proxy is not None:
            proxy.start()
            url = f"redis://127.0.0.1:{proxy.port}/0"
        deployment = FaultDeployment(workdir, redis, sidecar_url=url)
        try:
            deployment.start()
            yield deployment, proxy
        finally:
            deployment.stop()
    finally:
        if proxy is not None:
            proxy.stop()
        redis.stop()


@contextlib.contextmanager
def under_load(deployment: Deployment, keys: list[Key]) -> Iterator[Watched]:
    """Send requests for *keys* from `CLIENTS` threads for as long as the block runs."""
    load = Watched(deployment.nginx.port, keys)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # served before the fault
        yield load
    finally:
        load.stop.set()
        for t in threads:
            t.join()


def _judge(load: Watched, valid: list[Key], fault: tuple[float, float]) -> list[Answer]:
    """Assert what every client saw; return the answers to requests within *fault*.

    Within the fault (started after it began, ended before it ended), every answer is the
    outage's 503; at any time a valid key gets 200 or that 503 and never a 401, no revoked key
    is accepted, and nothing else (no 500, no dropped connection) is ever answered.
    """
    answers = load.answers()
    other = [a for a in answers if a.status not in (200, 401, 503)]
    assert other == [], other[:5]
    assert [a for a in answers if a.status == 503 and not a.unavailable()] == []
    during = load.answers(*fault)
    assert during, "no request started and ended within the fault"
    assert [a for a in during if not a.unavailable()] == []
    indexes = {load.keys.index(k) for k in valid}
    refused_valid = [a for a in answers if a.key in indexes and a.status == 401]
    assert refused_valid == [], refused_valid[:5]
    accepted = revoked_keys_accepted(load)
    assert accepted == [], accepted[:5]
    return during


def _auth_read_timeout() -> float:
    """Return how long nginx waits for the sidecar's answer (/_wacrm/auth's read timeout)."""
    conf = (procs.NGINX_DIR / "snippets" / "wacrm-auth.conf").read_text()
    (seconds,) = re.findall(r"^\s*proxy_read_timeout (\d+)s;$", conf, re.MULTILINE)
    return float(seconds)


def _figures(load: Watched, during: list[Answer], began: float) -> str:
    """Describe the answers: counts, the span of the 503s from *began*, the fault's latencies."""
    answers = load.answers()
    refused = [a for a in answers if a.status == 503]
    first = min(a.started for a in refused) - began
    last = max(a.ended for a in refused) - began
    took = [a.ended - a.started for a in during]
    return (
        f"{len(answers)} requests, {len(refused)} answered 503 from {first:+.3f} s to"
        f" {last:+.3f} s of the fault's start, {len(during)} within the fault (latency median"
        f" {statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms);"
        f" allowed within the fault: {sum(a.status == 200 for a in during)}"
    )


def test_redis_killed_under_load_refuses_every_request_and_its_return_serves_within_2_s(
    tmp_path: Path,
) -> None:
    with deployed(tmp_path, aof=True) as (deployment, _):
        keys = deployment.mint(4)
        valid, revoked = keys[:3], keys[3]
        deployment.revoke(revoked)
        assert revoked.revoked_at is not None
        pids = deployment.pids()
        with under_load(deployment, keys) as load:
            deployment.redis.stop(signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(1.0)
            restarted = time.monotonic()
            deployment.redis.start()  # the same port and folder: its append-only file
            back = time.monotonic()
            recovered = wait_valid_keys_back(load, valid, after=back, within=5.0)
            time.sleep(0.2)
        assert deployment.pids() == pids
        during = _judge(load, valid, (killed, restarted))
        assert deployment.status(revoked) == 401  # its deletion survived the crash
    print(
        f"\nredis SIGKILLed for {restarted - killed:.2f} s: {_figures(load, during, killed)};"
        f" valid keys back to 200 {recovered:.3f} s after redis listened again"
    )
    assert len(during) >= 10
    assert recovered < 2.0


def test_redis_back_empty_refuses_valid_keys_with_503_until_the_loader_refilled_it(
    tmp_path: Path,
) -> None:
    """tests/e2e/test_outage.py proves this for one key asked one request at a time; here
    under load, with a key revoked before the crash and one revoked while Redis was down."""
    with deployed(tmp_path) as (deployment, _):
        keys = deployment.mint(5)
        valid, before, while_down = keys[:3], keys[3], keys[4]
        deployment.revoke(before)
        assert before.revoked_at is not None
        pids = deployment.pids()
        with under_load(deployment, keys) as load:
            killed_ms = int(time.time() * 1000)
            deployment.redis.stop(signal.SIGKILL)
            killed = time.monotonic()
            deployment.revoke(while_down)
            assert while_down.revoked_at is None  # Redis down: only the table holds it
            # Redis comes back empty and is filled from the table: from now on, never again.
            while_down.revoked_at = time.monotonic()
            time.sleep(0.8)
            restarted = time.monotonic()
            deployment.redis.start()  # without persistence: empty, no loaded mark
            back = time.monotonic()
            refilled = deployment.wait_loaded(newer_than_ms=killed_ms)
            recovered = wait_valid_keys_back(load, valid, after=back, within=10.0)
            time.sleep(0.2)
        assert deployment.pids() == pids
        during = _judge(load, valid, (killed, restarted))
        for k in (before, while_down):
            assert deployment.status(k) == 401
    indexes = {keys.index(k) for k in valid}
    empty = [a for a in load.answers(since=back) if a.key in indexes and a.status == 503]
    print(
        f"\nredis SIGKILLed and back empty after {restarted - killed:.2f} s:"
        f" {_figures(load, during, killed)}; after its return, the loader's reload finished in"
        f" {refilled:.3f} s, valid keys answered 503 {len(empty)} times, and were back to 200"
        f" {recovered:.3f} s after redis listened again"
    )
    assert recovered < 5.0


def test_the_sidecar_killed_under_load_is_503_json_and_serves_again_once_restarted(
    tmp_path: Path,
) -> None:
    with deployed(tmp_path) as (deployment, _):
        valid = deployment.mint(3)
        with under_load(deployment, valid) as load:
            deployment.sidecar.stop(signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(1.0)
            restarted = time.monotonic()
            deployment.sidecar.start()
            back = time.monotonic()
            recovered = wait_valid_keys_back(load, valid, after=back, within=5.0)
            time.sleep(0.2)
        during = _judge(load, valid, (killed, restarted))
    print(
        f"\nsidecar SIGKILLed for {restarted - killed:.2f} s, its successor listening"
        f" {back - restarted:.2f} s later: {_figures(load, during, killed)};"
        f" valid keys back to 200 {recovered:.3f} s after the new sidecar listened"
    )
    assert len(during) >= 10
    assert recovered < 2.0


def test_the_sidecar_stopped_under_load_is_503_json_within_nginx_timeout_and_serves_on_sigcont(
    tmp_path: Path,
) -> None:
    with deployed(tmp_path) as (deployment, _):
        valid = deployment.mint(3)
        pids = deployment.pids()
        group = os.getpgid(pids[0])
        read_timeout = _auth_read_timeout()
        with under_load(deployment, valid) as load:
            os.killpg(group, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                time.sleep(2 * read_timeout + 1.0)  # two timeouts for each client
            finally:
                resumed = time.monotonic()
                os.killpg(group, signal.SIGCONT)
            recovered = wait_valid_keys_back(load, valid, after=resumed, within=5.0)
            time.sleep(0.2)
        assert deployment.pids() == pids
        during = _judge(load, valid, (stopped, resumed))
    took = max(a.ended - a.started for a in during)
    print(
        f"\nsidecar SIGSTOPped for {resumed - stopped:.2f} s: {_figures(load, during, stopped)};"
        f" valid keys back to 200 {recovered:.3f} s after SIGCONT"
    )
    assert len(during) >= CLIENTS
    assert took < read_timeout + 1.0  # nginx gave up at its timeout, no later
    assert recovered < 2.0


#: A delay of Redis's replies below the sidecar's timeout, and one above it.
BELOW, ABOVE = 0.25, 0.45


def test_a_redis_slower_than_the_timeout_is_503_never_an_allow_and_one_below_it_is_served(
    tmp_path: Path,
) -> None:
    with deployed(tmp_path, slow=True) as (deployment, proxy):
        assert proxy is not None
        keys = deployment.mint(4)
        valid, revoked = keys[:3], keys[3]
        deployment.revoke(revoked)  # the loader's Redis is not slowed
        assert revoked.revoked_at is not None
        pids = deployment.pids()
        assert deployment.sidecar.env is not None
        timeout = float(deployment.sidecar.env["WACRM_REDIS_TIMEOUT"])
        assert BELOW < timeout < ABOVE
        with under_load(deployment, keys) as load:
            proxy.delay = BELOW
            below = time.monotonic()
            time.sleep(2.0)
            proxy.delay = ABOVE
            above = time.monotonic()
            time.sleep(1.5)
            back = time.monotonic()
            proxy.delay = 0.0
            recovered = wait_valid_keys_back(load, valid, after=back, within=5.0)
            time.sleep(0.2)
        assert deployment.pids() == pids
        during = _judge(load, valid, (above, back))
    slow = load.answers(below, above)
    indexes = {keys.index(k) for k in valid}
    wrong = [a for a in slow if a.status != (200 if a.key in indexes else 401)]
    slow_took = [a.ended - a.started for a in slow]
    print(
        f"\nredis replies {BELOW * 1000:.0f} ms late (timeout {timeout * 1000:.0f} ms):"
        f" {len(slow)} requests, {len(wrong)} not answered as without the delay, latency"
        f" median {statistics.median(slow_took) * 1000:.0f} ms, max"
        f" {max(slow_took) * 1000:.0f} ms;\nredis replies {ABOVE * 1000:.0f} ms late:"
        f" {_figures(load, during, above)}; the proxy accepted {proxy.accepted} connections;"
        f" valid keys back to 200 {recovered:.3f} s after the delay was removed"
    )
    assert len(slow) >= 5
    assert wrong == [], wrong[:5]
    assert len(during) >= 5
    # The sidecar refused in its own time, before nginx's timeout would have.
    assert max(a.ended - a.started for a in during) < _auth_read_timeout()
    assert recovered < 2.0
