"""nginx's side of the gate, through real nginx with the shipped config.

nginx's own refusals carry Wacrm's JSON envelope while an upstream's answers pass unchanged;
/api/v1/me gives up on a stalled sidecar as /_wacrm/auth does; headers that name another route
or method than the one checked never reach the upstream; the access log holds no query string.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from demo import procs
from sidecar import apikeys
from tests.e2e import rawhttp
from tests.e2e.conftest import Gate
from tests.e2e.test_gate import KEY_ID, echoed

SNIPPETS = procs.NGINX_DIR / "snippets"
UNAVAILABLE = {"error": {"code": "internal", "message": "Rate limit service unavailable"}}


def raw(port: int, data: bytes, *, half_close: bool = False) -> rawhttp.Response:
    """Send *data* as it is on a new connection and read the whole answer.

    With *half_close*, the client says it has nothing more to send: nginx then closes at once
    after refusing a body, where it would otherwise wait for one (lingering_timeout, 5 s).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return rawhttp._parse(b"".join(chunks))


def message(
    method: bytes, target: bytes, *headers: bytes, version: bytes = b"HTTP/1.1", body: bytes = b""
) -> bytes:
    head = [method + b" " + target + b" " + version, b"Host: localhost", *headers]
    return b"\r\n".join([*head, b"Connection: close"]) + b"\r\n\r\n" + body


def assert_wacrm_error(resp: rawhttp.Response, status: int, code: str, text: str) -> None:
    assert resp.status == status, resp
    assert resp.header("Content-Type") == "application/json", resp
    assert resp.json() == {"error": {"code": code, "message": text}}


OVER_1M = b"Content-Length: %d" % (1024 * 1024 + 1)


@pytest.mark.parametrize(
    ("data", "status", "code", "text"),
    [
        (message(b"GET", b"/_wacrm/auth"), 404, "not_found", "Not found"),
        (message(b"GET", b"/_wacrm/error/414"), 404, "not_found", "Not found"),
        (message(b"DELETE", b"/nope"), 405, "method_not_allowed", "Method not allowed"),
        (message(b"TRACE", b"/api/v1/contacts"), 405, "method_not_allowed", "Method not allowed"),
        (message(b"TRACE", b"/api/v1/me"), 405, "method_not_allowed", "Method not allowed"),
        (
            message(b"POST", b"/api/v1/messages", OVER_1M),
            413,
            "payload_too_large",
            "Payload too large",
        ),
        (message(b"POST", b"/api/v1/me", OVER_1M), 413, "payload_too_large", "Payload too large"),
        (message(b"GET", b"/api/v1/" + b"a" * 9000), 414, "uri_too_long", "URI too long"),
        (
            message(b"GET", b"/api/v1/contacts", b"Transfer-Encoding: foo"),
            501,
            "not_implemented",
            "Not implemented",
        ),
        (
            message(b"GET", b"/api/v1/me", b"Transfer-Encoding: foo"),
            501,
            "not_implemented",
            "Not implemented",
        ),
        (
            message(b"GET", b"/api/v1/contacts", version=b"HTTP/2.0"),
            505,
            "http_version_not_supported",
            "HTTP version not supported",
        ),
        (b"GARBAGE\r\n\r\n", 400, "bad_request", "Bad request"),
        (b"GET /api/v1/contacts HTTP/1.1\r\n\r\n", 400, "bad_request", "Bad request"),  # no Host
        (
            message(
                b"GET", b"/api/v1/contacts", b"Content-Length: 1", b"Transfer-Encoding: chunked"
            ),
            400,
            "bad_request",
            "Bad request",
        ),
    ],
    ids=[
        "404-internal-auth",
        "404-internal-error-page",
        "405-static",
        "405-trace-protected",
        "405-trace-me",
        "413-protected",
        "413-me",
        "414",
        "501-protected",
        "501-me",
        "505",
        "400-request-line",
        "400-no-host",
        "400-length-and-chunked",
    ],
)
def test_nginx_own_refusals_are_wacrm_json(
    gate: Gate, data: bytes, status: int, code: str, text: str
) -> None:
    # Half-closed: the 413s are refused before their body is sent.
    assert_wacrm_error(raw(gate.port, data, half_close=True), status, code, text)


