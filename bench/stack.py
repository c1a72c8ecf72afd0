"""The servers a benchmark runs against: nginx configs rendered from the shipped files, the
OpenResty reference (nginx with its Lua module), and what ``/proc`` says about a process
tree (RSS, CPU time)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

from demo import procs
from sidecar import records

#: The route every case requests; the key the gate checks must carry its scope.
PATH = "/api/v1/contacts"
SCOPE = "contacts:read"

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class NginxPorts:
    """Where one nginx listens: the shipped server, its auth app, its upstream stand-in."""

    listen: int
    #: The auth app's TCP port; 0 when it listens on `auth_socket`.
    auth: int
    upstream: int
    #: The ceiling server (no gate), or None for an nginx without one.
    ceiling: int | None = None
    #: The auth app's Unix socket, if it listens on one: ``server unix:...`` upstream.
    auth_socket: Path | None = None


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
        workdir,
        listen=ports.listen,
        sidecar_port=None if ports.auth_socket else ports.auth,
        sidecar_socket=ports.auth_socket,
        upstream_port=ports.upstream,
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


#: What the OpenResty reference needs, from Debian: nginx's Lua module (LuaJIT, with NDK and
#: lua-resty-core), resty.redis, resty.sha256 and resty.string, and lua-cjson.
LUA_PACKAGES = ("libnginx-mod-http-lua", "lua-nginx-redis", "lua-nginx-string", "lua-cjson")
#: Where Debian's packages put nginx's dynamic modules (nginx -V: --modules-path).
MODULES = Path("/usr/lib/nginx/modules")
LUA_MODULES = (MODULES / "ndk_http_module.so", MODULES / "ngx_http_lua_module.so")
LUA_DIR = Path(__file__).resolve().parent / "lua"


def lua_unavailable(*, install: bool) -> str | None:
    """Make nginx's Lua module and libraries ready; return why they cannot be, or None.

    With *install*, the missing Debian packages (`LUA_PACKAGES`) are installed with apt-get,
    as root; without, only what is installed is used.
    """
    missing = [p for p in LUA_PACKAGES if not _installed(p)]
    if missing and not install:
        return f"not installed: {' '.join(missing)}"
    if missing:
        if os.geteuid() != 0:
            return f"not installed, and installing needs root: {' '.join(missing)}"
        print(f"bench: installing {' '.join(missing)} for the OpenResty reference", flush=True)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            return f"apt-get install {' '.join(missing)} failed: {' '.join(last)}"
    absent = [str(m) for m in LUA_MODULES if not m.exists()]
    if absent:
        return f"nginx's Lua module is not where Debian puts it: {', '.join(absent)}"
    return None


def lua_nginx(
    workdir: Path, *, listen: int, upstream: int, redis_socket: Path, prefix: str
) -> procs.Process:
    """Return nginx doing the key check in Lua (bench/lua/check.lua), against *redis_socket*.

    The same client-facing server as the gate's, minus the sidecar: the protected location
    runs the check in ``access_by_lua`` and passes the account id upstream.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    head, tail = records.Keyspace(prefix).record_around
    account_field, key_field = _record_names()
    options = {
        "redis": f"unix:{redis_socket}",
        "record_head": head,
        "record_tail": tail,
        "account_field": account_field,
        "key_field": key_field,
    }
    text = _LUA_NGINX % {
        "modules": "".join(f"load_module {m};\n" for m in LUA_MODULES),
        "run": workdir,
        "nginx_dir": procs.NGINX_DIR,
        "lua_dir": LUA_DIR,
        "options": ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()),
        "listen": listen,
        "upstream": upstream,
        "upstream_server": _UPSTREAM_SERVER % {"port": upstream},
    }
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    argv = [procs.find_binary("nginx"), "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
    return procs.Process(argv, port=listen, log=workdir / "nginx-stdout.log")


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


def _installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and done.stdout.endswith(" installed")


def _record_names() -> tuple[str, str]:
    """Return the JSON names under which a stored record holds its account id and key id."""
    probe = records.KeyRecord("key-probe", "account-probe", None, "wacrm_live_x", (), None)
    fields = orjson.loads(records.encode(probe, version=1)).items()
    names = {v: k for k, v in fields if isinstance(v, str)}
    return names["account-probe"], names["key-probe"]


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

_LUA_NGINX = """\
# bench: the OpenResty reference, the key checked in nginx by bench/lua/check.lua.
%(modules)s
worker_processes 1;
pid %(run)s/nginx.pid;
error_log %(run)s/nginx-error.log warn;

events {
    worker_connections 1024;
}

http {
    include %(nginx_dir)s/snippets/wacrm-log.conf;
    access_log %(run)s/nginx-access.log wacrm;
    client_body_temp_path %(run)s/nginx-tmp/body;
    proxy_temp_path %(run)s/nginx-tmp/proxy;
    fastcgi_temp_path %(run)s/nginx-tmp/fastcgi;
    uwsgi_temp_path %(run)s/nginx-tmp/uwsgi;
    scgi_temp_path %(run)s/nginx-tmp/scgi;
    server_tokens off;

    lua_package_path "%(lua_dir)s/?.lua;;";
    init_by_lua_block {
        require("check").configure({ %(options)s })
    }

    upstream app {
        server 127.0.0.1:%(upstream)d;
        keepalive 32;
    }

    server {
        listen 127.0.0.1:%(listen)d;

        location /api/ {
            set $wacrm_account_id "";
            set $wacrm_key_id "";
            access_by_lua_block {
                require("check").access()
            }
            proxy_set_header X-Wacrm-Account-Id $wacrm_account_id;
            proxy_set_header X-Wacrm-Key-Id $wacrm_key_id;
            proxy_set_header Authorization "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://app;
        }
    }
%(upstream_server)s}
"""
