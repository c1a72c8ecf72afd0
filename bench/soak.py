"""Soak the whole gate with mixed and hostile traffic, and watch its memory.

Run ``.venv/bin/python bench/soak.py --help``.  Starts redis-server, the sidecar
(``--workers``, rate limit off but for one key), the shipped nginx in front of a stand-in
upstream, and ``loader run`` on a SQLite key table with a rate-limits file giving one key
``--limit``.  Then wrk sends, for ``--minutes``, one class of request from each of its
threads (so every answer is counted against its class):

valid          keys with ``contacts:read`` on its routes, as ``Bearer``, ``bearer`` or bare
scope          the same keys on routes they lack, with client routing headers naming theirs
unknown        well-formed keys never minted, and values that are not keys
revoked        keys revoked before the run, or in an earlier round
revoking       the round's key, revoked halfway through the round with ``loader keys revoke``
rate_limited   the key of the rate-limits file, far over its limit
hostile_path   dot segments, encoded slashes and dots, bad or needless escapes, ``;``, ``//``
hostile_header X-Wacrm-* and method overrides in any spelling, routing headers with ``_``, two
               Authorization headers, a client's X-Original-URL, a header over 8 KB
hostile_me     spellings that nginx routes to /api/v1/me but the sidecar serves not (404)
dropped_header X-Wacrm-* and routing headers spelled with '_' or '.', which nginx drops (200)
overlong_uri   a request target of 9,000 bytes
many_headers   101 request headers

wrk runs in rounds of ``--round`` seconds; between two rounds the key revoked in the last one
joins the revoked class.  Right after each revocation the key is sent three times more, which
must be refused (401).  Every few seconds (``--sample``) the resident memory of the sidecar
(supervisor and workers) and of the loader is read from ``/proc``.

The run fails (exit 1) when any answer is a 5xx or a class gets a status it must not; the
memory figures are reported with a verdict, not enforced.  The last line is ``SOAK-RESULT``
and a JSON object, for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import redis as redis_sync

from bench import stack
from demo import procs
from loader import admin
from loader.settings import Settings as LoaderSettings
from sidecar import apikeys
from sidecar.records import Keyspace

MARKER = "SOAK-RESULT "
_WRK_MARKER = "SOAK-WRK "
VALID_KEYS = 4
UNKNOWN_KEYS = 200
#: Requests sent right after each revocation, each of which must be refused.
PROBES = 3


@dataclass(slots=True)
class Class:
    """One kind of traffic: the raw requests wrk cycles through, the statuses allowed."""

    name: str
    expected: frozenset[int]
    requests: list[bytes]
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@dataclass(slots=True)
class Keys:
    """The keys of the run, plaintexts and ids."""

    valid: list[str]
    limited: tuple[str, str]
    revoked: list[str]
    #: (key id, plaintext), one revoked in each round.
    doomed: list[tuple[str, str]]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak and print its figures; return the exit status."""
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="wacrm-soak-") as tmp:
        return Soak(Path(tmp), args).run()


