"""The proxies a user puts in front of the sidecar, each running the configuration shipped.

A front is a module ``tests.e2e.front_<name>`` with two functions:

``available() -> str | None``
    why the proxy cannot run here (its binary missing), or None;
``start(workdir, *, sidecar_port, upstream_port) -> demo.procs.Process``
    the proxy, not yet started, serving clients on its ``port``: the files shipped under
    ``deploy/<name>/`` (or ``nginx/`` for nginx), filled in with the ports, asking the sidecar
    on 127.0.0.1:*sidecar_port* about every request and proxying to the echo upstream on
    127.0.0.1:*upstream_port*.

`tests.e2e.test_fronts` holds every front to the same contract.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

import pytest

from demo import procs

#: Every front, in the order the contract tests run them.
NAMES = ("nginx", "caddy", "traefik", "envoy")


class Front(Protocol):
    def available(self) -> str | None: ...

    def start(self, workdir: Path, *, sidecar_port: int, upstream_port: int) -> procs.Process: ...


def front(name: str) -> Front:
    """Return the front module called *name*."""
    module: Front = importlib.import_module(f"tests.e2e.front_{name}")
    return module


def require(name: str) -> Front:
    """Return the front *name*, skipping the test where its proxy is missing (failing in CI,
    where ``scripts/bootstrap --test`` installs every one)."""
    module = front(name)
    missing = module.available()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{name}: {missing} (scripts/bootstrap --test installs it)")
        pytest.skip(f"{name}: {missing}")
    return module
