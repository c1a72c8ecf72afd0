"""The signed identity: signing, verifying, the settings, and the vectors of its specification.

docs/identity-signature.md is the specification other languages implement: every vector in
it is recomputed here from the file's own text, by this code, by ``openssl dgst`` and by the
file's own JavaScript under Node.js, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import RawTestServer
from multidict import CIMultiDict
from redis.asyncio import Redis

from demo import procs
from sidecar import identity
from sidecar.app import HANDLER_ARGS, Gate
from sidecar.identity import Identity, InvalidSignature
from sidecar.options import SettingError
from sidecar.records import Keyspace
from sidecar.settings import Secret, Settings
from tests.conftest import RedisServer
from tests.sidecar.test_app import Client, forwarded, nginx, put

DOC = procs.ROOT / "docs" / "identity-signature.md"
CONTRIB = procs.ROOT / "contrib" / "python" / "wacrm_identity.py"
OLD = b"old-secret-of-the-gate-0123456789abcdef"
NEW = b"new-secret-of-the-gate-0123456789abcdef"
T = 1_767_225_600
REQUEST: dict[str, Any] = {
    "timestamp": T,
    "method": "GET",
    "target": "/api/v1/contacts?page=2",
    "account_id": "7a1d6c1e-0000-4000-8000-000000000001",
    "key_id": "5b0e9f7c-0000-4000-8000-000000000002",
    "scopes": "contacts:read messages:send",
}
GRANTED = Identity(REQUEST["account_id"], REQUEST["key_id"], ("contacts:read", "messages:send"), T)


def signed_headers(key: bytes = OLD, **fields: Any) -> CIMultiDict[str]:
    """Return the headers the upstream gets for REQUEST with *fields* changed, signed by *key*."""
    f = {**REQUEST, **fields}
    return CIMultiDict(
        {
            "X-Wacrm-Account-Id": f["account_id"],
            "X-Wacrm-Key-Id": f["key_id"],
            "X-Wacrm-Scopes": f["scopes"],
            "X-Wacrm-Signature": identity.sign(key, **f),
        }
    )


def check(headers: CIMultiDict[str], **kw: Any) -> Identity:
    args = {"method": "GET", "target": "/api/v1/contacts?page=2", "keys": [OLD], "now": T, **kw}
    return identity.verify(headers, **args)


# -- The specification's vectors --------------------------------------------------------------

_FIELDS = ("secret", "timestamp", "method", "target", "account", "key", "scopes")


def doc_vectors() -> list[dict[str, str]]:
    """Return the vectors of docs/identity-signature.md: its ```text blocks of NAME VALUE."""
    vectors = []
    for block in re.findall(r"```text\n(.*?)```", DOC.read_text(), re.DOTALL):
        vector = dict(line.split(None, 1) for line in block.splitlines())
        assert set(vector) == {*_FIELDS, "canonical", "header"}, vector
        vectors.append(vector)
    return vectors


def vector_fields(v: dict[str, str]) -> dict[str, Any]:
    return {
        "timestamp": int(v["timestamp"]),
        "method": v["method"],
        "target": v["target"],
        "account_id": v["account"],
        "key_id": v["key"],
        "scopes": v["scopes"],
    }


def vector_headers(v: dict[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(
        {
            "x-wacrm-account-id": v["account"],
            "x-wacrm-key-id": v["key"],
            "x-wacrm-scopes": v["scopes"],
            "x-wacrm-signature": v["header"],
        }
    )


def test_the_document_has_at_least_three_vectors() -> None:
    assert len(doc_vectors()) >= 3


@pytest.mark.parametrize("v", doc_vectors(), ids=lambda v: v["target"])
def test_each_vector_is_what_the_code_computes(v: dict[str, str]) -> None:
    fields = vector_fields(v)
    assert identity.canonical(**fields).decode() == v["canonical"]
    assert identity.sign(v["secret"].encode(), **fields) == v["header"]
    who = identity.verify(
        vector_headers(v),
        v["method"],
        v["target"],
        [v["secret"].encode()],
        now=int(v["timestamp"]),
    )
    assert (who.account_id, who.key_id, who.signed_at) == (
        v["account"],
        v["key"],
        int(v["timestamp"]),
    )


@pytest.mark.parametrize("v", doc_vectors(), ids=lambda v: v["target"])
@pytest.mark.parametrize("name", [f for f in _FIELDS if f != "timestamp"])
def test_each_vector_fails_with_any_input_changed(v: dict[str, str], name: str) -> None:
    changed = {**v, name: v[name] + "x"}
    with pytest.raises(InvalidSignature, match="does not match"):
        identity.verify(
            vector_headers(changed),
            changed["method"],
            changed["target"],
            [changed["secret"].encode()],
            now=int(v["timestamp"]),
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
@pytest.mark.parametrize("v", doc_vectors(), ids=lambda v: v["target"])
def test_openssl_computes_each_vectors_signature_from_its_canonical_text(
    v: dict[str, str],
) -> None:
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", v["secret"]],
        input=v["canonical"].encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert out.split()[-1] == v["header"].rpartition("s=")[2]


@pytest.mark.skipif(shutil.which("node") is None, reason="no node")
def test_the_documents_javascript_verifies_every_vector_and_refuses_a_changed_one(
    tmp_path: Path,
) -> None:
    code = re.search(r"```js\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert code is not None
    vectors = doc_vectors()
    driver = """
const vectors = JSON.parse(process.argv[2]);
const out = vectors.map((v) => {
  const headers = {"x-wacrm-signature": v.header, "x-wacrm-account-id": v.account,
                   "x-wacrm-key-id": v.key, "x-wacrm-scopes": v.scopes};
  const t = Number(v.timestamp);
  const canon = canonical({timestamp: t, method: v.method, target: v.target,
                           accountId: v.account, keyId: v.key, scopes: v.scopes}).toString();
  const who = verify(headers, v.method, v.target, [v.secret], 30, t);
  const tries = [["POST", v.target, t], [v.method, v.target + "x", t],
                 [v.method, v.target, t + 31], [v.method, v.target, t - 31]];
  const refused = tries.map(([m, p, now]) => {
    try { verify(headers, m, p, [v.secret], 30, now); return false; } catch { return true; }
  });
  return {canon, who, refused};
});
console.log(JSON.stringify(out));
"""
    script = tmp_path / "verify.mjs"
    script.write_text(code.group(1) + driver)
    run = subprocess.run(
        ["node", str(script), json.dumps(vectors)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    for v, got in zip(vectors, json.loads(run.stdout), strict=True):
        assert got["canon"] == v["canonical"]
        scopes = [] if v["scopes"] == "-" else v["scopes"].split(" ")
        assert got["who"] == {
            "accountId": v["account"],
            "keyId": v["key"],
            "scopes": scopes,
            "signedAt": int(v["timestamp"]),
        }
        assert got["refused"] == [True, True, True, True]


def test_contrib_is_this_module() -> None:
    """An upstream copies contrib/python/wacrm_identity.py: the very code the gate signs with."""
    assert CONTRIB.resolve() == Path(identity.__file__).resolve()
    run = subprocess.run(
        [sys.executable, "-E", "-c", "import wacrm_identity, sys; print(sorted(sys.modules))"],
        cwd=CONTRIB.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "sidecar" not in run.stdout and "aiohttp" not in run.stdout  # the standard library


# -- Verifying --------------------------------------------------------------------------------


def test_a_signed_identity_is_verified_and_returned() -> None:
    assert check(signed_headers()) == GRANTED


def test_the_headers_are_read_case_insensitively_and_a_scopeless_key_has_no_scopes() -> None:
    headers = signed_headers(scopes="-")
    lower = {k.lower(): v for k, v in headers.items()}
    assert check(CIMultiDict(lower)).scopes == ()


def test_a_forged_signature_is_refused() -> None:
    headers = signed_headers()
    headers["X-Wacrm-Signature"] = f"v1 t={T} s={'0' * 64}"
    with pytest.raises(InvalidSignature, match="does not match"):
        check(headers)


def test_a_signature_made_with_another_secret_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        check(signed_headers(b"not-the-gates-secret-0123456789abcdef"))


@pytest.mark.parametrize("now", [T - 30, T + 30])
def test_the_age_may_be_max_age_either_way(now: int) -> None:
    assert check(signed_headers(), now=now) == GRANTED


def test_a_stale_signature_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="stale"):
        check(signed_headers(), now=T + 31)
    assert check(signed_headers(), now=T + 59, max_age=60) == GRANTED


def test_a_signature_from_the_future_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="future"):
        check(signed_headers(), now=T - 31)


@pytest.mark.parametrize(
    "request_",
    [
        {"method": "POST"},
        {"method": "get"},
        {"target": "/api/v1/contacts?page=3"},
        {"target": "/api/v1/contacts"},
        {"target": "/api/v1/webhooks?page=2"},
        {"target": "/api/v1/contacts/../webhooks?page=2"},
    ],
)
def test_the_identity_is_valid_only_for_the_request_it_was_signed_for(
    request_: dict[str, str],
) -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        check(signed_headers(), **request_)


def test_a_bare_question_mark_is_the_path_alone_on_both_sides() -> None:
    headers = signed_headers(target="/api/v1/contacts?")
    assert check(headers, target="/api/v1/contacts") == GRANTED
    assert check(headers, target=b"/api/v1/contacts?") == GRANTED


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Wacrm-Scopes", "contacts:read messages:send webhooks:manage"),
        ("X-Wacrm-Scopes", "messages:send contacts:read"),
        ("X-Wacrm-Scopes", "-"),
        ("X-Wacrm-Account-Id", "0d93a393-ea77-47a8-9df6-d95c299deafc"),
        ("X-Wacrm-Key-Id", "0d93a393-ea77-47a8-9df6-d95c299deafc"),
    ],
)
def test_a_tampered_identity_is_refused(name: str, value: str) -> None:
    headers = signed_headers()
    headers[name] = value
    with pytest.raises(InvalidSignature, match="does not match"):
        check(headers)


