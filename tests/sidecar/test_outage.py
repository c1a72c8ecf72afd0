"""A Redis outage is logged in a few lines: its start, a summary now and then, its end."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from redis.asyncio import Redis

from sidecar import apikeys
from sidecar.app import HANDLER_ARGS, Gate
from sidecar.outage import OutageLog
from sidecar.records import Keyspace
from sidecar.settings import Settings
from tests.conftest import RedisServer


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "test.outage"]


def test_an_outage_is_one_warning_a_summary_every_5_s_and_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.outage")
    clock = Clock()
    outage = OutageLog(logging.getLogger("test.outage"), clock=clock)
    outage.answered()  # Redis answering outside an outage logs nothing
    assert not outage.active

    outage.refused("connection", "cannot connect: refused")
    for _ in range(15):
        clock.now += 0.25  # 16 refusals in 3.75 s: no summary yet
        outage.refused("connection", "cannot connect: refused")
    clock.now += 1.25  # 5 s after the first: the summary counts every refusal so far
    outage.refused("timeout", "timed out")
    for _ in range(3):
        clock.now += 1.0
        outage.refused("reply", "ERR odd")
    clock.now += 2.5  # 5.5 s after the summary
    outage.refused("timeout", "timed out")
    clock.now += 0.5
    outage.answered()
    outage.answered()

    assert _lines(caplog) == [
        ("WARNING", "redis unavailable (connection: cannot connect: refused); refusing requests"),
        (
            "WARNING",
            "redis still unavailable after 5.0 s: 17 requests refused in the last 5.0 s"
            " (timeout 1, connection 16, reply 0)",
        ),
        (
            "WARNING",
            "redis still unavailable after 10.5 s: 4 requests refused in the last 5.5 s"
            " (timeout 1, connection 0, reply 3)",
        ),
        ("INFO", "redis answers again after 11.0 s; 21 requests refused during the outage"),
    ]
    assert not outage.active


def test_a_second_outage_starts_its_counts_anew(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.outage")
    clock = Clock()
    outage = OutageLog(logging.getLogger("test.outage"), every=2.0, clock=clock)
    for _ in range(3):
        outage.refused("timeout", "timed out")
    clock.now += 1.0
    outage.answered()
    clock.now += 60.0
    outage.refused("reply", "ERR busy")
    clock.now += 2.0
    outage.refused("reply", "ERR busy")
    outage.answered()

    assert _lines(caplog) == [
        ("WARNING", "redis unavailable (timeout: timed out); refusing requests"),
        ("INFO", "redis answers again after 1.0 s; 3 requests refused during the outage"),
        ("WARNING", "redis unavailable (reply: ERR busy); refusing requests"),
        (
            "WARNING",
            "redis still unavailable after 2.0 s: 2 requests refused in the last 2.0 s"
            " (timeout 0, connection 0, reply 2)",
        ),
        ("INFO", "redis answers again after 2.0 s; 2 requests refused during the outage"),
    ]


async def test_the_verifier_logs_a_stopped_redis_once_and_its_return_once(
    caplog: pytest.LogCaptureFixture,
    redis: Redis,
    redis_server: RedisServer,
    aiohttp_raw_server: Callable[..., Awaitable[RawTestServer]],
    aiohttp_client: Callable[[RawTestServer], Awaitable[TestClient[web.BaseRequest, web.Server]]],
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    await redis.set(Keyspace().loaded, 1)
    gate = Gate(Settings(redis_url=redis_server.url))
    try:
        client = await aiohttp_client(await aiohttp_raw_server(gate, **HANDLER_ARGS))
        headers = {
            "X-Original-URI": "/api/v1/me",
            "X-Original-Method": "GET",
            "Authorization": f"Bearer {apikeys.mint().plaintext}",
        }
        assert (await client.get("/auth", headers=headers)).status == 401
        redis_server.stop()
        try:
            statuses = [(await client.get("/auth", headers=headers)).status for _ in range(30)]
        finally:
            redis_server.start()
        assert statuses == [503] * 30
        # The restarted Redis is empty: an unknown key is now an outage too (not loaded).
        assert (await client.get("/auth", headers=headers)).status == 503
    finally:
        await gate.close()
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sidecar") and r.levelno >= logging.INFO
    ]
    assert len(lines) == 2, lines
    assert lines[0].startswith("redis unavailable (connection: ")
    assert lines[1].startswith("redis answers again after ")
    assert lines[1].endswith("; 30 requests refused during the outage")
