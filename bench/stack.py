"""The servers a benchmark runs against: nginx configs rendered from the shipped files, and
what ``/proc`` says about a process tree (RSS, CPU time)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from demo import procs

#: The route every case requests; the key the gate checks must carry its scope.
PATH = "/api/v1/contacts"
SCOPE = "contacts:read"

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class NginxPorts:
    """Where one nginx listens: the shipped server, its auth app, its upstream stand-in."""

    listen: int
    auth: int
    upstream: int
    #: The ceiling server (no gate), or None for an nginx without one.
    ceiling: int | None = None


def render_nginx(workdir: Path, ports: NginxPorts) -> Path:
    """Write the shipped nginx.conf for *ports* into *workdir*, plus the bench's own servers.

    The shipped config is used as is, with two servers added to its ``http`` block: the
    upstream stand-in (nginx answers ``return 200`` itself, echoing the identity it was
    given, so the upstream is never the bottleneck) and, when asked for, the ceiling: the
    shipped protected location without the gate, i.e. ``wacrm-protect.conf`` minus its
    ``auth_request`` and ``error_page`` lines.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    conf = procs.render_nginx(
        workdir, listen=ports.listen, sidecar_port=ports.auth, upstream_port=ports.upstream
    )
    text = conf.read_text().rstrip()
    if not text.endswith("}"):
        raise ValueError(f"{conf}: expected the http block to close the file")
    extra = _UPSTREAM_SERVER % {"port": ports.upstream}
    if ports.ceiling is not None:
        extra += _CEILING_SERVER % {"port": ports.ceiling, "protect": _unprotected()}
    conf.write_text(text[:-1] + extra + "}\n")
    return conf


def nginx(workdir: Path, ports: NginxPorts) -> procs.Process:
    """Return nginx serving the config `render_nginx` writes, in the foreground."""
    conf = render_nginx(workdir, ports)
    argv = [procs.find_binary("nginx"), "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
    return procs.Process(argv, port=ports.listen, log=workdir / "nginx-stdout.log")


def tree(pid: int) -> list[int]:
    """Return *pid* and all its descendants that are alive."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def rss_kib(pids: list[int]) -> int:
    """Return the summed resident set size of *pids*, in KiB (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """Return the CPU time (user + system) *pids* have used so far."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def machine_busy_seconds() -> float:
    """Return the CPU time every process on the machine has used since boot (not idle)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...: count all but idle and iowait.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS


def _unprotected() -> str:
    lines = (procs.NGINX_DIR / "snippets" / "wacrm-protect.conf").read_text().splitlines()
    kept = [
        line
        for line in lines
        if line.strip() and not line.startswith(("#", "auth_request", "error_page"))
    ]
    return "\n".join("            " + line for line in kept)


_UPSTREAM_SERVER = """
    # bench: the upstream stand-in; it echoes the identity the gate injected.
    server {
        listen 127.0.0.1:%(port)d;
        access_log off;
        location / {
            default_type text/plain;
            return 200 "ok account=$http_x_wacrm_account_id\\n";
        }
    }
"""

_CEILING_SERVER = """
    # bench: the ceiling, the shipped protected location without the gate.
    server {
        listen 127.0.0.1:%(port)d;
        location /api/ {
%(protect)s
            proxy_pass http://app;
        }
    }
"""
