"""Redis through Sentinel: URLs, finding the master, and leaving it in a failover.

Against real redis-server processes and real sentinels (`tests.sentinel`); a fake sentinel
only for what a real one cannot be made to say on cue (a lagging one naming a replica).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hiredis
import pytest

from demo import procs
from loader.pipe import Pipe
from loader.settings import Settings as LoaderSettings
from sidecar.options import SentinelTarget, SettingError, redact_url, sentinel_target
from sidecar.resp import RedisUnavailable, ReplyError, RespClient, connect
from sidecar.sentinel import Answer, choose
from tests.sentinel import SentinelSet, make_certificates, sentinel_set, tls_master_and_sentinel

MASTER_SECRET = "m-s3cret/+"
SENTINEL_SECRET = "s-s3cret&"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """Return a sentinel set whose Redis nodes and sentinels both ask for a password."""
    folder = tmp_path_factory.mktemp("sentinels")
    with sentinel_set(folder, password=MASTER_SECRET, sentinel_password=SENTINEL_SECRET) as s:
        yield s


# --- the URL --------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_master_the_database_and_both_passwords() -> None:
    target = sentinel_target(
        "redis+sentinel://gate:m%2Fpw@10.0.0.1,10.0.0.2:26380,[fd00::3]:26381/main/2"
        "?sentinel_username=watch&sentinel_password=s%26pw"
    )
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26381)),
        master="main",
        db=2,
        username="gate",
        password="m/pw",
        sentinel_username="watch",
        sentinel_password="s&pw",
    )
    assert "m/pw" not in repr(target) and "s&pw" not in repr(target)
    assert sentinel_target("rediss+sentinel://h/main?db=4") == SentinelTarget(
        sentinels=(("h", 26379),), master="main", db=4, tls=True
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+sentinel://:pw@h1:26379,h2:26379/main/0?sentinel_password=spw",
            "redis+sentinel://***@h1:26379,h2:26379/main/0?sentinel_password=***",
        ),
        # A password holding & or @ stays hidden, whatever follows it.
        (
            "redis+sentinel://h1,h2/main?sentinel_password=a&b@c&db=1",
            "redis+sentinel://h1,h2/main?sentinel_password=***",
        ),
        ("redis://h/0?password=pw", "redis://h/0?password=***"),
        ("rediss+sentinel://:p?ss@h/main", "rediss+sentinel://***@h/main"),
        ("redis+sentinel://h1,h2/main/1", "redis+sentinel://h1,h2/main/1"),
    ],
)
def test_redact_url_hides_every_password_of_a_sentinel_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_loader_reads_the_same_sentinel_urls_as_the_sidecar() -> None:
    url = "redis+sentinel://:pw@s1,s2,s3/gate/0?sentinel_password=spw"
    assert LoaderSettings.from_env({"WACRM_REDIS_URL": url}).redis_url == url
    with pytest.raises(
        SettingError, match="WACRM_REDIS_URL='redis\\+sentinel://s1,s2': names no master"
    ):
        LoaderSettings.from_env({"WACRM_REDIS_URL": "redis+sentinel://s1,s2"})


# --- choosing the master --------------------------------------------------------------------


def _said(port: int, epoch: int, flags: str = "master", sentinel: str = "s") -> Answer:
    return Answer(sentinel, ("10.0.0.9", port), epoch, frozenset(flags.split(",")))


def test_the_master_of_the_newest_epoch_wins_over_a_lagging_sentinel() -> None:
    answers = [_said(6379, 3), _said(6380, 4), _said(6379, 3)]
    assert choose("main", answers).address == ("10.0.0.9", 6380)


def test_fewer_than_a_majority_of_sentinels_answering_is_no_master() -> None:
    silent = Answer("s2", error="timed out")
    with pytest.raises(RedisUnavailable, match="only 1 of 3 sentinels answered, not a majority"):
        choose("main", [_said(6379, 1), silent, silent])
    assert choose("main", [_said(6379, 1), _said(6379, 1), silent]).address == ("10.0.0.9", 6379)
    with pytest.raises(RedisUnavailable, match=r"no sentinel answered \(s2: timed out"):
        choose("main", [silent])


@pytest.mark.parametrize("flags", ["master,failover_in_progress", "master,s_down,o_down"])
def test_a_failover_in_progress_at_any_sentinel_is_no_master(flags: str) -> None:
    with pytest.raises(RedisUnavailable, match="a failover of 'main' is in progress"):
        choose("main", [_said(6379, 1), _said(6379, 1, flags), _said(6379, 1)])


def test_an_unknown_master_and_a_disagreement_are_no_master() -> None:
    with pytest.raises(RedisUnavailable, match="the sentinels know no master named 'main'"):
        choose("main", [Answer("s1"), Answer("s2")])
    with pytest.raises(RedisUnavailable, match="the sentinels disagree"):
        choose("main", [_said(6379, 2), _said(6380, 2)])


# --- connecting -----------------------------------------------------------------------------


async def test_connect_reaches_the_master_the_sentinels_name(deployment: SentinelSet) -> None:
    conn = await connect(deployment.url(), connect_timeout=1)
    try:
        assert (await conn.call("ROLE"))[0] == b"master"
        assert (await conn.call("CONFIG", "GET", "port"))[1] == b"%d" % deployment.master_port()
    finally:
        conn.close()


async def test_resp_client_and_pipe_work_through_a_sentinel_url_and_select_its_database(
    deployment: SentinelSet,
) -> None:
    client = RespClient(deployment.url(db=3), timeout=1)
    pipe = await Pipe.open(deployment.url(db=3), connect_timeout=1)
    try:
        assert await client.execute("SET", "through-sentinel", "yes") == b"OK"
        assert await pipe.call("GET", "through-sentinel") == b"yes"
        with deployment.node(deployment.master_port()) as r:
            r.select(3)  # type: ignore[no-untyped-call]
            assert r.get("through-sentinel") == b"yes"
            r.delete("through-sentinel")
    finally:
        await client.aclose()
        await pipe.close()


@pytest.mark.parametrize(
    ("wrong", "why"),
    [
        ("master password", "WRONGPASS"),
        ("sentinel password", r"no sentinel answered \(127.0.0.1:\d+: WRONGPASS"),
        ("master name", "the sentinels know no master named 'elsewhere'"),
    ],
)
async def test_a_refusal_says_why_without_a_password(
    deployment: SentinelSet, wrong: str, why: str
) -> None:
    url = {
        "master password": deployment.url(password="wrong-pw"),
        "sentinel password": deployment.url(sentinel_password="wrong-pw"),
        "master name": deployment.url().replace("/gate", "/elsewhere"),
    }[wrong]
    with pytest.raises(RedisUnavailable, match=why) as refused:
        await connect(url, connect_timeout=1)
    message = str(refused.value)
    assert message.startswith("cannot connect to Redis at redis+sentinel://***@127.0.0.1:")
    for secret in (MASTER_SECRET, SENTINEL_SECRET, "wrong-pw", "s3cret"):
        assert secret not in message


async def test_without_a_majority_of_the_sentinels_there_is_no_master(
    deployment: SentinelSet,
) -> None:
    real = f"127.0.0.1:{deployment.sentinel_ports[0]}"
    dead = [f"127.0.0.1:{procs.free_port()}" for _ in range(2)]
    url = deployment.url().replace(
        ",".join(f"127.0.0.1:{p}" for p in deployment.sentinel_ports), ",".join([real, *dead])
    )
    with pytest.raises(RedisUnavailable, match="only 1 of 3 sentinels answered"):
        await connect(url, connect_timeout=1)
    conn = await connect(
        url.replace(dead[0], f"127.0.0.1:{deployment.sentinel_ports[1]}"), connect_timeout=1
    )
    conn.close()


async def test_a_silent_sentinel_costs_half_the_timeout_not_the_connection(
    deployment: SentinelSet, silent_redis_url: str
) -> None:
    silent = silent_redis_url.removeprefix("redis://").removesuffix("/0")
    first = f"127.0.0.1:{deployment.sentinel_ports[0]}"
    url = deployment.url().replace(first, silent)
    started = time.monotonic()
    conn = await connect(url, connect_timeout=0.6)
    elapsed = time.monotonic() - started
    conn.close()
    assert 0.3 <= elapsed < 0.6


async def test_a_node_that_says_it_is_a_replica_is_refused(
    deployment: SentinelSet, lagging_sentinel: _FakeSentinel
) -> None:
    """A sentinel that lags in a failover may name a replica: it is never used."""
    lagging_sentinel.names = ("127.0.0.1", deployment.replica_port())
    url = f"redis+sentinel://:{_quoted(MASTER_SECRET)}@127.0.0.1:{lagging_sentinel.port}/gate"
    with pytest.raises(RedisUnavailable, match=r"is a slave \(a sentinel may lag in a failover\)"):
        await connect(url, connect_timeout=1)


async def test_a_readonly_reply_drops_the_connection_and_the_next_command_connects_again(
    deployment: SentinelSet,
) -> None:
    """A master that a failover demoted answers writes with READONLY: leave it."""
    url = f"redis://:{_quoted(MASTER_SECRET)}@127.0.0.1:{deployment.replica_port()}/0"
    client = RespClient(url, timeout=1)
    try:
        first = await client.execute("CLIENT", "ID")
        with pytest.raises(ReplyError, match="READONLY"):
            await client.execute("SET", "k", "v")
        assert await client.execute("CLIENT", "ID") != first
    finally:
        await client.aclose()


# --- failovers ------------------------------------------------------------------------------


async def test_a_failover_moves_the_client_to_the_new_master_long_before_the_old_is_demoted(
    tmp_path: Path,
) -> None:
    """After SENTINEL FAILOVER the old master stays a writable master for seconds: the client
    leaves it as soon as a sentinel reports the failover, and never comes back to it."""
    with sentinel_set(tmp_path) as s:
        old, new = s.master_port(), s.replica_port()
        client = RespClient(s.url(), timeout=0.3)
        try:
            assert await client.execute("SET", "k", "v") == b"OK"
            answered: list[tuple[float, int]] = []
            refused: list[float] = []
            started = time.monotonic()
            s.failover()
            while time.monotonic() - started < 5 and sum(p == new for _, p in answered) < 50:
                try:
                    port = int((await client.execute("CONFIG", "GET", "port"))[1])
                    await client.execute("SET", "k", "v")
                except RedisUnavailable:
                    refused.append(time.monotonic() - started)
                else:
                    answered.append((time.monotonic() - started, port))
                await asyncio.sleep(0.002)
            back = next(t for t, p in answered if p == new)
            assert s.role(old) == "master"  # not demoted yet: only the watch made the client leave
        finally:
            await client.aclose()
        assert refused, "the failover refused nothing"
        assert all(p == new for t, p in answered if t > refused[0])
        assert refused[0] < 0.5
        assert back < 3.0


async def test_a_failover_breaks_the_loaders_pipe_and_a_new_one_reaches_the_new_master(
    tmp_path: Path,
) -> None:
    with sentinel_set(tmp_path) as s:
        new = s.replica_port()
        pipe = await Pipe.open(s.url(), connect_timeout=1)
        s.failover()
        started = time.monotonic()
        try:
            with pytest.raises(RedisUnavailable, match="left the master"):
                while time.monotonic() - started < 2:
                    await pipe.call("SET", "k", "v")
                    await asyncio.sleep(0.01)
        finally:
            await pipe.close()
        while True:
            try:
                pipe = await Pipe.open(s.url(), connect_timeout=1)
                break
            except RedisUnavailable:
                assert time.monotonic() - started < 3
                await asyncio.sleep(0.05)
        try:
            assert await pipe.call("CONFIG", "GET", "port") == [b"port", b"%d" % new]
        finally:
            await pipe.close()


def _quoted(secret: str) -> str:
    return urllib.parse.quote(secret, safe="")


# --- a fake sentinel ------------------------------------------------------------------------


class _FakeSentinel:
    """A server that answers SENTINEL MASTER with `names`, as a lagging sentinel might."""

    def __init__(self) -> None:
        self.names = ("127.0.0.1", 1)
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(4096):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0].upper() == b"SENTINEL":
                    host, port = self.names
                    fields = [b"name", b"gate", b"ip", host.encode(), b"port", b"%d" % port]
                    fields += [b"flags", b"master", b"config-epoch", b"99"]
                    writer.write(b"*%d\r\n" % len(fields))
                    writer.write(b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields))
                else:
                    writer.write(b"+OK\r\n")
        writer.close()


@pytest.fixture
async def lagging_sentinel() -> AsyncIterator[_FakeSentinel]:
    fake = _FakeSentinel()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()
    await server.wait_closed()


async def test_rediss_sentinel_speaks_tls_to_the_sentinel_and_the_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # trusted by ssl.create_default_context()
    node, sentinel = tls_master_and_sentinel(tmp_path, ca, cert, key)
    try:
        node.start()
        sentinel.start()
        url = f"rediss+sentinel://127.0.0.1:{sentinel.port}/gate"
        client = RespClient(url, timeout=2)
        try:
            assert await client.execute("SET", "over-tls", "yes") == b"OK"
            assert (await client.execute("CONFIG", "GET", "tls-port"))[1] == b"%d" % node.port
        finally:
            await client.aclose()
        with pytest.raises(RedisUnavailable, match="no sentinel answered"):
            await connect(url.replace("rediss+", "redis+"), connect_timeout=1)
    finally:
        sentinel.stop()
        node.stop()
