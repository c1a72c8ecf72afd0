#!/usr/bin/env python3
"""The image's health check: ask the gate's process in this container its own ``/healthz``.

Installed in the image as ``wacrm-healthcheck`` (the HEALTHCHECK of the Dockerfile; use it as
an exec probe too). It finds the container's ``wacrm-sidecar`` or ``wacrm-loader`` process
(PID 1, or the first one found behind an init), reads that process's own environment and
flags with the project's settings code, and asks:

- the sidecar: ``WACRM_HOST``:``WACRM_PORT`` (``--host``, ``--port``), or its Unix socket
  when ``WACRM_LISTEN`` (``--listen``) names one;
- ``wacrm-loader run``: ``WACRM_LOADER_METRICS_HOST``:``WACRM_LOADER_METRICS_PORT``
  (``--metrics-host``, ``--metrics-port``); the image sets the port to 9181.

A wildcard listening address (``0.0.0.0``, ``::``) is asked on loopback. The other loader
commands (``sync``, ``keys ...``, ``accounts ...``) serve nothing: they are healthy while they
run, as is ``loader run`` without a metrics port. Exit 0 healthy, 1 unhealthy.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

#: Seconds the process may take to answer; below the HEALTHCHECK's own timeout.
TIMEOUT = 2.0
LOADER_COMMANDS = ("sync", "run", "accounts", "keys")


def find_process() -> tuple[str, int, list[str]] | None:
    """Return (``sidecar`` or ``loader``, pid, argv after the program) of the gate's process."""
    me = os.getpid()
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == me:
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
        for i, arg in enumerate(argv[:3]):
            name = os.path.basename(arg)
            if name in ("wacrm-sidecar", "wacrm-loader"):
                return name.removeprefix("wacrm-"), pid, argv[i + 1 :]
            if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("sidecar", "loader"):
                return argv[i + 1], pid, argv[i + 2 :]
    return None


def environ_of(pid: int) -> dict[str, str]:
    """Return the environment *pid* started with; this process's own if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def flags_for(flags: Sequence[str], argv: Sequence[str]) -> list[str]:
    """Return the ``--flag VALUE`` pairs of *argv* whose flag is in *flags*."""
    found: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in flags:
            if not eq:
                if i + 1 >= len(argv):
                    break
                i += 1
                value = argv[i]
            found += [name, value]
        i += 1
    return found


def loader_command(argv: Sequence[str], value_flags: Sequence[str]) -> str | None:
    """Return the loader's command (``run``, ``sync``, ...) in *argv*."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in value_flags:
            i += 2
            continue
        if arg in LOADER_COMMANDS:
            return arg
        i += 1
    return None


def probe_address(host: str) -> str:
    """Return the address to ask for a server listening on *host*."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.removeprefix("[").removesuffix("]")


def ask(host: str, port: int) -> tuple[bool, str]:
    """GET /healthz on *host*:*port*; return (healthy, what happened)."""
    address = probe_address(host)
    conn = http.client.HTTPConnection(address, port, timeout=TIMEOUT)
    return _healthz(conn, f"http://{address}:{port}/healthz")


def _healthz(conn: http.client.HTTPConnection, where: str) -> tuple[bool, str]:
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return False, f"{where}: {e}"
    finally:
        conn.close()
    return status == 200, f"{where}: {status}"


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a server listening on the Unix socket *path*."""

    def __init__(self, path: str, *, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask_unix(path: str) -> tuple[bool, str]:
    """GET /healthz on the Unix socket *path*; return (healthy, what happened)."""
    return _healthz(UnixHTTPConnection(path, timeout=TIMEOUT), f"unix:{path} /healthz")


def check() -> tuple[bool, str]:
    found = find_process()
    if found is None:
        return False, "no wacrm-sidecar or wacrm-loader process in this container"
    kind, pid, argv = found
    environ = environ_of(pid)
    if kind == "sidecar":
        from sidecar.settings import OPTIONS, Settings

        flags = [opt.flag for opt in OPTIONS]
        sidecar = Settings.from_env(environ, flags_for(flags, argv))
        if sidecar.listen is not None:
            return ask_unix(str(sidecar.listen))
        return ask(sidecar.host, sidecar.port)

    from loader.settings import OPTIONS as LOADER_OPTIONS
    from loader.settings import Settings as LoaderSettings

    flags = [opt.flag for opt in LOADER_OPTIONS]
    command = loader_command(argv, flags)
    loader = LoaderSettings.from_env(environ, flags_for(flags, argv))
    if command != "run" or loader.metrics_port is None:
        return True, f"wacrm-loader {command or ''} (pid {pid}) serves no health endpoint: alive"
    return ask(loader.metrics_host, loader.metrics_port)


def main() -> int:
    try:
        healthy, detail = check()
    except (Exception, SystemExit) as e:  # a setting the process itself would refuse, say
        healthy, detail = False, f"cannot check: {type(e).__name__}: {e}"
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
