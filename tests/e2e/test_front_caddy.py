"""Caddy in front of the gate, beyond `tests.e2e.test_fronts`' contract: what a client can send.

Caddy's forward_auth tells the sidecar which request it checks with X-Forwarded-Method and
X-Forwarded-Uri, headers a client can send too; and Caddy drops, on the way to each backend,
the headers a client names in ``Connection``.  These tests run the shipped Caddyfile with the
real sidecar, and with two recorders in place of the sidecar and the upstream, which show what
each of them received for the same client request.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e import front_caddy
from tests.e2e.conftest import store_key
from tests.e2e.fronts import require
from tests.e2e.rawhttp import Response, request
from tests.e2e.test_fronts import assert_refused, assert_unavailable, upstream_saw

ACCOUNT = "7a1d6c1e-0000-4000-8000-0000000000c1"
KEY_ID = "5b0e9f7c-0000-4000-8000-0000000000c2"
GRANTED = {
    "x-wacrm-account-id": ACCOUNT,
    "x-wacrm-key-id": KEY_ID,
    "x-wacrm-scopes": "contacts:read",
}
MISSING_WEBHOOKS = {
    "error": {"code": "forbidden", "message": "This API key is missing the 'webhooks:manage' scope"}
}
NOT_AVAILABLE = {
    "error": {"code": "forbidden", "message": "This route is not available to API keys"}
}
#: The headers with which a client could try to name another request than the one it sends.
ROUTING_HEADERS = (
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Original-URI",
    "X-Original-URL",
    "X-Original-Method",
    "X-Forwarded-Prefix",
    "X-Rewrite-URL",
)


class Gate:
    """The shipped Caddyfile before the real sidecar, Redis and the echo upstream."""

    def __init__(self, workdir: Path, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        self.keyspace = Keyspace("caddy-front:")
        self.upstream = procs.upstream(workdir)
        self.sidecar = procs.sidecar(
            workdir,
            redis_url=redis_server.url,
            extra_env={
                "WACRM_REDIS_PREFIX": self.keyspace.prefix,
                "WACRM_REDIS_TIMEOUT": "0.3",
                "WACRM_RATE_LIMIT": "1000/1h",
            },
        )
        self.caddy = front_caddy.start(
            workdir, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def key(self) -> str:
        """Store a new key that may read contacts only; return its plaintext."""
        with redis_sync.Redis.from_url(self.redis_server.url) as r:
            r.set(self.keyspace.loaded, 1)
            return store_key(
                r,
                self.keyspace,
                ["contacts:read"],
                account_id=ACCOUNT,
                account_name="Acme",
                key_id=KEY_ID,
            )

    def get(self, target: str, **kw: object) -> Response:
        return request(self.caddy.port, target, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Gate]:
    require("caddy")
    g = Gate(tmp_path_factory.mktemp("caddy"), redis_server)
    for p in (g.upstream, g.sidecar, g.caddy):
        p.start()
    yield g
    for p in (g.caddy, g.sidecar, g.upstream):
        p.stop()


def test_a_client_header_cannot_choose_the_request_checked(gate: Gate) -> None:
    """The key may read contacts only.  Each routing header, in any case, twice, or named in
    Connection, claims the request is ``GET /api/v1/contacts``: the sidecar checks the one
    sent.  (Caddy sets X-Forwarded-Method and X-Forwarded-Uri itself, replacing the client's.)"""
    key = gate.key()
    for name in (*ROUTING_HEADERS, "x-forwarded-uri", "X-FORWARDED-URI"):
        value = "GET" if name.lower().endswith("method") else "/api/v1/contacts"
        for extra in ([], [(name, value)], [("Connection", name)]):
            headers = [(name, value), *extra]
            resp = gate.get("/api/v1/webhooks", key=key, headers=headers)
            assert_refused(resp, 403, MISSING_WEBHOOKS)
            resp = gate.get("/api/v1/contacts", method="DELETE", key=key, headers=headers)
            assert_refused(resp, 403, NOT_AVAILABLE)
    # Spelled with '_', Caddy passes them under their own name; the sidecar refuses them.
    for name in ("X_Forwarded_Uri", "X_Original_URI", "X_Forwarded_Prefix"):
        resp = gate.get("/api/v1/webhooks", key=key, headers=[(name, "/api/v1/contacts")])
        assert resp.status == 400, resp


def test_an_allowed_request_reaches_the_upstream_without_routing_headers(gate: Gate) -> None:
    key = gate.key()
    headers = [(name, "/api/v1/contacts") for name in ROUTING_HEADERS]
    resp = gate.get("/api/v1/contacts/42?x=1", key=key, headers=headers)
    seen = upstream_saw(resp)
    assert resp.json()["path"] == "/api/v1/contacts/42?x=1"  # type: ignore[index]
    assert {k: v for k, v in seen.items() if k.startswith("x-wacrm-")} == GRANTED
    for name in ("authorization", *(h.lower() for h in ROUTING_HEADERS)):
        assert name not in seen, name


def test_connection_cannot_strip_the_identity(gate: Gate) -> None:
    """Caddy drops the headers a client names in Connection from each proxied request, after
    forward_auth set the identity: the Caddyfile sets it again for the upstream."""
    key = gate.key()
    named = "X-Wacrm-Account-Id, X-Wacrm-Key-Id, X-Wacrm-Scopes"
    for headers in (
        [("Connection", named)],
        [("Connection", "keep-alive, " + named.lower())],
        # Hidden from the sidecar this way (no 400), the client's value is dropped for the
        # upstream too: it gets the granted scopes only.
        [("X-Wacrm-Scopes", "webhooks:manage"), ("Connection", "X-Wacrm-Scopes")],
        [("X_Wacrm_Scopes", "webhooks:manage"), ("Connection", "X_Wacrm_Scopes")],
    ):
        seen = upstream_saw(gate.get("/api/v1/contacts", key=key, headers=headers))
        assert {k: v for k, v in seen.items() if k.replace("_", "-").startswith("x-wacrm-")} == (
            GRANTED
        ), headers
    # Naming Authorization keeps the key from the sidecar as well: a 401, not the upstream.
    resp = gate.get("/api/v1/contacts", key=key, headers=[("Connection", "Authorization")])
    assert resp.status == 401, resp


def test_an_allowed_response_carries_the_rate_limit_headers(gate: Gate) -> None:
    key = gate.key()
    first = gate.get("/api/v1/contacts", key=key)
    second = gate.get("/api/v1/contacts", key=key)
    upstream_saw(second)
    assert first.all("X-RateLimit-Limit") == second.all("X-RateLimit-Limit") == ["1000"]
    assert first.all("X-RateLimit-Remaining") == ["999"]
    assert second.all("X-RateLimit-Remaining") == ["998"]
    assert int(second.header("X-RateLimit-Reset") or 0) > time.time()


def test_me_is_answered_by_the_sidecar(gate: Gate) -> None:
    key = gate.key()
    resp = gate.get("/api/v1/me", key=key)
    assert resp.status == 200, resp
    assert resp.json() == {
        "data": {
            "account": {"id": ACCOUNT, "name": "Acme"},
            "key": {"id": KEY_ID, "scopes": ["contacts:read"]},
        }
    }
    assert resp.header("X-RateLimit-Limit") == "1000"
    assert_refused(
        gate.get("/api/v1/me", method="POST", key=key),
        405,
        {"error": {"code": "method_not_allowed", "message": "Method not allowed"}},
    )
    # Only the one spelling is the sidecar's: Caddy's `path` matcher would take these too.
    assert_refused(gate.get("/API/V1/ME", key=key), 403, NOT_AVAILABLE)
    for target in ("/api/v1/%6De", "/api/v1/me/", "/api/v1/x/../me", "/api/v1/me."):
        resp = gate.get(target, key=key)
        assert resp.status in (400, 403), (target, resp)
        assert "header_list" not in resp.body.decode(errors="replace")


def test_a_stalled_sidecar_is_a_503_within_its_timeout(gate: Gate) -> None:
    key = gate.key()
    assert gate.sidecar.proc is not None
    os.killpg(gate.sidecar.proc.pid, signal.SIGSTOP)
    try:
        for target in ("/api/v1/contacts", "/api/v1/me"):
            start = time.monotonic()
            resp = gate.get(target, key=key)
            assert time.monotonic() - start < 4
            assert_unavailable(resp)
    finally:
        os.killpg(gate.sidecar.proc.pid, signal.SIGCONT)
    assert gate.get("/api/v1/contacts", key=key).status == 200


def test_a_stopped_upstream_is_a_json_502(gate: Gate) -> None:
    key = gate.key()
    gate.upstream.stop()
    try:
        resp = gate.get("/api/v1/contacts", key=key)
        assert_refused(resp, 502, {"error": {"code": "bad_gateway", "message": "Bad gateway"}})
        assert resp.header("Retry-After") is None  # the gate answered: not its outage
    finally:
        gate.upstream.start()
    assert gate.get("/api/v1/contacts", key=key).status == 200


# --- The request the sidecar is asked about is the request the upstream receives. ---


@dataclass
class Seen:
    method: str
    target: str  # as on the request line
    headers: dict[str, str]


@dataclass
class Recorder:
    """An HTTP server that notes every request it receives and answers 200, with *headers*."""

    headers: tuple[tuple[str, str], ...] = ()
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                # The request line's target: self.path is already altered ('//' folded).
                target = self.requestline.split(" ")[1]
                recorder.seen.append(
                    Seen(self.command, target, {k.lower(): v for k, v in self.headers.items()})
                )
                self.send_response(200)
                for name, value in recorder.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: Each the webhooks route to some reading, or a spelling Caddy's Go parser may rewrite.
TARGETS = [
    b"/api/v1/contacts/../webhooks",
    b"/api/v1/./webhooks",
    b"/api/v1//webhooks",
    b"//api/v1/webhooks",
    b"/api/v1/contacts/%2e%2e/webhooks",
    b"/api/v1/contacts/%252e%252e/webhooks",
    b"/api/v1/contacts%2F..%2Fwebhooks",
    b"/api/v1/contacts%2f..%2fwebhooks",
    b"/api/v1/contacts\\..\\webhooks",
    b"/api/v1/contacts/x%00/../../webhooks",
    b"/api/v1/WEBHOOKS",
    b"/api/v1/contacts;x=1/../webhooks",
    b"/api/v1/contacts#/../webhooks",
    b"/api/v1/contacts%23/../webhooks",
    b"/api/v1/contacts?a=/../webhooks#x",
    b"/api/v1/contacts/caf\xc3\xa9",
    b"/api/v1/contacts/caf%c3%a9",
    b"/api/v1/contacts/%E9",
    b"/api/v1/contacts/{id}",
    b"/api/v1/contacts/a|b<c>",
    b"/api/v1/contacts/%41",
    b"/api/v1/contacts/%",
    b"/api/v1/contacts/\x7f",
    b"http://localhost/api/v1/webhooks",
    b"http://elsewhere.example/api/v1/webhooks?x=1",
    b"api/v1/webhooks",
    b"*",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Recorder, Recorder, int]]:
    """Caddy with the shipped Caddyfile before a recorder as the sidecar (which allows every
    request, with identity headers and without rate-limit headers, as for an unlimited key)
    and a recorder as the upstream; yields both and Caddy's port."""
    require("caddy")
    identity = tuple((name.title(), value) for name, value in GRANTED.items())
    sidecar, upstream = Recorder(headers=identity), Recorder()
    caddy = front_caddy.start(
        tmp_path_factory.mktemp("caddy-recorded"),
        sidecar_port=sidecar.port,
        upstream_port=upstream.port,
    )
    caddy.start()
    yield sidecar, upstream, caddy.port
    caddy.stop()
    sidecar.close()
    upstream.close()


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
def test_the_request_checked_is_the_request_served(
    recorded: tuple[Recorder, Recorder, int], method: str
) -> None:
    """For every target, the sidecar is asked about exactly the method and target the upstream
    then receives, whatever the client claims in X-Forwarded-*; or neither is reached."""
    sidecar, upstream, port = recorded
    spoofed = [
        ("X-Forwarded-Uri", "/api/v1/contacts"),
        ("X-Forwarded-Method", "GET"),
        ("Connection", "X-Forwarded-Uri"),
    ]
    for target in TARGETS:
        sidecar.seen.clear()
        upstream.seen.clear()
        resp = request(port, target, method=method, key="wacrm_live_x", headers=spoofed)
        if not upstream.seen:  # refused by Caddy's HTTP parser, before any handler
            assert 400 <= resp.status < 500 and not sidecar.seen, (target, resp)
            continue
        [asked], [served] = sidecar.seen, upstream.seen
        assert asked.method == "GET" and asked.target.startswith("/forward-auth"), asked
        assert (asked.headers["x-forwarded-method"], asked.headers["x-forwarded-uri"]) == (
            served.method,
            served.target,
        ), target
        assert served.method == method
        assert {k: v for k, v in served.headers.items() if k.startswith("x-wacrm-")} == GRANTED
        assert "authorization" not in served.headers
        assert "x-forwarded-uri" not in served.headers
        assert "x-forwarded-method" not in served.headers
        # No rate-limit headers from the sidecar: none, not empty ones, for the client.
        assert not [k for k, _ in resp.headers if k.lower().startswith("x-ratelimit-")], resp