class Soak:
    """The servers of one soak and the traffic sent through them."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.started: list[procs.Process] = []
        self.samples: list[tuple[float, int, int]] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.probes: dict[int, int] = {}
        self.revoke_seconds: list[float] = []

    def run(self) -> int:
        try:
            self._start()
            return self._soak()
        finally:
            for p in reversed(self.started):
                p.stop()

    def _spawn(self, p: procs.Process, *, wait: bool = True) -> procs.Process:
        self.started.append(p)
        if wait:
            p.start()
        else:
            p.start_background()
        return p

    def _start(self) -> None:
        a = self.args
        self.workdir.chmod(0o711)  # nginx started as root runs its workers as nobody
        redis = self._spawn(procs.redis_server(self.workdir))
        self.redis_url = f"redis://127.0.0.1:{redis.port}/0"
        env = {**os.environ, "PYTHONPATH": str(procs.ROOT)}
        self.loader_env = {
            **env,
            "WACRM_SOURCE": f"sqlite:///{self.workdir}/keys.db",
            "WACRM_REDIS_URL": self.redis_url,
            "WACRM_LOG_LEVEL": "warning",
        }
        self.rounds = max(1, math.ceil(a.minutes * 60 / a.round))
        self.keys = asyncio.run(self._mint(LoaderSettings.from_env(self.loader_env)))
        limits = self.workdir / "rate-limits"
        limits.write_text(f"key {self.keys.limited[0]} {a.limit}\n")
        self.loader_env["WACRM_RATE_LIMITS"] = str(limits)
        # Revoked before the run: through the CLI too, before `loader run` starts.
        for key_id, plaintext in self._take_doomed(2):
            self._revoke(key_id)
            self.keys.revoked.append(plaintext)
        self.loader = self._spawn(
            procs.Process(
                [sys.executable, "-m", "loader", "run"],
                port=0,
                log=self.workdir / "loader.log",
                env=self.loader_env,
            ),
            wait=False,
        )
        with redis_sync.Redis.from_url(self.redis_url) as r:
            _wait(lambda: r.get(Keyspace().loaded) not in (None, b"0"), 30, "the first reconcile")
        sidecar_env = {**env, "WACRM_RATE_LIMIT": "off", "WACRM_LOG_LEVEL": "warning"}
        sidecar_env["WACRM_WORKERS"] = str(a.workers)
        self.sidecar = self._spawn(
            procs.sidecar(self.workdir, redis_url=self.redis_url, extra_env=sidecar_env)
        )
        ports = stack.NginxPorts(
            listen=procs.free_port(), auth=self.sidecar.port, upstream=procs.free_port()
        )
        self.nginx = self._spawn(stack.nginx(self.workdir, ports))
        self.port = ports.listen
        # The limited key carries its own limit: the loader wrote it into the record.
        limit = _get(self.port, "/api/v1/contacts", self.keys.limited[1])
        if limit.getheader("X-RateLimit-Limit") != a.limit.split("/")[0]:
            raise RuntimeError(f"the limited key's limit is not {a.limit}: {limit.headers}")

    async def _mint(self, settings: LoaderSettings) -> Keys:
        """Create the account and keys in the table (and Redis), as ``keys create`` does."""
        account = await admin.create_account(settings, "Soak")

        async def key(scopes: Sequence[str] = ("contacts:read",)) -> tuple[str, str]:
            made = await admin.create_key(
                settings, account_id=account, name="soak", scopes=scopes, expires_in_days=None
            )
            return made.key.id, made.plaintext

        valid = [(await key())[1] for _ in range(VALID_KEYS)]
        limited = await key()
        doomed = [await key() for _ in range(self.rounds + 2)]
        return Keys(valid, limited, [], doomed)

    def _take_doomed(self, n: int) -> list[tuple[str, str]]:
        taken, self.keys.doomed = self.keys.doomed[:n], self.keys.doomed[n:]
        return taken

    def _revoke(self, key_id: str) -> None:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "loader", "keys", "revoke", key_id],
            env=self.loader_env,
            cwd=procs.ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.revoke_seconds.append(time.monotonic() - began)
        if done.returncode != 0:
            raise RuntimeError(f"keys revoke {key_id} exited {done.returncode}: {done.stderr}")

    def _classes(self, doomed: str | None) -> list[Class]:
        return traffic(self.keys, doomed, self.port)

    def _soak(self) -> int:
        a = self.args
        totals = {c.name: c for c in self._classes(None)}
        sockets: dict[str, int] = {}
        seconds = 0.0
        load_start = os.getloadavg()
        began = time.monotonic()
        self._sample(began)
        for n in range(self.rounds):
            doomed = self._take_doomed(1)
            key_id, plaintext = doomed[0] if doomed else (None, None)
            classes = self._classes(plaintext)
            if plaintext is None:  # the pool ran out: the round's key stays valid
                classes = [c for c in classes if c.name != "revoking"]
            script = write_script(self.workdir, f"round{n}", classes)
            argv = [
                "wrk",
                f"--threads={len(classes)}",
                f"--connections={len(classes) * a.connections}",
                f"--duration={a.round}s",
                "--timeout=5s",
                f"--script={script}",
                f"http://127.0.0.1:{self.port}/",
            ]
            round_began = time.monotonic()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            revoked = key_id is None
            while proc.poll() is None:
                now = time.monotonic()
                if not revoked and now - round_began >= a.round / 2:
                    assert key_id is not None and plaintext is not None
                    self._revoke(key_id)
                    for _ in range(PROBES):
                        status = _get(self.port, "/api/v1/contacts", plaintext).status
                        self.probes[status] = self.probes.get(status, 0) + 1
                    revoked = True
                if now - self.samples[-1][0] >= a.sample:
                    self._sample(now)
                time.sleep(0.1)
            out = proc.communicate()[0].decode(errors="replace")
            result = _wrk_result(out)
            seconds += result["duration_us"] / 1e6
            for name, count in result["errors"].items():
                sockets[name] = sockets.get(name, 0) + count
            for index, statuses in result["classes"].items():
                cls = classes[int(index) - 1]
                for code, count in statuses.items():
                    totals[cls.name].statuses[int(code)] = (
                        totals[cls.name].statuses.get(int(code), 0) + count
                    )
            if plaintext is not None:
                self.keys.revoked.append(plaintext)
            if n % max(1, round(60 / a.round)) == 0 or n == self.rounds - 1:
                t, side, load = self.samples[-1]
                print(
                    f"soak: {t - began:6.0f} s  sidecar {side / 1024:.1f} MiB"
                    f"  loader {load / 1024:.1f} MiB  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        self._sample(time.monotonic())
        load_end = os.getloadavg()
        return self._report(list(totals.values()), sockets, seconds, began, load_start, load_end)

    def _sample(self, now: float) -> None:
        assert self.sidecar.proc is not None and self.loader.proc is not None
        sidecar = stack.rss_kib(stack.tree(self.sidecar.proc.pid))
        loader = stack.rss_kib(stack.tree(self.loader.proc.pid))
        self.samples.append((now, sidecar, loader))

    def _report(
        self,
        classes: list[Class],
        sockets: dict[str, int],
        seconds: float,
        began: float,
        load_start: tuple[float, float, float],
        load_end: tuple[float, float, float],
    ) -> int:
        a = self.args
        requests = sum(c.total for c in classes)
        print(
            f"\nSoak: {seconds:.0f} s of wrk in {self.rounds} rounds of {a.round} s,"
            f" {len(classes)} classes x {a.connections} connections, sidecar workers"
            f" {a.workers}; {requests:,} requests, {requests / seconds:,.0f} req/s\n"
        )
        print("| class | expected | requests | req/s | statuses |")
        print("|---|---|---:|---:|---|")
        wall = time.monotonic() - began
        for c in classes:
            got = ", ".join(f"{code}: {n:,}" for code, n in sorted(c.statuses.items()))
            want = "/".join(str(s) for s in sorted(c.expected))
            print(f"| {c.name} | {want} | {c.total:,} | {c.total / seconds:,.0f} | {got} |")
            self._judge(c, wall)
        probes = ", ".join(f"{s}: {n}" for s, n in sorted(self.probes.items()))
        print("", *self.notes, sep="\n")
        print(
            f"- Revocations during the run: {len(self.revoke_seconds) - 2}"
            f" by `loader keys revoke` ({min(self.revoke_seconds):.2f} to"
            f" {max(self.revoke_seconds):.2f} s a command); the key right after: {probes}"
        )
        if set(self.probes) - {401}:
            self.failures.append(f"a key was not refused right after its revocation: {probes}")
        print(f"- Socket errors (wrk): {sockets or 'none'}")
        if sockets.get("timeout"):
            self.failures.append(f"wrk timed out on {sockets['timeout']} requests")
        memory = self._memory(began)
        print(
            f"- Load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
            f" (1 min); {load_end[1]:.2f} and {load_end[2]:.2f} over 5 and 15 min at the end;"
            f" {os.cpu_count()} cores"
        )
        for f in self.failures:
            print(f"FAILED: {f}")
        fivexx = sum(n for c in classes for s, n in c.statuses.items() if s >= 500)
        summary = {
            "seconds": round(seconds, 1),
            "requests": requests,
            "rate": round(requests / seconds),
            "classes": {c.name: {str(s): n for s, n in c.statuses.items()} for c in classes},
            "probes": {str(s): n for s, n in self.probes.items()},
            "fivexx": fivexx,
            "sockets": sockets,
            "memory": memory,
            "load": [load_start[0], *load_end],
            "failures": self.failures,
        }
        print(MARKER + json.dumps(summary), flush=True)
        return 1 if self.failures else 0

    def _judge(self, c: Class, wall: float) -> None:
        """Note every way *c*'s answers break its rule; *wall* is the seconds since the start."""
        a = self.args
        if c.total == 0:
            self.failures.append(f"{c.name}: no answers")
        if bad := {s: n for s, n in c.statuses.items() if s not in c.expected}:
            self.failures.append(f"{c.name}: statuses {bad}, expected only {sorted(c.expected)}")
        if c.name == "rate_limited":
            limit, window = _limit(a.limit)
            # GCRA: over any t seconds, at most limit * (1 + t / window) are let through.
            most = math.floor(limit * (1 + wall / window))
            let = c.statuses.get(200, 0)
            self.notes.append(
                f"- rate_limited: {let:,} let through in {wall:.0f} s, at most {most:,}"
            )
            if c.statuses.get(200, 0) > most or not c.statuses.get(429):
                self.failures.append(f"{c.name}: {c.statuses} in {wall:.0f} s (at most {most})")
        if c.name == "revoking" and self.rounds and not c.statuses.get(401):
            self.failures.append("revoking: no key was refused after its revocation")

    def _memory(self, began: float) -> dict[str, dict[str, float]]:
        """Print and return each process's RSS: start, after warm-up, peak, end, growth."""
        warm = next((s for s in self.samples if s[0] - began >= self.args.warmup), self.samples[-1])
        out: dict[str, dict[str, float]] = {}
        print(f"- RSS, {len(self.samples)} samples every {self.args.sample:g} s:")
        for i, name in ((1, "sidecar (all workers)"), (2, "loader")):
            start, after, end = self.samples[0][i], warm[i], self.samples[-1][i]
            peak = max(s[i] for s in self.samples)
            grew = (end - after) / 1024
            pct = 100 * (end - after) / after if after else 0.0
            verdict = "flat" if abs(grew) <= 2 or abs(pct) <= 5 else "NOT flat"
            print(
                f"  - {name}: start {start / 1024:.1f} MiB, after {warm[0] - began:.0f} s of"
                f" warm-up {after / 1024:.1f}, peak {peak / 1024:.1f}, end {end / 1024:.1f}:"
                f" end minus warm-up {grew:+.1f} MiB ({pct:+.1f}%), {verdict}"
            )
            out[name.split()[0]] = {
                "start": start / 1024,
                "warm": after / 1024,
                "peak": peak / 1024,
                "end": end / 1024,
                "growth_mib": grew,
                "growth_pct": pct,
            }
        return out