@pytest.mark.parametrize("target", [b"/nope", b"/", b"/apis"])
def test_a_path_outside_every_location_is_wacrm_json(gate: Gate, target: bytes) -> None:
    # nginx looks for a file under its root: 404, or 403 where its worker may not search the
    # folders on the way there (pytest's temporary folders are private to their user).
    resp = raw(gate.port, message(b"GET", target))
    if resp.status == 403:
        assert_wacrm_error(resp, 403, "forbidden", "Forbidden")
    else:
        assert_wacrm_error(resp, 404, "not_found", "Not found")


def test_a_broken_chunked_body_on_a_protected_route_is_wacrm_json(gate: Gate) -> None:
    # nginx reads the body after the gate allowed the request: a 400 inside the location.
    key = gate.put_key(["messages:send"])
    data = message(
        b"POST",
        b"/api/v1/messages",
        b"Authorization: Bearer " + key.encode(),
        b"Transfer-Encoding: chunked",
        body=b"zz\r\nnot a chunk\r\n0\r\n\r\n",
    )
    assert_wacrm_error(raw(gate.port, data), 400, "bad_request", "Bad request")


def test_an_unreachable_upstream_is_wacrm_json(gate: Gate) -> None:
    key = gate.put_key(["contacts:read"])
    gate.upstream.stop()
    try:
        resp = gate.get("/api/v1/contacts", key=key)
    finally:
        gate.upstream.start()
    assert_wacrm_error(resp, 502, "bad_gateway", "Bad gateway")
    assert gate.get("/api/v1/contacts", key=key).status == 200


def test_too_many_headers_is_the_sidecars_431(gate: Gate) -> None:
    # The sidecar's 431 travels as a 403 with X-Wacrm-Status, as its 400 and 429 do.
    headers = [(f"X-Filler-{i}", "x") for i in range(150)]
    resp = gate.get("/api/v1/contacts", key=gate.put_key(["contacts:read"]), headers=headers)
    assert_wacrm_error(resp, 431, "bad_request", "Too many request headers")


