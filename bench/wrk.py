"""Drive ``wrk``: a Lua script that cycles through prepared requests and counts bad statuses."""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The line the Lua ``done`` hook prints, followed by a JSON object.
MARKER = "WRK-RESULT "

# Every case runs this same script, so wrk does the same work per request whatever the case:
# requests are formatted once in `init` and cycled through; `response` counts any status other
# than the expected one, so a broken case (a 503 storm, say) shows as errors, not as speed.
_SCRIPT = """\
-- Written by bench/wrk.py.
local auths = dofile(%(values)s)
local fixed = %(fixed)s
local expected = %(expected)d
local prepared = {}
local n, i = 0, 0
local threads = {}
unexpected = 0
statuses = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for _, a in ipairs(auths) do
    local headers = {}
    for name, value in pairs(fixed) do headers[name] = value end
    if a ~= "" then headers["Authorization"] = a end
    table.insert(prepared, wrk.format("GET", %(path)s, headers))
  end
  n = #prepared
  i = math.random(n) - 1
end

function request()
  i = i %% n + 1
  return prepared[i]
end

function response(status, headers, body)
  if status ~= expected then
    unexpected = unexpected + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  local seen = {}
  for _, t in ipairs(threads) do
    bad = bad + t:get("unexpected")
    for code, count in pairs(t:get("statuses")) do
      table.insert(seen, string.format('"%%d": %%d', code, count))
    end
  end
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
      .. '"unexpected": %%d, "statuses": {%%s}, "connect": %%d, "read": %%d, "write": %%d, '
      .. '"timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    bad, table.concat(seen, ", "), e.connect, e.read, e.write, e.timeout))
end
"""


@dataclass(frozen=True, slots=True)
class Result:
    """One wrk run: throughput, latency and everything that went wrong."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    #: Responses whose status was not the expected one, by status.
    statuses: dict[int, int]
    #: Socket errors: connect, read, write, timeout.
    socket_errors: dict[str, int]
    #: CPU seconds wrk itself used (user + system).
    cpu: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) + sum(self.socket_errors.values())


def write_script(
    workdir: Path,
    name: str,
    *,
    path: str,
    authorizations: Sequence[str],
    expected: int,
    headers: Mapping[str, str] | None = None,
) -> Path:
    """Write the wrk script for one case: GET *path*, cycling through *authorizations*.

    An empty authorization sends no header; *headers* go with every request.  Returns the
    script's path.
    """
    values = workdir / f"{name}.values.lua"
    values.write_text("return {\n" + "".join(f"  {_lua(a)},\n" for a in authorizations) + "}\n")
    script = workdir / f"{name}.lua"
    script.write_text(
        _SCRIPT
        % {
            "values": _lua(str(values)),
            "fixed": "{"
            + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in (headers or {}).items())
            + "}",
            "expected": expected,
            "path": _lua(path),
            "marker": MARKER,
        }
    )
    return script


def run(
    script: Path,
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    timeout: float = 5.0,
) -> Result:
    """Run wrk with *script* against *url* and return what it measured."""
    proc = start(
        script, url, duration=duration, connections=connections, threads=threads, timeout=timeout
    )
    return finish(proc)


def start(
    script: Path,
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    timeout: float = 5.0,
) -> Running:
    """Start wrk in the background; `finish` waits for it and reads its result."""
    argv = [
        "wrk",
        f"--threads={threads}",
        f"--connections={max(connections, threads)}",
        f"--duration={max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "--latency",
        f"--script={script}",
        url,
    ]
    before = _children_cpu()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Running(proc, before)


@dataclass(slots=True)
class Running:
    """A wrk run in progress."""

    proc: subprocess.Popen[str]
    cpu_before: float


def finish(running: Running) -> Result:
    """Wait for *running* to end and parse its result; raise RuntimeError when it failed."""
    out, _ = running.proc.communicate()
    cpu = _children_cpu() - running.cpu_before
    for line in out.splitlines():
        if line.startswith(MARKER):
            d = json.loads(line[len(MARKER) :])
            return Result(
                requests=d["requests"],
                seconds=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1e3,
                p99_ms=d["p99_us"] / 1e3,
                statuses={int(k): v for k, v in d["statuses"].items()},
                socket_errors={k: d[k] for k in ("connect", "read", "write", "timeout") if d[k]},
                cpu=cpu,
            )
    raise RuntimeError(f"wrk exited with {running.proc.returncode} and no result:\n{out}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _lua(text: str) -> str:
    """Quote *text* as a Lua string literal."""
    return json.dumps(text)