def traffic(keys: Keys, doomed: str | None, port: int) -> list[Class]:
    """Return the classes of one round: *doomed* is the key revoked halfway through it."""
    valid, limited = keys.valid, keys.limited[1]
    any_valid = valid[0]
    unknown = [apikeys.mint().plaintext for _ in range(UNKNOWN_KEYS)]
    auth = [f"Bearer {k}" for k in valid] + [f"bearer {k}" for k in valid] + valid
    host = f"127.0.0.1:{port}"

    def req(target: str, *headers: tuple[str, str], method: str = "GET") -> bytes:
        return _raw(method, target, host, headers)

    def key(k: str) -> tuple[str, str]:
        return ("Authorization", f"Bearer {k}")

    hostile_paths = [
        "/api/v1/contacts/../webhooks",
        "/api/v1/contacts/%2e%2e/webhooks",
        "/api/v1/contacts/.%2E/webhooks",
        "/api/v1/./contacts",
        "/api/v1/me/../contacts",
        "/api/v1/m%65",
        "/api/v1/contacts/x%2f..%2f..%2fwebhooks",
        "/api/v1/contacts/a%5Cb",
        "/api/v1/contacts/%252F",
        "/api/v1/contacts/%C0%AF",
        "/api/v1/contacts/%zz",
        "/api/v1/contacts/%4",
        "/api/v1/c%6Fntacts",
        "/api/v1/contacts/%FF",
        "/api/v1/contacts/%00",
        "/api/v1//contacts",
        "/api/v1/contacts/",
        "/api/v1/contacts;jsessionid=1",
        "/api/v1/contacts/1;/../../webhooks",
        "/api/v1/contacts/%3B",
        "/api/v1/contacts/%3F/../webhooks",
        "/api/v1/contacts/%23/../webhooks",
    ]
    pad = "x" * 9000
    return [
        Class("valid", frozenset({200}), [
            _raw("GET", p, host, [("Authorization", v)])
            for v in auth for p in ("/api/v1/contacts", "/api/v1/contacts/42", "/api/v1/me")
        ]),
        Class("scope", frozenset({403}), [
            req("/api/v1/webhooks", key(k), ("X-Original-URI", "/api/v1/contacts"))
            for k in valid
        ] + [
            req("/api/v1/webhooks", key(any_valid), ("X-Forwarded-Uri", "/api/v1/contacts")),
            req("/api/v1/contacts", key(any_valid), method="POST"),
            req("/api/v1/messages", key(any_valid), ("X-Original-Method", "GET"), method="POST"),
            req("/api/v1/contacts/1/notes", key(any_valid)),
        ]),
        Class("unknown", frozenset({401}), [
            req("/api/v1/contacts", key(k)) for k in unknown
        ] + [
            req("/api/v1/contacts", ("Authorization", v))
            for v in ("Bearer nope", "Basic dXNlcjpwYXNz", f"Bearer\t{any_valid}", "Bearer ",
                      f"Bearer {any_valid}x", f"Token {any_valid}", any_valid.upper())
        ] + [req("/api/v1/contacts")]),
        Class("revoked", frozenset({401}), [
            req(p, key(k)) for k in keys.revoked for p in ("/api/v1/contacts", "/api/v1/me")
        ]),
        Class("revoking", frozenset({200, 401}), [
            req("/api/v1/contacts", key(doomed or any_valid))
        ]),
        Class("rate_limited", frozenset({200, 429}), [req("/api/v1/contacts", key(limited))]),
        Class("hostile_path", frozenset({400}), [req(p, key(any_valid)) for p in hostile_paths]),
        Class("hostile_header", frozenset({400}), [
            req("/api/v1/contacts", key(any_valid), (name, value))
            for name, value in (
                ("X-Wacrm-Scopes", "webhooks:manage"),
                ("x-wacrm-key-id", "other"),
                ("X-HTTP-Method-Override", "DELETE"),
                ("X-Method-Override", "DELETE"),
                ("X-Original-URL", "http://h/api/v1/me"),
                ("Authorization", f"Bearer {valid[1]}"),
                ("X-Pad", pad),
            )
        ]),
        # nginx routes these to /api/v1/me, whose sidecar endpoint serves that one path.
        Class("hostile_me", frozenset({404}), [
            req(p, key(any_valid))
            for p in ("/api/v1/./me", "/api/v1//me", "/api/v1/contacts/x%2F..%2F..%2Fme",
                      "/api/v1/x/../me")
        ]),
        # nginx drops a header whose name holds '_' or '.' (ignore_invalid_headers): the
        # request goes on without it, and the upstream never sees it.
        Class("dropped_header", frozenset({200}), [
            req("/api/v1/contacts", key(any_valid), (name, "/api/v1/me"))
            for name in ("X_Wacrm_Account_Id", "X.Wacrm.Scopes", "X_Original_URI",
                         "X_HTTP_Method_Override", "X_Forwarded_Uri")
        ]),
        Class("overlong_uri", frozenset({414}), [
            req("/api/v1/contacts/" + pad, key(any_valid)),
        ]),
        Class("many_headers", frozenset({431}), [
            req("/api/v1/contacts", key(any_valid), *((f"X-Pad-{i}", "1") for i in range(101)))
        ]),
    ]  # fmt: skip


