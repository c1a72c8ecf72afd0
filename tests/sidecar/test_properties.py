"""Properties of the whole decision under hostile input: the real app, real Redis, raw bytes.

Hypothesis writes the requests; each one goes over a raw socket (so that any byte can be sent)
to a `Gate` served by aiohttp's low-level server, as the sidecar is, against the session's
redis-server holding five keys of known scopes and a finished load.  The rate limit is off, so
no example's answer depends on the ones before it.  The examples are derandomized and their
number fixed: the file takes a few seconds, the same ones on every run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import orjson
import pytest
from aiohttp.test_utils import RawTestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sidecar import records
from sidecar.apikeys import LIVE_PREFIX, is_well_formed, key_from_authorization
from sidecar.app import HANDLER_ARGS, Gate
from sidecar.records import KeyRecord, Keyspace
from sidecar.routes import NO_SCOPE, load_policy
from sidecar.settings import Settings
from tests.conftest import RedisServer
from tests.e2e import rawhttp

WACRM = load_policy()

#: Fixed across runs (derandomized examples): each example is the same request every time.
PROPERTY = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    # The served gate and Redis are shared by the examples on purpose: nothing an example
    # sends changes them (no rate limit; a use note is all the sidecar writes).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _plaintext(name: str) -> str:
    """Return a well-formed key made from *name*: the same key in every run."""
    body = base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).rstrip(b"=")
    return LIVE_PREFIX + body.decode()


#: The stored keys, by name, with their scopes.
SCOPES: dict[str, tuple[str, ...]] = {
    "contacts": ("contacts:read",),
    "conversations": ("conversations:read",),
    "webhooks": ("webhooks:manage",),
    "none": (),
    "all": tuple(sorted(WACRM.scopes)),
}
STORED = {name: _plaintext(name) for name in SCOPES}
KEY_IDS = {STORED[name]: f"key-{name}" for name in SCOPES}
KEY_SCOPES = {STORED[name]: scopes for name, scopes in SCOPES.items()}
#: Well-formed, never stored: what a revoked or unknown key looks like to Redis.
UNKNOWN = _plaintext("revoked")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gate decided: the client's status (X-Wacrm-Status on /auth) and the key id."""

    status: int
    key_id: str | None
    reason: str


@pytest.fixture
async def port(
    aiohttp_raw_server: Callable[..., Awaitable[RawTestServer]],
    redis_server: RedisServer,
    redis: Redis,
) -> AsyncIterator[int]:
    """Serve a `Gate` on the session's Redis, which holds the `STORED` keys; return its port."""
    ks = Keyspace()
    await redis.set(ks.loaded, 1)
    for name, plaintext in STORED.items():
        rec = KeyRecord(f"key-{name}", "acct-1", "Acme", plaintext[:19], SCOPES[name])
        await redis.set(ks.record(records.hash_key(plaintext)), records.encode(rec, version=1))
    gate = Gate(Settings(redis_url=redis_server.url, rate_limit=None))
    server = await aiohttp_raw_server(gate, **HANDLER_ARGS)
    assert server.port is not None
    yield server.port
    await gate.close()


async def ask(port: int, headers: list[tuple[bytes, bytes]], *, target: bytes = b"/auth") -> Answer:
    """Send one GET of *target* with *headers* and read what the gate decided."""
    r = await asyncio.to_thread(rawhttp.request, port, target, headers=headers)
    status = int(r.header("X-Wacrm-Status") or r.status)
    key_id = r.header("X-Wacrm-Key-Id")
    reason = r.header("X-Wacrm-Error") or ""
    if target != b"/auth" and r.header("Content-Type") == "application/json":
        body = orjson.loads(r.body)
        reason = r.body.decode()
        if status == 200 and target != b"/forward-auth":  # /api/v1/me names the key in its body
            key_id = body["data"]["key"]["id"]
    return Answer(status, key_id, reason)


# --- Authorization: any value, any bytes -------------------------------------------------