def test_fields_cannot_be_shifted_from_one_to_the_next() -> None:
    """The same bytes split otherwise between account and key: another message."""
    headers = signed_headers(account_id="ab", key_id="c")
    headers["X-Wacrm-Account-Id"], headers["X-Wacrm-Key-Id"] = "a", "bc"
    with pytest.raises(InvalidSignature, match="does not match"):
        check(headers)


def test_during_a_rotation_both_secrets_verify() -> None:
    for key in (OLD, NEW):
        assert check(signed_headers(key), keys=[OLD, NEW]) == GRANTED


def test_a_removed_secret_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        check(signed_headers(OLD), keys=[NEW])


@pytest.mark.parametrize(
    "value",
    [
        f"v2 t={T} s={'a' * 64}",
        f"v1 t={T} s={'A' * 64}",
        f"v1 t=0{T} s={'a' * 64}",
        f"v1  t={T} s={'a' * 64}",
        f"v1 t={T} s={'a' * 63}",
        f"v1 t={T} s={'a' * 64} ",
        f"v1 s={'a' * 64} t={T}",
        f"v1 t=-{T} s={'a' * 64}",
        "",
    ],
)
def test_a_malformed_signature_is_refused(value: str) -> None:
    headers = signed_headers()
    headers["X-Wacrm-Signature"] = value
    with pytest.raises(InvalidSignature, match="is not 'v1"):
        check(headers)


