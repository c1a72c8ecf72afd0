"""The signed identity end to end: each front passes it, and an upstream that verifies it with
``contrib/python/wacrm_identity.py`` cannot be fooled by a request that went around the proxy.

The verifying upstream is a WSGI application on the standard library's wsgiref server, which
keeps no raw request target: the verifier's fallback (the decoded path escaped again) is the
one exercised through nginx.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from types import ModuleType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from multidict import CIMultiDict

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e import test_fronts
from tests.e2e.rawhttp import Response, request
from tests.e2e.test_fronts import ACCOUNT, KEY_ID, Stack, upstream_saw

OLD = "old-secret-of-the-gate-0123456789abcdef"
NEW = "new-secret-of-the-gate-0123456789abcdef"
ROUTES = (procs.ROOT / "sidecar" / "wacrm.routes").read_text() + "GET /api/v1/ping -\n"
SPOOFED = {
    "error": {"code": "bad_request", "message": "Request carries reserved X-Wacrm-* headers"}
}


def contrib() -> ModuleType:
    """Load contrib/python/wacrm_identity.py from its file, as an upstream that copied it."""
    path = procs.ROOT / "contrib" / "python" / "wacrm_identity.py"
    spec = importlib.util.spec_from_file_location("wacrm_identity", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


wacrm_identity = contrib()


# -- Every front ------------------------------------------------------------------------------


#: The front contract's stack (each shipped front before the sidecar and the echo upstream).
stack = test_fronts.stack


@pytest.fixture(scope="module")
def signed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The front `stack`, its sidecar restarted signing with a secret read from a file."""
    secret = tmp_path_factory.mktemp("identity") / "secret"
    secret.write_text(OLD + "\n")
    assert stack.sidecar.env is not None
    stack.sidecar.stop()
    stack.sidecar.env["WACRM_IDENTITY_SECRET_FILE"] = str(secret)
    stack.sidecar.start()
    return stack


@pytest.mark.parametrize(
    ("method", "target", "scopes"),
    [
        ("GET", "/api/v1/contacts?page=2", "contacts:read messages:send"),
        ("POST", "/api/v1/messages", "messages:send"),
    ],
)
def test_each_front_passes_a_signature_the_upstream_verifies(
    signed: Stack, method: str, target: str, scopes: str
) -> None:
    key = signed.key(*scopes.split())
    resp = signed.get(target, method=method, key=key)
    seen = CIMultiDict(upstream_saw(resp))
    echoed: Any = resp.json()
    assert (echoed["method"], echoed["path"]) == (method, target)
    keys = [OLD.encode()]
    who = wacrm_identity.verify(seen, method, target, keys)
    assert (who.account_id, who.key_id, who.scopes) == (ACCOUNT, KEY_ID, tuple(scopes.split()))
    assert abs(who.signed_at - time.time()) < 30
    with pytest.raises(wacrm_identity.InvalidSignature):
        wacrm_identity.verify(seen, method, "/api/v1/webhooks", keys)


@pytest.mark.parametrize("name", ["X-Wacrm-Signature", "x_wacrm_signature", "X.Wacrm.Signature"])
def test_a_clients_own_signature_never_reaches_the_upstream(signed: Stack, name: str) -> None:
    """The sidecar refuses it (400); or the front drops a name it cannot hold (nginx without
    underscores_in_headers, Traefik's aliasHeadersStrategy) and the upstream gets the
    sidecar's signature alone."""
    key = signed.key("contacts:read")
    forged = f"v1 t={int(time.time())} s={'0' * 64}"
    resp = signed.get("/api/v1/contacts", key=key, headers=[(name, forged)])
    if resp.status == 400:
        assert resp.json() == SPOOFED
        return
    seen: Any = resp.json()
    names = [k.lower().translate(str.maketrans("_.", "--")) for k, _ in seen["header_list"]]
    assert names.count("x-wacrm-signature") == 1, seen
    assert forged not in resp.body.decode()
    who = wacrm_identity.verify(
        CIMultiDict(upstream_saw(resp)), "GET", "/api/v1/contacts", [OLD.encode()]
    )
    assert who.scopes == ("contacts:read",)