def write_script(workdir: Path, name: str, classes: Sequence[Class]) -> Path:
    """Write a wrk script whose n-th thread sends only the requests of the n-th class."""
    values = workdir / f"{name}.values.lua"
    values.write_text(
        "return {\n"
        + "".join(
            "  {\n" + "".join(f"    {_lua(r)},\n" for r in c.requests) + "  },\n" for c in classes
        )
        + "}\n"
    )
    script = workdir / f"{name}.lua"
    script.write_text(_SCRIPT % {"values": _lua(str(values).encode()), "marker": _WRK_MARKER})
    return script


# Each thread is told its class in `setup`, so `response` knows the class it counts for:
# wrk tells a response's callback nothing of the request it answers.
_SCRIPT = """\
-- Written by bench/soak.py.
local classes = dofile(%(values)s)
local threads = {}
local made = 0
cls = 0
statuses = {}
local prepared, n, i

function setup(thread)
  made = made + 1
  thread:set("cls", made)
  table.insert(threads, thread)
end

function init(args)
  prepared = classes[cls]
  n = #prepared
  i = math.random(n) - 1
end

function request()
  i = i %% n + 1
  return prepared[i]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    local seen = {}
    for code, count in pairs(t:get("statuses")) do
      table.insert(seen, string.format('"%%d": %%d', code, count))
    end
    table.insert(parts, string.format('"%%d": {%%s}', t:get("cls"), table.concat(seen, ", ")))
  end
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "classes": {%%s}, '
      .. '"errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}}\\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout))
end
"""


def _raw(method: str, target: str, host: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _lua(data: bytes) -> str:
    """Quote *data* as a Lua string literal, every byte outside printable ASCII escaped."""
    return '"' + "".join(
        chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in data
    ) + '"'  # fmt: skip


def _wrk_result(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith(_WRK_MARKER):
            result: dict[str, Any] = json.loads(line[len(_WRK_MARKER) :])
            return result
    raise RuntimeError(f"wrk gave no result:\n{out}")


def _get(port: int, path: str, key: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        return resp
    finally:
        conn.close()


def _limit(text: str) -> tuple[int, float]:
    """Return the requests and window seconds of ``LIMIT/WINDOW`` (``5/1s``)."""
    count, _, window = text.partition("/")
    unit = {"s": 1, "m": 60, "h": 3600}[window[-1]]
    return int(count), float(window[:-1] or 1) * unit


def _wait(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout} s")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument("--round", type=int, default=30, help="seconds of one wrk round (30)")
    p.add_argument("--connections", type=int, default=2, help="connections a class (2)")
    p.add_argument("--workers", type=int, default=2, help="sidecar workers (2)")
    p.add_argument("--limit", default="5/1s", help="the limited key's rate limit (5/1s)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples (5)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS base (60)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
