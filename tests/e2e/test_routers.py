"""The route checked is the route served: the gate in front of real routers, differentially.

For each router (aiohttp, Starlette on uvicorn, Werkzeug, Express), an app serving Wacrm's
route table with that framework's own router stands behind the shipped nginx config and the
real sidecar.  Every probe of the corpus (tests/routers/corpus.py) goes out with every key,
one per scope and one scopeless, and the app names the route it dispatched to.  The property:
no request reaches a route whose scope its key lacks, and nothing answers 5xx.

WACRM_TEST_CORPUS=full sends the whole corpus (every route A, route B and climb: about three
times as many requests) instead of a third of the splices.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis as redis_sync

from demo import procs
from sidecar.records import Keyspace
from tests.conftest import RedisServer
from tests.e2e import keepalive
from tests.e2e.conftest import store_key
from tests.routers.corpus import Probe, corpus, fill
from tests.routers.table import routes

EXPRESS = procs.ROOT / ".venv" / "express" / "node_modules"
ROUTES = routes()
SCOPE = {(r.method, r.template): r.scope for r in ROUTES}
KEY_SCOPES = ["", *sorted({r.scope for r in ROUTES if r.scope})]  # "": the scopeless key
CORPUS = corpus(ROUTES, share=1 if os.environ.get("WACRM_TEST_CORPUS") == "full" else 3)
CLIENTS = 16  # connections sending at once, each kept alive

#: What came back: the status, and the (method, template) an upstream app dispatched to.
Answer = tuple[int, tuple[str, str] | None]


def app_argv(router: str) -> list[str]:
    """Return the command serving the route table with *router*'s own router, less its port."""
    if router != "express":
        return [sys.executable, "-m", f"tests.routers.{router}_app"]
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed, so Express is not either")
    if not (EXPRESS / "express").is_dir():
        pytest.skip(f"Express is not installed in {EXPRESS}: run scripts/bootstrap --test")
    table = orjson.dumps([[r.method, r.template] for r in ROUTES]).decode()
    return ["node", str(procs.ROOT / "tests" / "routers" / "express_app.js"), table]


@pytest.fixture(scope="module")
def sidecars(workdir: Path, redis_server: RedisServer) -> Iterator[dict[str, procs.Process]]:
    """Run a sidecar on Wacrm's route table, the upstreams' too, without rate limits, for
    each WACRM_ENCODED_SLASHES: its value -> the sidecar."""
    running = {}
    try:
        for slashes in ("reject", "keep"):
            folder = workdir / "routers" / slashes
            folder.mkdir(parents=True, exist_ok=True)
            env = {"WACRM_RATE_LIMIT": "off", "WACRM_ENCODED_SLASHES": slashes}
            running[slashes] = procs.sidecar(folder, redis_url=redis_server.url, extra_env=env)
            running[slashes].start()
        yield running
    finally:
        for process in running.values():
            process.stop()


@pytest.fixture
def keys(redis_server: RedisServer) -> dict[str, str]:
    """Store a key for each scope and a scopeless one, as the loader would: scope -> key."""
    redis_server.start()
    keyspace = Keyspace()
    plaintexts = {}
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushdb()
        r.set(keyspace.loaded, int(time.time() * 1000))
        for scope in KEY_SCOPES:
            plaintexts[scope] = store_key(
                r,
                keyspace,
                (scope,) if scope else (),
                account_id="7a1d6c1e-0000-4000-8000-000000000001",
                account_name="Acme Inc",
                key_id=str(uuid.uuid4()),
            )
    return plaintexts