_SCHEMES = [b"", b"Bearer", b"bearer", b"BEARER", b"bEaReR", b"Bearer:", b"Bearerx", b"Basic"]
_SCHEMES += [b"Token", b"B\xc3\xa9arer", b"Bearer\x00", b"\xefBearer"]
_GAPS = [b"", b" ", b"   ", b"\t", b" \t ", b"\x0b", b"\x0c", b"\xa0", b"\xc2\xa0", b"\x00", b"+"]
_TAILS = [b"", b" ", b"  ", b"\t", b" \t", b"x", b"=", b",", b";", b"\x00", b"\xff", b"\xc2\xa0"]
_TAILS += [b" " + UNKNOWN.encode(), b", Bearer " + STORED["all"].encode()]
_BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def _near_misses(draw: st.DrawFn) -> bytes:
    """Return a stored key changed in one place: a key Redis does not hold, or not a key."""
    key = draw(st.sampled_from(sorted(STORED.values())))
    at = draw(st.integers(len(LIVE_PREFIX), len(key) - 1))
    swap = draw(st.sampled_from(_BASE64URL.replace(key[at], "")))
    change = draw(
        st.sampled_from(
            [
                key[:at] + swap + key[at + 1 :],  # another base64url character
                key[:at] + key[at].swapcase() + key[at + 1 :],
                key[:at] + key[at + 1 :],  # one short
                key[:at] + swap + key[at:],  # one long
                key + "=",
                key.upper(),
                "wacrm_test_" + key[len(LIVE_PREFIX) :],
                "WACRM_LIVE_" + key[len(LIVE_PREFIX) :],
                key[:at] + f"%{ord(key[at]):02X}" + key[at + 1 :],
                key[:at] + chr(0xFF00 + ord(key[at]) - 0x20) + key[at + 1 :],  # full-width
                key.replace("_", "\N{FULLWIDTH LOW LINE}", 1),
            ]
        )
    )
    return change.encode()


_KEYS = st.sampled_from([k.encode() for k in STORED.values()]) | st.just(UNKNOWN.encode())
_VALUES = st.one_of(
    st.tuples(
        st.sampled_from([b"", b" ", b"\t"]),
        st.sampled_from(_SCHEMES),
        st.sampled_from(_GAPS),
        _KEYS | _near_misses() | st.just(b""),
        st.sampled_from(_TAILS),
    ).map(b"".join),
    st.binary(max_size=80),
    st.text(max_size=60).map(str.encode),
)
#: Header names: the Authorization header in any case, and names that are not it.
_NAMES = [b"Authorization", b"authorization", b"AUTHORIZATION", b"aUTHORIZATION"]
_OTHER_NAMES = [b"Proxy-Authorization", b"X-Authorization", b"Authorization_", b"Authorisation"]
_AUTH_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(_NAMES + _OTHER_NAMES), _VALUES.map(lambda v: re.sub(b"[\r\n]", b"", v))
    ),
    max_size=3,
)
#: Where a key is checked: nginx's /auth, a forward-auth proxy's, and /api/v1/me itself.
_ENDPOINTS = st.sampled_from(
    [
        (b"/auth", [(b"X-Original-URI", b"/api/v1/me"), (b"X-Original-Method", b"GET")]),
        (b"/forward-auth", [(b"X-Forwarded-Uri", b"/api/v1/me")]),
        (b"/api/v1/me", []),
    ]
)
#: The documented form, after the field's surrounding spaces and tabs (RFC 9110's OWS) are
#: taken off: ``Bearer`` in any case, one or more spaces and the key; or the key alone.
_DOCUMENTED = re.compile(rb"(?:[Bb][Ee][Aa][Rr][Ee][Rr] +)?(wacrm_live_[A-Za-z0-9_-]{43})")


