"""The gate under load, every request recorded and judged: for the tests that break Redis.

A `Deployment` is nginx, the sidecar, the echo upstream and ``loader run`` on SQLite, all
reaching Redis at one URL (a Sentinel set, a Cluster node).  A `Load` sends requests for a
list of keys from threads and records each; `revoked_keys_accepted` finds every 200 that a
revocation should have refused, and `wait_valid_keys_back` how long service took to return.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from demo import procs
from loader import admin
from loader.settings import Settings as LoaderSettings
from tests.e2e import keepalive

TARGET = b"/api/v1/contacts"


@dataclass
class Sent:
    """One request of the load: which key, when it started and ended, and its status."""

    key: int
    started: float
    ended: float
    status: int


@dataclass
class Key:
    id: str
    plaintext: str
    #: When Redis acknowledged its revocation (monotonic seconds), if it did.
    revoked_at: float | None = None
    #: Whether its revocation was asked for at all.
    revoked: bool = False


@dataclass
class Load:
    """Threads sending requests for *keys* in turn through nginx on *port*, each recorded."""

    port: int
    keys: list[Key]
    sent: list[Sent] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, offset: int) -> None:
        conn = self.connect()
        heads = [
            b"GET %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n\r\n"
            % (TARGET, k.plaintext.encode())
            for k in self.keys
        ]
        i = offset
        while not self.stop.is_set():
            which = i % len(self.keys)
            self.sent.append(self.send(conn, which, heads[which]))
            i += 1
        conn.close()

    def connect(self) -> keepalive.Connection:
        """Open the connection one thread sends on."""
        return keepalive.Connection(self.port, timeout=5)

    def send(self, conn: keepalive.Connection, which: int, head: bytes) -> Sent:
        """Send *head*, the request for key *which*, on *conn*, and return its record."""
        started = time.monotonic()
        status, _ = conn.request(head)
        return Sent(which, started, time.monotonic(), status)


class Deployment:
    """The gate (nginx, sidecar, echo upstream) and ``loader run`` on SQLite, all reaching
    the Redis at *url*; *loaded* returns the version of the last full reconcile Redis holds
    (None for none, or when Redis does not answer)."""

    def __init__(self, workdir: Path, url: str, loaded: Callable[[], int | None]) -> None:
        self.loaded = loaded
        #: The port of the loader's /metrics, /healthz and /readyz.
        self.loader_port = procs.free_port()
        self.settings = LoaderSettings.from_env(
            {"WACRM_SOURCE": f"sqlite:///{workdir / 'keys.db'}", "WACRM_REDIS_URL": url}
        )
        env = {
            **os.environ,
            "WACRM_SOURCE": f"sqlite:///{workdir / 'keys.db'}",
            "WACRM_REDIS_URL": url,
            "WACRM_POLL_INTERVAL": "0.05",
            "WACRM_RETRY_MAX": "0.5",
            "WACRM_LOADER_TIMEOUT": "1",
            "WACRM_LOADER_METRICS_PORT": str(self.loader_port),
        }
        self.loader = procs.Process(
            [sys.executable, "-m", "loader", "run"], port=0, log=workdir / "loader.log", env=env
        )
        self.upstream = procs.upstream(workdir)
        self.sidecar = procs.sidecar(
            workdir,
            redis_url=url,
            # A rate limit no test reaches, so every check also writes rate state.
            extra_env={"WACRM_REDIS_TIMEOUT": "0.3", "WACRM_RATE_LIMIT": "1000000/1s"},
        )
        self.nginx = procs.nginx(
            workdir, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def start(self) -> None:
        self.loader.start_background()
        for p in (self.upstream, self.sidecar, self.nginx):
            p.start()
        self.wait_loaded()

    def stop(self) -> None:
        for p in (self.nginx, self.sidecar, self.upstream, self.loader):
            p.stop()

    def wait_loaded(self, newer_than_ms: int = 0, within: float = 10.0) -> float:
        """Wait until Redis holds a finished full reconcile newer than *newer_than_ms*."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            mark = self.loaded()
            if mark is not None and mark > max(newer_than_ms, 0):
                return time.monotonic() - started
            time.sleep(0.02)
        pytest.fail(f"no full reconcile newer than {newer_than_ms} within {within} s")

    def mint(self, count: int) -> list[Key]:
        async def make() -> list[Key]:
            account = await admin.create_account(self.settings, "Acme Inc")
            made = []
            for i in range(count):
                created = await admin.create_key(
                    self.settings,
                    account_id=account,
                    name=f"key {i}",
                    scopes=["contacts:read"],
                    expires_in_days=None,
                )
                made.append(Key(created.key.id, created.plaintext))
            return made

        return asyncio.run(make())

    def revoke(self, key: Key) -> None:
        """Revoke *key* as ``wacrm-loader keys revoke`` does; note when Redis acknowledged it."""
        key.revoked = True
        if asyncio.run(admin.revoke_key(self.settings, key.id)):
            key.revoked_at = time.monotonic()

    def status(self, key: Key) -> int:
        return keepalive.Connection(self.nginx.port).request(
            b"GET %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
            b"Connection: close\r\n\r\n" % (TARGET, key.plaintext.encode())
        )[0]


def wait_valid_keys_back(load: Load, valid: list[Key], *, after: float, within: float) -> float:
    """Wait until every valid key had a 200 started after the failover and none refused since
    for 0.3 s; return the seconds from *after* to the first of those 200s."""
    indexes = {load.keys.index(k) for k in valid}
    while time.monotonic() - after < within:
        time.sleep(0.05)
        sent = [r for r in list(load.sent) if r.key in indexes and r.started > after]
        bad = [r for r in sent if r.status != 200]
        last_bad = max((r.ended for r in bad), default=after)
        good = [r for r in sent if r.status == 200 and r.started > last_bad]
        if {r.key for r in good} == indexes and time.monotonic() - last_bad > 0.3:
            return min(r.ended for r in good) - after
    seen = [(r.key, r.status) for r in load.sent if r.key in indexes and r.started > after]
    pytest.fail(f"valid keys not back to 200 within {within} s; the last seen: {seen[-8:]}")


def revoked_keys_accepted(load: Load) -> list[Sent]:
    """Return every 200 for a key that started after Redis acknowledged its revocation, or
    after a request for the key had been refused with 401."""
    wrong = []
    for index, key in enumerate(load.keys):
        if not key.revoked:
            continue
        since = key.revoked_at if key.revoked_at is not None else float("inf")
        for r in sorted((r for r in load.sent if r.key == index), key=lambda r: r.started):
            if r.status == 200 and r.started > since:
                wrong.append(r)
            if r.status == 401:
                since = min(since, r.ended)
    return wrong
