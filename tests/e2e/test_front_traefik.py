"""Traefik's own ways around the gate, tried against the shipped ``deploy/traefik/`` files.

`tests.e2e.test_fronts` holds Traefik to the contract every front keeps.  These tests try
what is Traefik's: the headers a client sends to make ForwardAuth ask about another route
than the one Traefik serves, Traefik's own path cleaning, the loopback hop to the sidecar
(not reachable from clients, bounded in time), header names that alias another, and the
503 page when the sidecar, or the sidecar and unavailable.py, cannot answer.

`probe` runs the shipped files in front of a stand-in sidecar that tells what it was asked
and a stand-in upstream that tells what it was sent, so that the two can be compared for
any target and any header a client may send.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e import front_traefik
from tests.e2e.conftest import store_key
from tests.e2e.fronts import require
from tests.e2e.rawhttp import Response, request
from tests.e2e.test_outage import UNAVAILABLE

IDENTITY = ("x-wacrm-account-id", "x-wacrm-key-id", "x-wacrm-scopes")
#: Headers that name a route or method, each a different route or method than the request's.
ROUTING = [
    ("X-Forwarded-Uri", "/api/v1/contacts"),
    ("X-Forwarded-Method", "GET"),
    ("X-Forwarded-Prefix", "/api/v1/contacts"),
    ("X-Original-URI", "/api/v1/contacts"),
    ("X-Original-URL", "http://localhost/api/v1/contacts"),
    ("X-Original-Method", "GET"),
    ("X-Rewrite-URL", "/api/v1/contacts"),
    ("x-forwarded-uri", "/api/v1/contacts"),
    ("X_Forwarded_Uri", "/api/v1/contacts"),
    ("X.Forwarded.Uri", "/api/v1/contacts"),
    ("X~Forwarded~Method", "GET"),
]
ROUTING_NAMES = {"".join(c if c.isalnum() else "-" for c in k.lower()) for k, _ in ROUTING} | {
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
}


def headers_of(resp: Response) -> dict[str, str]:
    """Return the headers the echo upstream received, names lower-cased."""
    assert resp.status == 200, resp
    data = resp.json()
    assert isinstance(data, dict)
    return {k.lower(): v for k, v in data["header_list"]}


def is_json_503(resp: Response) -> bool:
    return (
        resp.status == 503
        and resp.header("Content-Type") == "application/json"
        and resp.header("Retry-After") == "1"
        and resp.json() == UNAVAILABLE
    )


# -- the shipped files with the real sidecar ------------------------------------------------


class Gate:
    """Redis, the sidecar, the echo upstream, and Traefik with the shipped files."""

    def __init__(self, workdir: Path, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        self.keyspace = Keyspace("traefik-own:")
        self.upstream = procs.upstream(workdir)
        self.sidecar = procs.sidecar(
            workdir,
            redis_url=redis_server.url,
            extra_env={"WACRM_REDIS_PREFIX": self.keyspace.prefix, "WACRM_RATE_LIMIT": "off"},
        )
        self.front = front_traefik.Traefik(
            workdir, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def key(self, *scopes: str) -> str:
        self.redis_server.start()
        with redis_sync.Redis.from_url(self.redis_server.url) as r:
            r.set(self.keyspace.loaded, 1)
            return store_key(
                r, self.keyspace, scopes, account_id="acc", account_name="A", key_id="k"
            )

    def get(self, target: str | bytes, **kw: object) -> Response:
        return request(self.front.port, target, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Gate]:
    require("traefik")
    g = Gate(tmp_path_factory.mktemp("traefik-gate"), redis_server)
    for p in (g.upstream, g.sidecar, g.front):
        p.start()
    yield g
    for p in (g.front, g.sidecar, g.upstream):
        p.stop()


def test_client_routing_headers_never_choose_the_route_checked(gate: Gate) -> None:
    """Each request names an allowed route in every routing header it can; the sidecar
    checks the route Traefik serves, and refuses it."""
    key = gate.key("contacts:read")
    for method, target in (("GET", "/api/v1/webhooks"), ("PATCH", "/api/v1/contacts/1")):
        resp = gate.get(target, method=method, key=key, headers=ROUTING)
        assert resp.status == 403, (method, target, resp)
        assert resp.json()["error"]["code"] == "forbidden"  # type: ignore[index]
    # ...and the sidecar's answer, relayed by ForwardAuth, does not name its software.
    assert resp.header("Server") is None, resp


def test_the_upstream_receives_no_routing_header_and_no_alias(gate: Gate) -> None:
    key = gate.key("contacts:read")
    aliases = [("X.Wacrm.Scopes", "webhooks:manage"), ("X~Wacrm~Account~Id", "other")]
    seen = headers_of(gate.get("/api/v1/contacts", key=key, headers=ROUTING + aliases))
    assert {k: v for k, v in seen.items() if k in IDENTITY} == {
        "x-wacrm-account-id": "acc",
        "x-wacrm-key-id": "k",
        "x-wacrm-scopes": "contacts:read",
    }
    folded = {"".join(c if c.isalnum() else "-" for c in name) for name in seen}
    assert not folded & ROUTING_NAMES, seen
    assert {n for n in seen if "wacrm" in n} == set(IDENTITY), seen  # the aliases are gone
    assert "authorization" not in seen


@pytest.mark.parametrize("name", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_a_method_override_is_refused(gate: Gate, name: str) -> None:
    resp = gate.get("/api/v1/contacts", key=gate.key("contacts:read"), headers=[(name, "DELETE")])
    assert resp.status == 400, resp
    assert resp.json()["error"]["code"] == "bad_request"  # type: ignore[index]


def test_a_connection_header_cannot_remove_the_identity(gate: Gate) -> None:
    """Hop-by-hop names in Connection are removed before ForwardAuth sets the identity."""
    connection = ("Connection", "X-Wacrm-Account-Id, X-Wacrm-Key-Id, X-Wacrm-Scopes")
    seen = headers_of(
        gate.get("/api/v1/contacts", key=gate.key("contacts:read"), headers=[connection])
    )
    assert all(seen.get(name) for name in IDENTITY), seen


def test_the_loopback_hop_is_not_reachable_from_clients(gate: Gate) -> None:
    key = gate.key("contacts:read")
    for target in ("/forward-auth", "/api/../forward-auth", "/forward-auth?x=/api/v1/contacts"):
        resp = gate.get(target, key=key, headers=[("X-Forwarded-Uri", "/api/v1/contacts")])
        assert resp.status == 404, (target, resp)
    # And the loopback entry point serves the key check alone, not the API.
    resp = request(gate.front.auth_port, "/api/v1/contacts", key=key)
    assert resp.status == 404, resp


def test_a_stalled_sidecar_is_a_503_json_within_the_timeout(gate: Gate) -> None:
    key = gate.key("contacts:read")
    assert gate.get("/api/v1/contacts", key=key).status == 200  # a pooled connection
    assert gate.sidecar.proc is not None
    os.killpg(gate.sidecar.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        resp = gate.get("/api/v1/contacts", key=key)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(gate.sidecar.proc.pid, signal.SIGCONT)
    assert is_json_503(resp), resp
    assert 1.5 < elapsed < 4, elapsed  # responseHeaderTimeout 2s, not ForwardAuth's 30 s
    assert gate.get("/api/v1/contacts", key=key).status == 200


def test_the_sidecar_and_the_503_page_both_down_still_refuse(gate: Gate) -> None:
    key = gate.key("contacts:read")
    assert gate.front.unavailable is not None
    gate.sidecar.stop()
    gate.front.unavailable.stop()
    try:
        resp = gate.get("/api/v1/contacts", key=key)
        me = gate.get("/api/v1/me", key=key)
    finally:
        gate.front.unavailable.start()
        gate.sidecar.start()
    for r in (resp, me):
        assert r.status == 503, r  # Traefik's text, not JSON: the page could not be had
        assert b"header_list" not in r.body
    assert gate.get("/api/v1/contacts", key=key).status == 200


def test_me_is_answered_by_the_sidecar_on_the_path_traefik_serves(gate: Gate) -> None:
    key = gate.key("contacts:read")
    assert gate.get("/api/v1/me", key=key).json()["data"]["key"]["scopes"] == [  # type: ignore[index]
        "contacts:read"
    ]
    assert gate.get("/api/v1/me").status == 401
    assert gate.get("/api/v1%2Fme", key=key).status == 400  # Path() matched the decoded path
    assert gate.get("/api/v1/me/", key=key).status == 400  # through ForwardAuth: not a route


def test_unavailable_py_answers_503_json_and_keeps_the_connection(gate: Gate) -> None:
    assert gate.front.unavailable is not None
    port = gate.front.unavailable.port
    assert is_json_503(request(port, "/anything", method="POST", body=b"x"))
    assert request(port, "/healthz").json() == {"status": "ok"}
    # Two requests on one connection, as Traefik's pool sends them.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        data = b""
        while data.count(b"Rate limit service unavailable") < 2:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b"HTTP/1.1 503 ") == 2


# -- the shipped files with a stand-in sidecar and upstream ---------------------------------

#: One process, two ports: as the sidecar it answers 401 with what it was asked (X-Probe-Ask),
#: 500 (X-Probe-Fail), else 200 with an identity; as the upstream (and the 503 page), it
#: answers with the request it was sent, its target as received.
STAND_IN = """
import sys
from aiohttp import web

