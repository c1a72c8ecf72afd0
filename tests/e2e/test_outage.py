"""Redis outages through real nginx: a Redis without its keys is an outage, not a verdict.

While Redis holds no finished load (the loaded mark absent or 0), a key it does not hold may
be a valid key not loaded yet: the client gets the outage's 503, never a 401 that would tell
it its key is bad.  And an outage is logged in a few lines, not one per refused request.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import orjson

from sidecar import apikeys
from tests.conftest import RedisServer
from tests.e2e import rawhttp
from tests.e2e.conftest import Gate
from tests.e2e.test_loader_e2e import Loader, wait_for

UNAVAILABLE = {"error": {"code": "internal", "message": "Rate limit service unavailable"}}


def _assert_unavailable(resp: rawhttp.Response) -> None:
    assert resp.status == 503
    assert resp.header("Content-Type") == "application/json"
    assert resp.header("Retry-After") == "1"
    assert resp.json() == UNAVAILABLE
    assert resp.all("WWW-Authenticate") == []


def test_an_emptied_redis_refuses_unknown_keys_with_503_and_still_serves_the_keys_it_holds(
    gate: Gate,
) -> None:
    with gate.redis() as r:
        r.flushdb()  # as a Redis restarted without its data: no loaded mark
    valid = gate.put_key(["contacts:read"])
    unknown = apikeys.mint().plaintext

    _assert_unavailable(gate.get("/api/v1/contacts", key=unknown))
    _assert_unavailable(gate.get("/api/v1/me", key=unknown))
    assert gate.get("/api/v1/contacts", key=valid).status == 200
    malformed = gate.get("/api/v1/contacts", key=unknown[:-1])
    assert malformed.status == 401
    assert malformed.json()["error"]["code"] == "unauthorized"  # type: ignore[index]
    assert gate.get("/api/v1/contacts").status == 401  # no key at all


def test_an_unknown_key_is_503_while_the_first_load_runs_and_401_once_it_finished(
    gate: Gate,
) -> None:
    unknown = apikeys.mint().plaintext
    with gate.redis() as r:
        r.set(gate.keyspace.loaded, 0)  # as the loader's first full reconcile begins
        _assert_unavailable(gate.get("/api/v1/contacts", key=unknown))
        r.set(gate.keyspace.loaded, int(time.time() * 1000))  # as it ends
    resp = gate.get("/api/v1/contacts", key=unknown)
    assert resp.status == 401
    assert resp.header("WWW-Authenticate") == 'Bearer realm="wacrm", error="invalid_token"'


def _log_lines(path: Path) -> list[dict[str, str]]:
    return [orjson.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_a_redis_outage_is_logged_in_three_lines_not_one_per_request(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    assert gate.get("/api/v1/contacts", key=key).status == 200
    before = len(_log_lines(gate.sidecar.log))
    gate.redis_server.stop()
    refused = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 5.6:  # one summary is due 5 s into the outage
            _assert_unavailable(gate.get("/api/v1/contacts", key=key))
            refused += 1
            time.sleep(0.005)
    finally:
        gate.redis_server.start()
    key = gate.put_key(["contacts:read"])  # the restarted Redis is empty
    assert gate.get("/api/v1/contacts", key=key).status == 200
    time.sleep(0.1)  # let the sidecar's last line reach its log

    lines = _log_lines(gate.sidecar.log)[before:]
    assert refused > 100
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("warning", "sidecar.verifier"),
        ("warning", "sidecar.verifier"),
        ("info", "sidecar.verifier"),
    ], lines
    start, summary, end = (line["msg"] for line in lines)
    assert start.startswith("redis unavailable (connection: ")
    found = re.fullmatch(
        r"redis still unavailable after ([\d.]+) s: (\d+) requests refused in the last \1 s"
        r" \(timeout 0, connection \2, reply 0\)",
        summary,
    )
    assert found is not None, summary
    assert 5.0 <= float(found[1]) < 5.6
    assert 0 < int(found[2]) < refused
    ended = re.fullmatch(
        r"redis answers again after ([\d.]+) s; (\d+) requests refused during the outage", end
    )
    assert ended is not None, end
    assert float(ended[1]) >= 5.6
    assert int(ended[2]) == refused


def test_a_redis_restarted_empty_under_a_following_loader_never_refuses_a_valid_key_with_401(
    gate: Gate, tmp_path: Path, redis_server: RedisServer
) -> None:
    loader = Loader(tmp_path, f"sqlite:///{tmp_path / 'keys.db'}", redis_server.url)
    account = loader.command("accounts", "create", "Acme Inc").stdout.strip()
    created = loader.command("keys", "create", "--account", account, "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    unknown = apikeys.mint().plaintext
    with gate.redis() as r:
        r.delete(gate.keyspace.loaded)  # loader.start() waits for the mark of the first reconcile
    try:
        loader.start(redis_server.url)
        assert gate.get("/api/v1/me", key=key).status == 200
        assert gate.get("/api/v1/me", key=unknown).status == 401

        seen: list[int] = []
        redis_server.stop()
        try:
            for _ in range(20):  # Redis down
                seen.append(gate.get("/api/v1/me", key=key).status)
        finally:
            redis_server.start()  # no persistence: it comes back empty

        def served() -> bool:
            seen.append(gate.get("/api/v1/me", key=key).status)
            return seen[-1] == 200

        took = wait_for(served, 5, "the valid key served again after the restart")
        assert set(seen) == {200, 503}, seen
        assert took < 5
        # The loader marked its reload finished: an unknown key is a 401 again.
        wait_for(lambda: gate.get("/api/v1/me", key=unknown).status == 401, 5, "401 again")
    finally:
        loader.stop()
