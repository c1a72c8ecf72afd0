"""Caddy with the shipped ``deploy/caddy/Caddyfile`` (see `tests.e2e.fronts`).

The Caddyfile is run as shipped: its addresses are ``{$NAME:default}`` placeholders, which
Caddy fills in from the environment as it reads the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from demo import procs

CADDYFILE = procs.ROOT / "deploy" / "caddy" / "Caddyfile"


def binary() -> str | None:
    """Return the caddy binary: on PATH, or Debian's."""
    found = shutil.which("caddy")
    if found is None and Path("/usr/bin/caddy").exists():
        found = "/usr/bin/caddy"
    return found


def available() -> str | None:
    return None if binary() else "no caddy (Debian's caddy package)"


def start(
    workdir: Path,
    *,
    sidecar_port: int,
    upstream_port: int,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> procs.Process:
    """Return Caddy serving the shipped Caddyfile on *port* (all interfaces: a site address
    cannot bind one), its admin API off; *env* adds to or replaces its environment."""
    caddy = binary()
    if caddy is None:
        raise FileNotFoundError("caddy is not installed")
    port = port or procs.free_port()
    home = workdir / f"caddy-{port}"
    home.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        # Caddy's autosave.json and certificate storage stay in the test's folder.
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "XDG_DATA_HOME": str(home),
        "WACRM_SITE": f"http://:{port}",
        "WACRM_SIDECAR": f"127.0.0.1:{sidecar_port}",
        "WACRM_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "WACRM_CADDY_ADMIN": "off",
        **(env or {}),
    }
    argv = [caddy, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
    return procs.Process(argv, port=port, log=workdir / f"caddy-{port}.log", env=full_env)