def _stored_key_sent(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Return the stored key *headers* carry in the one documented form, or None."""
    values = [v for name, v in headers if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    m = _DOCUMENTED.fullmatch(values[0].strip(b" \t"))
    key = m[1].decode() if m else None
    return key if key in KEY_IDS else None


@PROPERTY
@given(_AUTH_HEADERS, _ENDPOINTS)
async def test_only_a_stored_key_in_the_documented_form_is_ever_let_through(
    port: int,
    auth_headers: list[tuple[bytes, bytes]],
    endpoint: tuple[bytes, list[tuple[bytes, bytes]]],
) -> None:
    """Any Authorization headers, any bytes: a 200 names exactly the stored key sent.

    On a route any valid key may call: 200 with that key's id when one Authorization header
    holds a stored key as ``Bearer <key>`` (scheme in any case) or bare, give or take the
    spaces around the field; otherwise 401 (or 400: two Authorization headers, bytes the HTTP
    parser refuses), never another key's identity, never a 5xx or a dropped connection.
    """
    target, routing = endpoint
    answer = await ask(port, [*routing, *auth_headers], target=target)
    sent = _stored_key_sent(auth_headers)
    if sent is not None:
        assert (answer.status, answer.key_id) == (200, KEY_IDS[sent]), answer
    else:
        assert answer.status in (400, 401), answer
        assert answer.key_id is None


@settings(max_examples=2000, derandomize=True, database=None)
@given(st.binary(max_size=120))
def test_the_key_parser_reads_any_bytes_as_the_http_parser_hands_them_over(raw: bytes) -> None:
    """Bytes aiohttp decodes with surrogateescape: None, or a well-formed key taken from them."""
    value = raw.decode("utf-8", "surrogateescape")
    key = key_from_authorization(value)
    assert key is None or (is_well_formed(key) and key in value)


# --- Paths: one verdict however they are spelled ------------------------------------------

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
#: An id's pieces: characters that need no escape, sub-delimiters that a path may hold raw,
#: and escapes of characters that need one (non-ASCII UTF-8, space, '@' spelled escaped).
_ID_PIECES = st.sampled_from(list(_UNRESERVED) + list("!$&'()*+,=:@"))
_ID_ESCAPES = st.sampled_from(["%C3%A9", "%E2%82%AC", "%F0%9F%94%91", "%20", "%40", "%22"])
_IDS = (
    st.lists(_ID_PIECES | _ID_ESCAPES, min_size=1, max_size=6)
    .map("".join)
    .filter(lambda s: s not in (".", ".."))
)
#: Routes of Wacrm's table, and paths it does not list (refused 403 to every key).
_TEMPLATES = [(r.method, r.template) for r in WACRM.routes] + [
    ("HEAD", "/api/v1/contacts"),
    ("GET", "/api/v1/contacts/{id}/notes"),
    ("DELETE", "/api/v1/contacts/{id}"),
    ("GET", "/api/v2/contacts"),
]
#: The templates that end in an id: a climb from there is one segment to a raw router.
_ID_TEMPLATES = [(m, t) for m, t in _TEMPLATES if t.endswith("}")]
#: Ways to spell a separator that a decoding, or twice-decoding, server reads as '/'.
_SLASHES = ["%2F", "%2f", "%5C", "%5c", "\\", "%252F", "%C0%AF"]
_DOTS = [".", "%2e", "%2E"]
_DOTDOTS = ["..", "%2e%2e", ".%2E", "%2E.", "%2E%2e", "..;"]
_CLIMB_SEPS = ["/", "%2F", "%2f", "%5C", "\\", "%252F"]
#: Queries that name other routes: the query is never examined, so never changes a verdict.
_QUERIES = ["", "a=1", "/../webhooks", "x=%2F..%2F..%2Fwebhooks", "?", "a;b=c", "%zz", "é"]
_FRAGMENTS = ["", "/../../webhooks", "x"]
_MATRIX = [";", ";jsessionid=1", ";a=b", "%3B", "%3bx"]

#: Spellings that keep the path exactly as a raw router and a decoding one read it.
SAME = frozenset({"query", "escape case"})


@dataclass(frozen=True, slots=True)
class Spelling:
    """A canonical path, how one request spelled it, and how it was respelled."""

    method: str
    canonical: str
    spelled: str
    changes: tuple[str, ...]


@st.composite
def _spellings(draw: st.DrawFn, templates: list[tuple[str, str]] = _TEMPLATES) -> Spelling:
    """Spell a route's path in ways a decoding, resolving, merging server reads as itself."""
    method, template = draw(st.sampled_from(templates))
    segments = [draw(_IDS) if s.startswith("{") else s for s in template[1:].split("/")]
    canonical = "/" + "/".join(segments)
    seps = ["/"] * len(segments)  # the separator before each segment
    changes: list[str] = []
    climbing = draw(st.booleans())  # then only this, and perhaps a query
    for change in draw(st.lists(st.sampled_from(_CHANGES), max_size=0 if climbing else 3)):
        i = draw(st.integers(0, len(segments) - 1))
        seg = segments[i]
        if change == "escape unreserved":
            plain = [j for j, c in enumerate(seg) if c in _UNRESERVED]
            if not plain:
                continue
            j = draw(st.sampled_from(plain))
            hexed = f"%{ord(seg[j]):02X}"
            segments[i] = seg[:j] + (hexed.lower() if draw(st.booleans()) else hexed) + seg[j + 1 :]
        elif change == "escape case":
            if "%" not in seg:
                continue
            segments[i] = re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), seg)
        elif change == "raw non-ASCII":
            if "%C3%A9" not in seg:
                continue
            segments[i] = seg.replace("%C3%A9", "é", 1)
        elif change == "double slash":
            seps[i] = "/" * draw(st.integers(2, 3))
        elif change == "dot segment":
            seps[i] += draw(st.sampled_from(_DOTS)) + "/"
        elif change == "dot-dot segment":
            seps[i] += draw(_IDS) + "/" + draw(st.sampled_from(_DOTDOTS)) + "/"
        elif change == "encoded slash":
            if i == 0:
                continue
            seps[i] = draw(st.sampled_from(_SLASHES))
        elif change == "matrix":
            segments[i] = seg + draw(st.sampled_from(_MATRIX))
        else:  # the end of the target: changed once, below
            changes.append(change)
            continue
        changes.append(change)
    path = "".join(s + seg for s, seg in zip(seps, segments, strict=True))
    if climbing:
        # Start on another route's path and climb out of it to the root, each step and the
        # path's own separators spelled alike: encoded, a raw router reads one segment there,
        # and so the route of the id the climb starts from.
        _, other = draw(st.sampled_from(_ID_TEMPLATES))
        start = [draw(_IDS) if s.startswith("{") else s for s in other[1:].split("/")]
        sep = draw(st.sampled_from(_CLIMB_SEPS))
        climb = (sep + draw(st.sampled_from(_DOTDOTS))) * len(start)
        if sep != "/":
            path = path.replace("/", sep)
        path = "/" + "/".join(start) + climb + path
        changes.append("climb")
        if draw(st.booleans()):
            changes.append("query")
    if "trailing slash" in changes:
        path += draw(st.sampled_from(["/", "//", "/."]))
    if "query" in changes:
        path += "?" + draw(st.sampled_from(_QUERIES))
    if "fragment" in changes:
        path += "#" + draw(st.sampled_from(_FRAGMENTS))
    return Spelling(method, canonical, path, tuple(changes))