async def sidecar(request):
    h = request.headers
    if "X-Probe-Fail" in h:
        return web.Response(status=500)
    if "X-Probe-Ask" in h:
        asked = {"method": h.get("X-Forwarded-Method"), "uri": h.get("X-Forwarded-Uri"),
                 "all": [[k, v] for k, v in h.items()]}
        return web.json_response(asked, status=401)
    return web.Response(headers={"X-Wacrm-Account-Id": "a", "X-Wacrm-Key-Id": "k",
                                 "X-Wacrm-Scopes": "s"})

async def upstream(request):
    return web.json_response({"method": request.method, "target": request.raw_path,
                              "header_list": [[k, v] for k, v in request.headers.items()]})

async def main():
    for port, handler in ((int(sys.argv[1]), sidecar), (int(sys.argv[2]), upstream)):
        runner = web.ServerRunner(web.Server(handler))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()

import asyncio
asyncio.run(main())
"""

#: Targets that are, or may be read as, another route than their first segments say.
TARGETS = [
    "/api/v1/contacts?page=2",
    "/api/v1/contacts/../webhooks",
    "/api/v1/./webhooks",
    "/api/v1//webhooks",
    "/api/v1/contacts/%2e%2e/webhooks",
    "/api/v1/contacts/.%2E/webhooks",
    "/api/v1/contacts/%252e%252e/webhooks",
    "/api/v1/contacts%2F..%2Fwebhooks",
    "/api/v1/contacts/..%2fwebhooks",
    "/api/v1/contacts\\..\\webhooks",
    "/api/v1/contacts/%5C..%5Cwebhooks",
    "/api/v1/contacts/x%00/../../webhooks",
    "/api/v1/contacts/x;/../../webhooks",
    "/api/v1/contacts/x%3B/../../webhooks",
    "/api/v1/contacts/x%3F/../../webhooks",
    "/api/v1/contacts/x?/../../webhooks",
    "/api/v1/contacts/x#/../../webhooks",
    "/api/v1/contacts/%C0%AE%C0%AE/webhooks",
    "/api/v1/contacts/caf%C3%A9",
    "/api/v1/%63ontacts",
    "/api/v1/contacts/",
    "/api/v1/contacts/..",
    "/api/v1/WEBHOOKS",
    "http://evil.example/api/v1/webhooks",
    "//evil.example/api/v1/webhooks",
]


class Probe:
    """Traefik with the shipped files before the stand-in sidecar and upstream."""

    def __init__(self, workdir: Path) -> None:
        sidecar_port, upstream_port = procs.free_port(), procs.free_port()
        self.stand_in = procs.Process(
            [sys.executable, "-c", STAND_IN, str(sidecar_port), str(upstream_port)],
            port=upstream_port,
            log=workdir / "stand-in.log",
        )
        self.front = front_traefik.Traefik(
            workdir,
            sidecar_port=sidecar_port,
            upstream_port=upstream_port,
            unavailable_port=upstream_port,
        )


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    require("traefik")
    p = Probe(tmp_path_factory.mktemp("traefik-probe"))
    p.stand_in.start()
    p.front.start()
    yield p
    p.front.stop()
    p.stand_in.stop()


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
def test_the_request_checked_is_the_request_served(probe: Probe, method: str) -> None:
    """For every target, with every routing header a client can send, ForwardAuth asks about
    exactly the method and target (path and query) the upstream is then sent."""
    hostile = [*ROUTING, ("X-HTTP-Method-Override", "GET")]
    compared = 0
    for target in TARGETS:
        asked = request(
            probe.front.port,
            target,
            method=method,
            key="k",
            headers=[*hostile, ("X-Probe-Ask", "1")],
        )
        served = request(probe.front.port, target, method=method, key="k", headers=hostile)
        if asked.status != 401:  # Traefik refused or routed it elsewhere by itself
            assert 400 <= asked.status < 500 and asked.status == served.status, (target, asked)
            assert b"header_list" not in served.body, (target, served)
            continue
        question = asked.json()
        assert isinstance(question, dict)
        answer = served.json()
        assert served.status == 200 and isinstance(answer, dict), (target, served)
        assert (question["method"], question["uri"]) == (answer["method"], answer["target"]), target
        upstream_names = {k.lower() for k, _ in answer["header_list"]}
        folded = {"".join(c if c.isalnum() else "-" for c in n) for n in upstream_names}
        assert not folded & ROUTING_NAMES, (target, upstream_names)
        assert "authorization" not in upstream_names
        compared += 1
    # Traefik itself refuses a raw "#" (400) and routes "//evil.example/..." nowhere (404).
    assert compared == len(TARGETS) - 2


def test_the_503_page_is_fetched_without_the_clients_headers(probe: Probe) -> None:
    """The errors middleware asks its page with none of the request's headers: the key
    stays between the client, Traefik and the sidecar."""
    resp = request(
        probe.front.port, "/api/v1/contacts", key="secret-key", headers=[("X-Probe-Fail", "1")]
    )
    assert resp.status == 503, resp
    page = resp.json()
    assert isinstance(page, dict)
    assert page["target"] == "/"
    names = {k.lower() for k, _ in page["header_list"]}
    assert "authorization" not in names and "x-probe-fail" not in names, names