@pytest.mark.parametrize(
    "name", ["X-Wacrm-Signature", "X-Wacrm-Account-Id", "X-Wacrm-Key-Id", "X-Wacrm-Scopes"]
)
def test_a_missing_header_is_refused(name: str) -> None:
    headers = signed_headers()
    del headers[name]
    with pytest.raises(InvalidSignature, match="no signed identity"):
        check(headers)


def test_a_verifier_without_a_key_is_a_setup_error() -> None:
    with pytest.raises(ValueError, match="no key"):
        check(signed_headers(), keys=[])


def test_wsgi_reads_the_raw_target_when_the_server_keeps_it() -> None:
    target = "/api/v1/contacts/%C3%A9t%C3%A9?q=a%20b"
    headers = signed_headers(method="PATCH", target=target)
    environ: dict[str, object] = {
        "HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()
    }
    environ |= {"REQUEST_METHOD": "PATCH", "PATH_INFO": "/decoded", "QUERY_STRING": "q=a%20b"}
    for raw in ("RAW_URI", "REQUEST_URI"):
        assert identity.verify_wsgi({**environ, raw: target}, [OLD], now=T) == GRANTED
    # Without a raw target, the decoded path (UTF-8 bytes as Latin-1) is escaped again.
    decoded = "/api/v1/contacts/été".encode().decode("latin-1")
    assert identity.verify_wsgi({**environ, "PATH_INFO": decoded}, [OLD], now=T) == GRANTED
    mounted = {**environ, "SCRIPT_NAME": "/api", "PATH_INFO": decoded.removeprefix("/api")}
    assert identity.verify_wsgi(mounted, [OLD], now=T) == GRANTED
    with pytest.raises(InvalidSignature):
        identity.verify_wsgi({**environ, "PATH_INFO": "/api/v1/contacts"}, [OLD], now=T)