_CHANGES = [
    "escape unreserved",
    "escape case",
    "raw non-ASCII",
    "double slash",
    "dot segment",
    "dot-dot segment",
    "encoded slash",
    "matrix",
    "trailing slash",
    "query",
    "fragment",
]


def _front(
    front: str, method: str, target: str, decoy: tuple[str, str] | None
) -> list[tuple[bytes, bytes]]:
    """Return the headers by which *front* tells the sidecar which request to check."""
    t = target.encode()
    headers = {
        "nginx": [(b"X-Original-URI", t), (b"X-Original-Method", method.encode())],
        "ingress-nginx": [
            (b"X-Original-URL", b"https://api.example.com" + t),
            (b"X-Original-Method", method.encode()),
        ],
        "forward-auth": [(b"X-Forwarded-Uri", t), (b"X-Forwarded-Method", method.encode())],
    }[front]
    if decoy is not None:  # a routing header the client sent, naming another route
        name, value = decoy
        headers.append((name.encode(), value.encode()))
    return headers


#: Routing headers a client may add, each naming a route the key may well have.
_DECOYS = st.none() | st.tuples(
    st.sampled_from(["X-Original-URI", "X-Original-URL", "X-Forwarded-Uri", "X_Original_URI"]),
    st.sampled_from(["/api/v1/me", "/api/v1/contacts", "https://h/api/v1/contacts/1"]),
)


def _readings(target: str) -> set[str]:
    """Return the paths that different servers read in the request *target*.

    As sent (aiohttp, Express); percent-decoded (Starlette, Werkzeug); decoded twice; and
    decoded with ``\\`` read as ``/``, ``;`` parameters cut (Tomcat, Spring), empty and dot
    segments resolved, a trailing ``/`` dropped (servers that clean paths).
    """
    raw = target.partition("#")[0].partition("?")[0]
    decoded = unquote(raw, errors="replace")
    cut = "/".join(s.partition(";")[0] for s in raw.split("/"))
    cleaned = {
        _resolve(unquote(p, errors="replace").replace("\\", "/"))
        for p in (raw, cut, unquote(raw, errors="replace"))
    }
    return {raw, decoded, unquote(decoded, errors="replace"), *cleaned}


def _resolve(path: str) -> str:
    out: list[str] = []
    for s in path.split("/"):
        if s == "..":
            if out:
                out.pop()
        elif s not in ("", "."):
            out.append(s)
    return "/" + "/".join(out)