def test_me_answers_503_in_time_when_the_sidecar_stalls(gate: Gate) -> None:
    key = gate.put_key([])
    assert gate.get("/api/v1/me", key=key).status == 200  # nginx holds a connection to it
    assert gate.sidecar.proc is not None
    group = os.getpgid(gate.sidecar.proc.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        started = time.monotonic()
        resp = gate.get("/api/v1/me", key=key)
        took = time.monotonic() - started
    finally:
        os.killpg(group, signal.SIGCONT)
    assert resp.status == 503
    assert resp.header("Content-Type") == "application/json"
    assert resp.header("Retry-After") == "1"
    assert resp.json() == UNAVAILABLE
    assert took < 3.5, f"/api/v1/me took {took:.1f}s"
    assert gate.get("/api/v1/me", key=key).status == 200


def test_me_answers_503_with_retry_after_when_the_sidecar_is_down(gate: Gate) -> None:
    gate.sidecar.stop()
    try:
        resp = gate.get("/api/v1/me", key=apikeys.mint().plaintext)
    finally:
        gate.sidecar.start()
    assert resp.status == 503
    assert resp.header("Retry-After") == "1"
    assert resp.json() == UNAVAILABLE


#: Headers with which a proxy or framework is told to run another route or method.
STEERING = [
    "X-Original-URI",
    "X-Original-URL",
    "X-Original-Method",
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Forwarded-Prefix",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
]


def _steer(name: str) -> str:
    return "DELETE" if "method" in name.lower() else "/api/v1/webhooks"


@pytest.mark.parametrize("name", STEERING)
def test_steering_headers_never_reach_the_upstream(gate: Gate, name: str) -> None:
    key = gate.put_key(["contacts:read"])
    resp = gate.get("/api/v1/contacts", key=key, headers=[(name, _steer(name))])
    if resp.status == 400:  # the sidecar refuses it outright: it reaches nobody
        assert resp.json()["error"]["code"] == "bad_request"  # type: ignore[index]
        return
    assert resp.status == 200
    assert name.lower() not in echoed(resp)


class _Stub(BaseHTTPRequestHandler):
    """Both servers behind an nginx of its own: a sidecar that allows everything (`/auth`),
    and an upstream that answers `/api/status/N` with status N and an HTML body of its own,
    and anything else with the headers it received."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/auth":
            self._send(200, b"", {"X-Wacrm-Account-Id": "a", "X-Wacrm-Key-Id": KEY_ID})
        elif m := re.fullmatch(r"/api/status/(\d{3})", self.path):
            status = int(m.group(1))
            body = f"<p>the upstream's own {status}</p>".encode()
            self._send(status, body, {"Content-Type": "text/html", "X-From": "upstream"})
        else:
            seen = {"header_list": [[k, v] for k, v in self.headers.items()]}
            self._send(200, json.dumps(seen).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def nginx_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Return the port of the shipped config's nginx in front of `_Stub` as sidecar and app."""
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    port = stub.server_address[1]
    nginx = procs.nginx(
        tmp_path_factory.mktemp("nginx-alone"), sidecar_port=port, upstream_port=port
    )
    nginx.start()
    yield nginx.port
    nginx.stop()
    stub.shutdown()
    stub.server_close()


def test_nginx_strips_steering_headers_whatever_the_sidecar_allows(nginx_alone: int) -> None:
    spellings = [*STEERING, *(name.replace("-", "_") for name in STEERING)]
    headers = [(name, _steer(name)) for name in spellings] + [("X-Kept", "yes")]
    resp = rawhttp.request(nginx_alone, "/api/v1/contacts", headers=headers)
    assert resp.status == 200
    seen = echoed(resp)
    assert seen["x-kept"] == "yes"
    assert seen["x-wacrm-key-id"] == KEY_ID
    folded = {name.replace("_", "-") for name in seen}
    assert not folded & {name.lower() for name in STEERING}, seen


@pytest.mark.parametrize("status", [400, 404, 405, 413, 500, 501, 502, 503, 504])
def test_the_upstreams_own_errors_pass_unchanged(nginx_alone: int, status: int) -> None:
    resp = rawhttp.request(nginx_alone, f"/api/status/{status}")
    assert resp.status == status
    assert resp.header("Content-Type") == "text/html"
    assert resp.header("X-From") == "upstream"
    assert resp.body == f"<p>the upstream's own {status}</p>".encode()


def test_the_access_log_holds_no_query_string(gate: Gate, workdir: Path) -> None:
    key = gate.put_key(["contacts:read"])
    marker = uuid.uuid4().hex
    for target in (
        f"/api/v1/contacts/{marker}?api_key={key}",
        f"/api/v1/me?api_key={key}&marker={marker}",
        f"/nope/{marker}?api_key={key}",
    ):
        assert gate.get(target).status in (401, 403, 404)
    assert gate.get(f"/api/v1/contacts/{marker}?page=2", key=key).status == 200
    log = (workdir / "nginx-access.log").read_text()
    assert key not in log
    assert [line for line in log.splitlines() if "?" in line] == []  # every test's requests
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 3, lines  # the /me one carries the marker in its query only
    assert any(f'"GET /api/v1/contacts/{marker} HTTP/1.1" 401 ' in line for line in lines)
    assert any(f'"GET /nope/{marker} HTTP/1.1" 40' in line for line in lines)
    assert f"key={KEY_ID}" in lines[-1] and " 200 " in lines[-1]


def _error_pages(snippet: str) -> dict[int, str]:
    """Return status -> what follows the statuses, for every error_page line in *snippet*."""
    pages = {}
    for line in (SNIPPETS / snippet).read_text().splitlines():
        if line.startswith("error_page "):
            args = line.removesuffix(";").split()[1:]
            page = " ".join(a for a in args if not a.isdigit())
            pages.update((int(a), page) for a in args if a.isdigit())
    return pages


def test_locations_repeat_the_servers_error_pages() -> None:
    # An error_page in a location drops all of the server's: the snippets repeat them.
    server = _error_pages("wacrm-errors.conf")
    assert server[494] == "=400 /_wacrm/error/400"
    assert server[505] == "/_wacrm/error/505"
    assert _error_pages("wacrm-protect.conf") == {
        **server,
        401: "= @wacrm_denied",
        403: "= @wacrm_denied",
        500: "= @wacrm_unavailable",
    }
    assert _error_pages("wacrm-me.conf") == {
        **server,
        502: "= @wacrm_unavailable",
        504: "= @wacrm_unavailable",
    }