def test_a_connection_header_at_most_removes_the_signature(signed: Stack) -> None:
    """A client naming it in Connection (hop-by-hop) may strip it on the way (Caddy does):
    the upstream then gets no signature, and its verifier refuses the request."""
    key = signed.key("contacts:read")
    resp = signed.get("/api/v1/contacts", key=key, headers=[("Connection", "X-Wacrm-Signature")])
    seen = CIMultiDict(upstream_saw(resp))
    if "X-Wacrm-Signature" not in seen:
        with pytest.raises(wacrm_identity.InvalidSignature, match="no signed identity"):
            wacrm_identity.verify(seen, "GET", "/api/v1/contacts", [OLD.encode()])
        return
    who = wacrm_identity.verify(seen, "GET", "/api/v1/contacts", [OLD.encode()])
    assert who.scopes == ("contacts:read",)


# -- nginx in front of an upstream that verifies ----------------------------------------------


class _Threaded(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class VerifyingUpstream:
    """A WSGI upstream that answers 200 with the identity it verified, or 401 with why not."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = [k.encode() for k in keys]
        self.server = make_server("127.0.0.1", 0, self.app, _Threaded, _Quiet)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            who = wacrm_identity.verify_wsgi(environ, self.keys)
        except wacrm_identity.InvalidSignature as e:
            status, body = "401 Unauthorized", {"refused": str(e)}
        else:
            status = "200 OK"
            body = {
                "account_id": who.account_id,
                "key_id": who.key_id,
                "scopes": list(who.scopes),
                # What a request around the proxy could replay, for the tests to try.
                "signature": environ["HTTP_X_WACRM_SIGNATURE"],
                "scopes_header": environ["HTTP_X_WACRM_SCOPES"],
            }
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]


class SignedGate:
    """nginx with the shipped config, the sidecar signing with *secret*, a verifying upstream."""

    def __init__(self, workdir: Path, redis_server: RedisServer) -> None:
        self.workdir = workdir
        self.redis_server = redis_server
        self.keyspace = Keyspace("signed-nginx:")
        (workdir / "routes").write_text(ROUTES)
        self.upstream = VerifyingUpstream([OLD])
        self.sidecar = self._sidecar(OLD, procs.free_port())
        self.nginx = procs.nginx(
            workdir, sidecar_port=self.sidecar.port, upstream_port=self.upstream.port
        )

    def _sidecar(self, secret: str, port: int) -> procs.Process:
        return procs.sidecar(
            self.workdir,
            redis_url=self.redis_server.url,
            port=port,
            extra_env={
                "WACRM_REDIS_PREFIX": self.keyspace.prefix,
                "WACRM_RATE_LIMIT": "off",
                "WACRM_ROUTES": str(self.workdir / "routes"),
                "WACRM_IDENTITY_SECRET": secret,
            },
        )

    def start(self) -> None:
        self.upstream.thread.start()
        self.sidecar.start()
        self.nginx.start()

    def stop(self) -> None:
        self.nginx.stop()
        self.sidecar.stop()
        self.upstream.server.shutdown()
        self.upstream.server.server_close()

    def resign(self, secret: str) -> None:
        """Restart the sidecar on its port, signing with *secret*."""
        self.sidecar.stop()
        self.sidecar = self._sidecar(secret, self.sidecar.port)
        self.sidecar.start()

    #: Store a new key with the scopes given, as the loader would; return its plaintext.
    key = Stack.key

    def through_nginx(self, target: str, key: str, method: str = "GET") -> Response:
        return request(self.nginx.port, target, method=method, key=key)

    def around_nginx(self, target: str, headers: list[tuple[str, str]]) -> Response:
        return request(self.upstream.port, target, headers=headers)


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[SignedGate]:
    g = SignedGate(tmp_path_factory.mktemp("signed-nginx"), redis_server)
    g.start()
    yield g
    g.stop()


def identity_of(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, resp
    body: Any = resp.json()
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("method", "target", "scopes"),
    [
        ("GET", "/api/v1/contacts?page=2&q=a%20b", ("contacts:read", "messages:send")),
        ("PATCH", "/api/v1/contacts/%C3%A9t%C3%A9", ("contacts:write",)),
        ("GET", "/api/v1/ping", ()),
    ],
)
def test_the_upstream_verifies_what_nginx_passes(
    gate: SignedGate, method: str, target: str, scopes: tuple[str, ...]
) -> None:
    who = identity_of(gate.through_nginx(target, gate.key(*scopes), method))
    assert (who["account_id"], who["key_id"], who["scopes"]) == (ACCOUNT, KEY_ID, list(scopes))


def _identity(scopes: str, signature: str | None = None) -> list[tuple[str, str]]:
    headers = [
        ("X-Wacrm-Account-Id", ACCOUNT),
        ("X-Wacrm-Key-Id", KEY_ID),
        ("X-Wacrm-Scopes", scopes),
    ]
    return headers if signature is None else [*headers, ("X-Wacrm-Signature", signature)]


def test_forged_identity_headers_sent_around_nginx_are_refused(gate: SignedGate) -> None:
    now = int(time.time())
    for headers, why in [
        (_identity("webhooks:manage"), "no signed identity"),
        (_identity("webhooks:manage", f"v1 t={now} s={'0' * 64}"), "does not match"),
        (_identity("webhooks:manage", "v1 t=now s=trust-me"), "is not 'v1"),
    ]:
        resp = gate.around_nginx("/api/v1/webhooks", headers)
        assert resp.status == 401, resp
        assert why in resp.json()["refused"]  # type: ignore[index]


def test_a_signature_seen_once_is_refused_on_another_request(gate: SignedGate) -> None:
    """A request that went through is copied, around nginx, to another target or with more
    scopes: the verifier refuses both."""
    seen = identity_of(gate.through_nginx("/api/v1/contacts", gate.key("contacts:read")))
    signature, scopes = seen["signature"], seen["scopes_header"]
    assert gate.around_nginx("/api/v1/contacts", _identity(scopes, signature)).status == 200
    for target, headers in [
        ("/api/v1/webhooks", _identity(scopes, signature)),
        ("/api/v1/contacts?all=1", _identity(scopes, signature)),
        ("/api/v1/contacts", _identity(scopes + " webhooks:manage", signature)),
    ]:
        resp = gate.around_nginx(target, headers)
        assert resp.status == 401, (target, resp)
        assert "does not match" in resp.json()["refused"]  # type: ignore[index]


def test_the_secret_is_rotated_without_a_refusal(gate: SignedGate) -> None:
    """The upstream takes both secrets, the sidecar switches, the upstream drops the old one."""
    key = gate.key("contacts:read")
    try:
        gate.upstream.keys = [OLD.encode(), NEW.encode()]
        assert gate.through_nginx("/api/v1/contacts", key).status == 200  # signed with OLD
        gate.resign(NEW)
        assert gate.through_nginx("/api/v1/contacts", key).status == 200  # signed with NEW
        gate.upstream.keys = [NEW.encode()]
        assert gate.through_nginx("/api/v1/contacts", key).status == 200
        # A signature made with the old secret, however fresh, is now refused.
        old = wacrm_identity.sign(
            OLD.encode(),
            timestamp=int(time.time()),
            method="GET",
            target="/api/v1/contacts",
            account_id=ACCOUNT,
            key_id=KEY_ID,
            scopes="contacts:read",
        )
        resp = gate.around_nginx("/api/v1/contacts", _identity("contacts:read", old))
        assert resp.status == 401, resp
    finally:
        gate.upstream.keys = [OLD.encode()]
        gate.resign(OLD)