# -- Secrets and settings ---------------------------------------------------------------------


def test_a_secret_is_its_ascii_bytes_without_surrounding_white_space() -> None:
    assert identity.secret_key(" " + OLD.decode() + "\n") == OLD
    assert identity.parse_secrets(f"{OLD.decode()}\n{NEW.decode()}\n") == [OLD, NEW]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("a" * 31, "31 characters long, fewer than 32"),
        ("a" * 20 + " " + "b" * 20, "without spaces"),
        ("é" * 40, "printable ASCII"),
        (" \n", "is empty"),
    ],
)
def test_a_weak_secret_is_refused_without_repeating_it(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        identity.secret_key(text)
    if text:
        assert text not in str(e.value)


def test_signing_is_off_unless_a_secret_is_set() -> None:
    assert Settings.from_env({}).identity_key is None


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert Settings.from_env({"WACRM_IDENTITY_SECRET": OLD.decode()}).identity_key == OLD
    path = tmp_path / "secret"
    path.write_text(OLD.decode() + "\n")
    settings = Settings.from_env({"WACRM_IDENTITY_SECRET_FILE": str(path)})
    assert settings.identity_key == OLD
    assert OLD.decode() not in repr(settings)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WACRM_IDENTITY_SECRET": "short-secret"}, "WACRM_IDENTITY_SECRET (--identity-secret)"),
        ({"WACRM_IDENTITY_SECRET_FILE": "FILE"}, "WACRM_IDENTITY_SECRET_FILE"),
        ({"WACRM_IDENTITY_SECRET_FILE": "/nonexistent/secret"}, "cannot read the file"),
        (
            {"WACRM_IDENTITY_SECRET": OLD.decode(), "WACRM_IDENTITY_SECRET_FILE": "FILE"},
            "both set",
        ),
    ],
)
def test_a_bad_secret_setting_stops_start_up_naming_it(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    path = tmp_path / "secret"
    path.write_text("short-secret\n")
    env = {k: v.replace("FILE", str(path)) for k, v in env.items()}
    with pytest.raises(SettingError, match=re.escape(named)) as e:
        Settings.from_env(env)
    assert "short-secret" not in str(e.value)


def test_a_sidecar_with_a_too_short_secret_does_not_start() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sidecar"],
        env={"PATH": "/usr/bin:/bin", "WACRM_IDENTITY_SECRET": "hunter2-hunter2"},
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("wacrm-sidecar: WACRM_IDENTITY_SECRET (--identity-secret): the")
    assert "fewer than 32" in run.stderr
    assert "hunter2" not in run.stderr + run.stdout


# -- The sidecar's answers --------------------------------------------------------------------


@pytest.fixture
async def sidecars(
    aiohttp_raw_server: Callable[..., Awaitable[RawTestServer]],
    aiohttp_client: Callable[[RawTestServer], Awaitable[Client]],
    redis_server: RedisServer,
    redis: Redis,
) -> AsyncIterator[dict[str, Client]]:
    """Return a sidecar that signs with OLD ("signing") and one without a secret ("plain")."""
    await redis.set(Keyspace().loaded, 1)
    base = Settings(redis_url=redis_server.url)
    gates = {
        "plain": Gate(base),
        "signing": Gate(replace(base, identity_secret=Secret(OLD.decode(), "test"))),
    }
    yield {
        n: await aiohttp_client(await aiohttp_raw_server(g, **HANDLER_ARGS))
        for n, g in gates.items()
    }
    for gate in gates.values():
        await gate.close()


async def test_nothing_is_signed_without_a_secret(
    sidecars: dict[str, Client], redis: Redis
) -> None:
    key = await put(redis, ("contacts:read",))
    resp = await sidecars["plain"].get("/auth", headers=nginx("/api/v1/contacts", key))
    assert resp.status == 200
    assert resp.headers["X-Wacrm-Scopes"] == "contacts:read"
    assert "X-Wacrm-Signature" not in resp.headers


async def test_auth_signs_the_identity_for_the_method_and_target_checked(
    sidecars: dict[str, Client], redis: Redis
) -> None:
    key = await put(redis, ("contacts:write",))
    target = "/api/v1/contacts/%C3%A9t%C3%A9?x=1"
    resp = await sidecars["signing"].get("/auth", headers=nginx(target, key, "PATCH"))
    assert resp.status == 200
    who = identity.verify(CIMultiDict(resp.headers), "PATCH", target, [OLD])
    assert who == Identity("acct-1", "key-1", ("contacts:write",), who.signed_at)
    assert abs(who.signed_at - time.time()) < 60
    with pytest.raises(InvalidSignature):
        identity.verify(CIMultiDict(resp.headers), "GET", target, [OLD])


async def test_auth_signs_the_target_of_an_ingress_nginx_url(
    sidecars: dict[str, Client], redis: Redis
) -> None:
    key = await put(redis, ())
    headers = {"X-Original-URL": "https://api.example.com/api/v1/me?", "Authorization": key}
    resp = await sidecars["signing"].get("/auth", headers=headers)
    assert resp.status == 200
    assert identity.verify(CIMultiDict(resp.headers), "GET", "/api/v1/me", [OLD]).scopes == ()


async def test_forward_auth_signs_the_forwarded_request(
    sidecars: dict[str, Client], redis: Redis
) -> None:
    key = await put(redis, ("contacts:read",))
    headers = forwarded("/api/v1/contacts", key, "HEAD")
    resp = await sidecars["signing"].get("/forward-auth", headers=headers)
    assert resp.status == 200
    who = identity.verify(CIMultiDict(resp.headers), "HEAD", "/api/v1/contacts", [OLD])
    assert who.key_id == "key-1"


async def test_refusals_and_me_carry_no_signature(
    sidecars: dict[str, Client], redis: Redis
) -> None:
    key = await put(redis, ("contacts:read",))
    signing = sidecars["signing"]
    denied = await signing.get("/auth", headers=nginx("/api/v1/webhooks", key))
    assert denied.status == 403
    unknown = await signing.get("/forward-auth", headers=forwarded("/api/v1/contacts", "x"))
    assert unknown.status == 401
    me = await signing.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status == 200
    for resp in (denied, unknown, me):
        assert "X-Wacrm-Signature" not in resp.headers
