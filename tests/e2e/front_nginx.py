"""nginx with the shipped ``nginx/nginx.conf`` and its snippets (see `tests.e2e.fronts`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from demo import procs


def available() -> str | None:
    return None if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "no nginx"


def start(workdir: Path, *, sidecar_port: int, upstream_port: int) -> procs.Process:
    return procs.nginx(workdir, sidecar_port=sidecar_port, upstream_port=upstream_port)