def _may_call(key: str, method: str, path: str) -> bool:
    """Tell whether *key* may call what *path* routes to (nothing at all counts as yes)."""
    route = WACRM.match(method, path)
    return route is None or route.scope == NO_SCOPE or route.scope in KEY_SCOPES[key]


def _expected(key: str, method: str, canonical: str) -> tuple[int, str | None]:
    """Return what the route table says of *key* on the *canonical* path: status, key id."""
    if WACRM.match(method, canonical) is not None and _may_call(key, method, canonical):
        return 200, KEY_IDS[key]
    return 403, None  # the scope is missing, or the table does not list the path


@PROPERTY
@given(
    _spellings(),
    st.sampled_from(sorted(STORED.values())),
    st.sampled_from(["nginx", "ingress-nginx", "forward-auth"]),
    _DECOYS,
)
async def test_a_paths_verdict_does_not_change_with_how_it_is_spelled(
    port: int, spelling: Spelling, key: str, front: str, decoy: tuple[str, str] | None
) -> None:
    """A spelling of a path gets the canonical path's verdict, or a 400; never another allow.

    The canonical path P is a route's path (or a path the table does not list) with ids of
    unreserved characters, sub-delimiters and escapes of what needs one.  A spelling S is P
    with up to three changes that a server which percent-decodes, resolves dot segments,
    merges slashes, drops a trailing slash, cuts ``;`` parameters, drops the query and the
    fragment, or decodes twice, reads as P: escaped unreserved characters (either hex case),
    lower-case escapes, raw non-ASCII, ``//``, ``.`` and ``x/..`` segments (escaped too), an
    encoded ``/`` or ``\\`` (``%2F``, ``%5C``, ``%252F``, overlong ``%C0%AF``...), ``;`` params,
    a trailing ``/``, a query naming another route, a fragment; or, alone, a climb: the path
    of a route ending in an id, climbed out of to the root with ``..`` (escaped, or ``..;``)
    and then P, every separator on the way spelled alike (``/``, ``%2F``, ``%5C``, ``\\``,
    ``%252F``), so that a raw router reads the route of that id.  It reaches the sidecar as
    nginx (X-Original-URI), ingress-nginx (X-Original-URL) or a forward-auth proxy
    (X-Forwarded-Uri) passes it, with or without a routing header from the client that names
    another path.  Then, for every stored key:

    - P itself gets the table's verdict: 200 with the key's id when the key has the scope of
      P's route (or the route needs none), 403 otherwise;
    - S gets exactly P's verdict, or a 400 (the path rule, or contradicting routing headers);
      in particular S is let through only when P is, and as the same key;
    - when S is let through, every reading of S (as sent, decoded once or twice, cleaned: see
      `_readings`) routes to a route the key may call, or to none;
    - S that only adds a query or changes the case of escapes gets exactly P's verdict;
    - nothing answers 5xx.
    """
    method, canonical = spelling.method, spelling.canonical
    auth = [(b"Authorization", b"Bearer " + key.encode())]
    target = b"/forward-auth" if front == "forward-auth" else b"/auth"
    plain = await ask(port, [*_front(front, method, canonical, None), *auth], target=target)
    assert (plain.status, plain.key_id) == _expected(key, method, canonical), plain
    answer = await ask(
        port, [*_front(front, method, spelling.spelled, decoy), *auth], target=target
    )
    if answer.status == 200:
        for path in _readings(spelling.spelled):
            assert _may_call(key, method, path), (spelling, path, answer)
    if set(spelling.changes) <= SAME and decoy is None:
        assert (answer.status, answer.key_id) == (plain.status, plain.key_id), answer
    assert answer.status == 400 or (answer.status, answer.key_id) == (
        plain.status,
        plain.key_id,
    ), (spelling, answer)


@PROPERTY
@given(_spellings([("GET", "/api/v1/me")]), st.sampled_from(sorted(STORED.values())))
async def test_me_answers_its_one_spelling_only(port: int, spelling: Spelling, key: str) -> None:
    """``GET /api/v1/me`` spelled every way, sent to the sidecar as nginx passes it on.

    Its own spelling, with a query or not, is answered for the key; every other spelling is
    refused with a 400 (the path rule) or a 404 (a path the sidecar does not serve).
    """
    auth = [(b"Authorization", b"Bearer " + key.encode())]
    answer = await ask(port, auth, target=spelling.spelled.encode())
    if set(spelling.changes) <= SAME:
        assert (answer.status, answer.key_id) == (200, KEY_IDS[key]), answer
    else:
        assert answer.status in (400, 404), (spelling, answer)