@pytest.mark.parametrize(
    ("router", "slashes"),
    [
        *((router, "reject") for router in ("aiohttp", "starlette", "werkzeug", "express")),
        # %2F kept as data, behind the routers that keep it inside its segment (README).
        ("aiohttp", "keep"),
        ("express", "keep"),
    ],
)
def test_no_request_reaches_a_route_whose_scope_its_key_lacks(
    router: str,
    slashes: str,
    sidecars: dict[str, procs.Process],
    keys: dict[str, str],
    workdir: Path,
) -> None:
    sidecar = sidecars[slashes]
    folder = workdir / "routers" / slashes / router
    folder.mkdir(exist_ok=True)
    port = procs.free_port()
    env = {**os.environ, "PYTHONPATH": str(procs.ROOT), "NODE_PATH": str(EXPRESS)}
    app = procs.Process([*app_argv(router), str(port)], port=port, log=folder / "app.log", env=env)
    nginx = procs.nginx(folder, sidecar_port=sidecar.port, upstream_port=port)
    jobs = [(probe, scope) for probe in CORPUS for scope in KEY_SCOPES]
    try:
        app.start()
        nginx.start()
        started = time.monotonic()
        answers = send_all(nginx.port, [(p, keys[s]) for p, s in jobs])
        took = time.monotonic() - started
    finally:
        nginx.stop()
        app.stop()
    reached = sum(route is not None for _, route in answers)
    statuses = dict(sorted(Counter(status for status, _ in answers).items()))
    took_s = f"{len(jobs)} requests in {took:.1f} s"
    print(f"{router} ({slashes}): {took_s}, {reached} reached the app, {statuses}")
    problems = check(jobs, answers)
    assert not problems, (
        f"{router}: {len(problems)} of {len(jobs)} requests went wrong; the first 20:\n"
        + "\n".join(line for _, line in problems[:20])
        + f"\nby trick: {dict(Counter(trick for trick, _ in problems).most_common())}"
    )


def check(jobs: list[tuple[Probe, str]], answers: list[Answer]) -> list[tuple[str, str]]:
    """Return (trick, what went wrong) for each 5xx and each route served without its scope,
    and for each route that its own path with its scope's key did not reach."""
    problems: list[tuple[str, str]] = []
    plain: dict[tuple[str, str, str], tuple[str, str] | None] = {}
    for (probe, scope), (status, served) in zip(jobs, answers, strict=True):
        if probe.trick == "plain":
            plain[probe.method, probe.what, scope] = served
        sent = f"{probe.method} {probe.target} with a {scope or 'scopeless'} key: {status}"
        why = f"[{probe.trick}: {probe.what}]"
        if status >= 500:
            problems.append((probe.trick, f"{sent} {why}"))
        elif served is not None and SCOPE[served] not in ("", scope):
            route = f"{served[0]} {served[1]}"
            problems.append((probe.trick, f"{sent} from {route}, needing {SCOPE[served]} {why}"))
    # A corpus that everything refuses proves nothing: each route's own path, with the key
    # holding its scope, must reach that route.
    for r in ROUTES:
        if r.scope and plain.get((r.method, r.template, r.scope)) != (r.method, r.template):
            sent = f"{r.method} {fill(r.template)} with a {r.scope} key"
            problems.append(("plain", f"{sent} did not reach {r.template}"))
    return problems


def send_all(port: int, jobs: list[tuple[Probe, str]]) -> list[Answer]:
    """Send each (probe, key) through nginx on *port*, on `CLIENTS` connections at once."""
    answers: list[Answer] = [(0, None)] * len(jobs)

    def client(first: int) -> None:
        conn = keepalive.Connection(port)
        try:
            for i in range(first, len(jobs), CLIENTS):
                probe, key = jobs[i]
                head = f"{probe.method} {probe.target} HTTP/1.1\r\nHost: localhost\r\n"
                head += f"Authorization: Bearer {key}\r\n"
                if probe.method in ("POST", "PATCH"):
                    head += "Content-Length: 0\r\n"
                status, body = conn.request(head.encode() + b"\r\n")
                answers[i] = status, served_route(body)
        finally:
            conn.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return answers


def served_route(body: bytes) -> tuple[str, str] | None:
    """Return the (method, template) an upstream app says it dispatched to, if it says so."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and "upstream" in data and data.get("route"):
        return str(data["method"]), str(data["route"])
    return None
