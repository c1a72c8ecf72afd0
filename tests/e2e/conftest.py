"""The whole gate on free ports: real nginx, the sidecar, an echo upstream."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis as redis_sync

from demo import procs
from sidecar import apikeys, records
from sidecar.records import KeyRecord, Keyspace
from tests.conftest import RedisServer
from tests.e2e import rawhttp


def store_key(
    r: redis_sync.Redis,
    keyspace: Keyspace,
    scopes: Sequence[str],
    *,
    account_id: str,
    account_name: str | None,
    key_id: str,
    expires_at_ms: int | None = None,
) -> str:
    """Mint a key and store its record in *r* as the loader would; return the plaintext."""
    minted = apikeys.mint()
    record = KeyRecord(
        key_id, account_id, account_name, minted.key_prefix, tuple(scopes), expires_at_ms
    )
    version = int(time.time() * 1000)
    r.register_script(records.PUT_SCRIPT)(
        keys=[keyspace.record(minted.key_hash), keyspace.tombstone(minted.key_hash)],
        args=[records.encode(record, version=version), version, expires_at_ms or ""],
    )
    return minted.plaintext


class Gate:
    """nginx on `port` in front of the echo upstream, asking the sidecar about every request."""

    def __init__(
        self,
        workdir: Path,
        redis_server: RedisServer,
        *,
        sidecar_env: dict[str, str] | None = None,
        server_lines: str = "",
        unix_socket: bool = False,
    ) -> None:
        """*sidecar_env* adds to the sidecar's settings; *server_lines* go in nginx's server;
        with *unix_socket* the sidecar listens on a Unix socket (WACRM_LISTEN) and nginx's
        upstream is ``server unix:...``."""
        self.redis_server = redis_server
        self.keyspace = Keyspace()
        self.upstream = procs.upstream(workdir)
        #: The folder of the sidecar's socket, when it is not *workdir*: removed at stop.
        self.socket_folder: Path | None = None
        socket = None
        if unix_socket:
            folder = procs.socket_folder(workdir)
            self.socket_folder = folder if folder != workdir else None
            socket = folder / "sidecar.sock"
        self.sidecar = procs.sidecar(
            workdir,
            redis_url=redis_server.url,
            extra_env={
                "WACRM_REDIS_TIMEOUT": "0.3",
                # Wacrm's 120, over an hour: no request is earned back while a test runs.
                "WACRM_RATE_LIMIT": "120/1h",
                **(sidecar_env or {}),
            },
            unix_socket=socket,
        )
        self.nginx = procs.nginx(
            workdir,
            sidecar_port=None if socket else self.sidecar.port,
            sidecar_socket=socket,
            upstream_port=self.upstream.port,
        )
        self.port = self.nginx.port
        if server_lines:
            conf = workdir / "nginx.conf"
            text = conf.read_text()
            assert text.count("    server {\n") == 1
            conf.write_text(
                text.replace("    server {\n", f"    server {{\n        {server_lines}\n")
            )

    def start(self) -> None:
        for p in (self.upstream, self.sidecar, self.nginx):
            p.start()

    def stop(self) -> None:
        for p in (self.nginx, self.sidecar, self.upstream):
            p.stop()
        if self.socket_folder is not None:
            shutil.rmtree(self.socket_folder, ignore_errors=True)

    def redis(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.redis_server.url)

    def mark_loaded(self) -> None:
        """Mark Redis as holding a finished load, as the loader's full reconcile does."""
        with self.redis() as r:
            r.set(self.keyspace.loaded, int(time.time() * 1000))

    def put_key(
        self,
        scopes: Sequence[str] = (),
        *,
        account_id: str = "7a1d6c1e-0000-4000-8000-000000000001",
        account_name: str | None = "Acme Inc",
        key_id: str = "5b0e9f7c-0000-4000-8000-000000000002",
        expires_at_ms: int | None = None,
    ) -> str:
        """Mint a key, store its record as the loader would; return the plaintext."""
        with self.redis() as r:
            return store_key(
                r,
                self.keyspace,
                scopes,
                account_id=account_id,
                account_name=account_name,
                key_id=key_id,
                expires_at_ms=expires_at_ms,
            )

    def delete_key(self, plaintext: str) -> None:
        """Revoke *plaintext* the way the loader does: delete its record."""
        with self.redis() as r:
            r.delete(self.keyspace.record(records.hash_key(plaintext)))

    def get(self, target: str | bytes, **kw: object) -> rawhttp.Response:
        return rawhttp.request(self.port, target, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def gate_session(workdir: Path, redis_server: RedisServer) -> Iterator[Gate]:
    gate = Gate(workdir, redis_server)
    gate.start()
    yield gate
    gate.stop()


@pytest.fixture
def gate(gate_session: Gate) -> Iterator[Gate]:
    """Return the running gate with Redis up, emptied and marked loaded, the sidecar running."""
    gate_session.redis_server.start()
    if not gate_session.sidecar.running:
        gate_session.sidecar.start()
    with gate_session.redis() as r:
        r.flushdb()
    gate_session.mark_loaded()
    yield gate_session
