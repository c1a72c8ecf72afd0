"""The sidecar on a Unix socket (WACRM_LISTEN): behind real nginx, its file's life, workers."""

from __future__ import annotations

import http.client
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from demo import procs
from sidecar import apikeys
from tests.conftest import RedisServer
from tests.e2e.conftest import Gate

ACCOUNT = "7a1d6c1e-0000-4000-8000-000000000001"
UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Missing or invalid API key"}}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.unix_path))


def unix_get(path: Path, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET *target* from the server on the Unix socket *path*; return (status, body)."""
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[Path]:
    """Return a folder for sockets that nginx's workers (nobody, under a root master) reach."""
    folder = procs.socket_folder(tmp_path)
    yield folder
    if folder != tmp_path:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def unix_gate(tmp_path: Path, redis_server: RedisServer) -> Iterator[Gate]:
    redis_server.start()
    gate = Gate(tmp_path, redis_server, unix_socket=True)
    gate.start()
    with gate.redis() as r:
        r.flushdb()
    gate.mark_loaded()
    yield gate
    gate.stop()


def test_nginx_asks_the_sidecar_on_a_unix_socket(unix_gate: Gate) -> None:
    conf = Path(unix_gate.nginx.argv[unix_gate.nginx.argv.index("-c") + 1])
    assert f"server {unix_gate.sidecar.address};" in conf.read_text()
    assert unix_gate.sidecar.address.startswith("unix:/")
    key = unix_gate.put_key(["contacts:read"])

    allowed = unix_gate.get("/api/v1/contacts", key=key)
    assert allowed.status == 200
    headers = {k.lower(): v for k, v in allowed.json()["header_list"]}  # type: ignore[index]
    assert headers["x-wacrm-account-id"] == ACCOUNT
    assert "authorization" not in headers
    assert unix_gate.get("/api/v1/me", key=key).status == 200

    denied = unix_gate.get("/api/v1/contacts", key=apikeys.mint().plaintext)
    assert denied.status == 401
    assert denied.json() == UNAUTHORIZED


def test_the_sidecar_answers_health_and_auth_on_its_socket(unix_gate: Gate) -> None:
    path = unix_gate.sidecar.unix_socket
    assert path is not None
    assert unix_get(path, "/healthz")[0] == 200
    assert unix_get(path, "/readyz")[0] == 200
    key = unix_gate.put_key(["contacts:read"])
    on_route = {"X-Original-URI": "/api/v1/contacts", "X-Original-Method": "GET"}
    assert unix_get(path, "/auth", {**on_route, "Authorization": f"Bearer {key}"})[0] == 200
    assert unix_get(path, "/auth", on_route)[0] == 401


def test_the_socket_is_open_to_every_user_and_its_folder_decides(unix_gate: Gate) -> None:
    """Mode 0666: nginx's workers, another user here, connect; the folder guards it."""
    path = unix_gate.sidecar.unix_socket
    assert path is not None
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o666


def _sidecar(sockets: Path, redis_server: RedisServer, **env: str) -> procs.Process:
    return procs.sidecar(
        sockets, redis_url=redis_server.url, unix_socket=sockets / "sidecar.sock", extra_env=env
    )


def test_a_stale_socket_file_is_replaced(sockets: Path, redis_server: RedisServer) -> None:
    redis_server.start()
    path = sockets / "sidecar.sock"
    # What a killed sidecar leaves: a socket file nothing listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert stat.S_ISSOCK(path.stat().st_mode)
    sidecar = _sidecar(sockets, redis_server)
    sidecar.start()
    try:
        assert unix_get(path, "/healthz")[0] == 200
    finally:
        sidecar.stop()


def test_a_sidecar_killed_outright_restarts_on_its_socket(
    sockets: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    path = sockets / "sidecar.sock"
    first = _sidecar(sockets, redis_server)
    first.start()
    first.stop(signal.SIGKILL)
    assert path.exists()  # no chance to remove it
    second = _sidecar(sockets, redis_server)
    second.start()
    try:
        assert unix_get(path, "/healthz")[0] == 200
    finally:
        second.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_socket_another_process_listens_on_is_not_taken(
    sockets: Path, redis_server: RedisServer, workers: str
) -> None:
    path = sockets / "sidecar.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        result = _run_sidecar(path, redis_server, workers)
        assert result.returncode == 1
        assert "another process listens on it" in result.stderr
        assert "Traceback" not in result.stderr
        assert stat.S_ISSOCK(path.stat().st_mode)


def _run_sidecar(
    path: Path, redis_server: RedisServer, workers: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "--workers", workers],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WACRM_LISTEN": f"unix:{path}", "WACRM_REDIS_URL": redis_server.url},
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_socket_file_is_removed_on_sigterm(
    sockets: Path, redis_server: RedisServer, workers: str
) -> None:
    redis_server.start()
    path = sockets / "sidecar.sock"
    sidecar = _sidecar(sockets, redis_server, WACRM_WORKERS=workers)
    sidecar.start()
    try:
        assert unix_get(path, "/healthz")[0] == 200
        assert sidecar.stop(signal.SIGTERM, timeout=15) == 0
        assert not path.exists()
    finally:
        sidecar.stop(signal.SIGKILL)


def _sockets_held(pid: int) -> int:
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held += os.readlink(fd).startswith("socket:")
        except OSError:  # closed meanwhile
            continue
    return held


def test_two_workers_both_accept_on_the_one_socket(
    sockets: Path, redis_server: RedisServer
) -> None:
    """The supervisor makes the socket once and both workers serve connections from it."""
    redis_server.start()
    path = sockets / "sidecar.sock"
    sidecar = _sidecar(sockets, redis_server, WACRM_WORKERS="2")
    sidecar.start()
    assert sidecar.proc is not None
    held: list[socket.socket] = []
    try:
        # The supervisor's socket accepts before the workers run: they have started when
        # both said so in the log.
        for _ in range(300):
            if sidecar.log.read_text().count("listening on unix:") == 2:
                break
            threading.Event().wait(0.05)
        workers = subprocess.run(
            ["pgrep", "-P", str(sidecar.proc.pid), "-f", "spawn_main"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(workers) == 2
        before = {int(w): _sockets_held(int(w)) for w in workers}

        def connect() -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            held.append(s)  # kept open: the worker that accepted it holds its end

        for _ in range(3):  # rounds of 20 at once, until both have taken some
            threads = [threading.Thread(target=connect) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            gained = {w: _sockets_held(w) - n for w, n in before.items()}
            if all(g > 0 for g in gained.values()):
                break
        assert len(held) >= 20
        assert all(g > 0 for g in gained.values()), gained
        assert sum(gained.values()) == len(held)
        assert sidecar.log.read_text().count(f"listening on unix:{path} (pid ") == 2
        for s in held:
            s.close()
        assert sidecar.stop(signal.SIGTERM, timeout=15) == 0
    finally:
        for s in held:
            s.close()
        sidecar.stop(signal.SIGKILL)


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "healthcheck", procs.ROOT / "container" / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_health_check_asks_the_sidecar_on_its_socket(
    sockets: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads WACRM_LISTEN from the sidecar's own environment and asks the socket."""
    redis_server.start()
    path = sockets / "sidecar.sock"
    sidecar = _sidecar(sockets, redis_server)
    sidecar.start()
    assert sidecar.proc is not None
    healthcheck = _healthcheck()
    # This machine may run other sidecars: point the check at ours, as PID 1 would be.
    found: tuple[str, int, list[str]] = ("sidecar", sidecar.proc.pid, [])
    monkeypatch.setattr(healthcheck, "find_process", lambda: found)
    monkeypatch.delenv("WACRM_LISTEN", raising=False)
    try:
        healthy, detail = healthcheck.check()
        assert healthy, detail
        assert detail == f"unix:{path} /healthz: 200"
        os.kill(sidecar.proc.pid, signal.SIGSTOP)  # stops answering
        try:
            monkeypatch.setattr(healthcheck, "TIMEOUT", 0.5)
            healthy, detail = healthcheck.check()
            assert not healthy
        finally:
            os.kill(sidecar.proc.pid, signal.SIGCONT)
    finally:
        sidecar.stop()
    healthy, detail = healthcheck.ask_unix(str(path))
    assert not healthy
    assert detail.startswith(f"unix:{path} /healthz: ")
