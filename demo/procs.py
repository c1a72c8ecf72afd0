"""Start and stop the real servers the gate runs with, on free local ports or Unix sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "nginx"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, *, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on *port*; fail if *proc* dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def wait_for_unix_socket(
    path: Path, *, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on the Unix socket *path*; fail if *proc*
    dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on unix:{path} after {timeout}s")


def socket_folder(preferred: Path) -> Path:
    """Return a folder for Unix sockets that nginx's workers can reach: *preferred*, or a new
    one under the temporary folder, which the caller removes.

    nginx started as root runs its workers as ``nobody``, so a socket under a folder that
    shuts others out (root's home, pytest's 0700 folders) cannot be connected to; and a
    socket's path holds at most 107 bytes.
    """
    folders = [preferred, *preferred.parents]
    shut = os.geteuid() == 0 and any(not f.stat().st_mode & 0o001 for f in folders)
    if not shut and len(os.fsencode(preferred)) <= 80:
        return preferred
    made = Path(tempfile.mkdtemp(prefix="wacrm-"))
    made.chmod(0o711)  # others may pass through to the sockets, not list them
    return made


def find_binary(name: str) -> str:
    """Return the path of the program *name*, looking in the sbin folders too."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; run scripts/bootstrap")
    return found


class Process:
    """A child process we started, stopped politely and then firmly.

    It serves on *port*, or on the Unix socket *unix_socket* when given (*port* is then 0).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
        unix_socket: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.unix_socket = unix_socket
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """Where it serves, as nginx's ``server`` directive names it."""
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 15.0) -> None:
        """Start the process and wait until it listens on its port or socket."""
        self.start_background()
        try:
            if self.unix_socket is not None:
                wait_for_unix_socket(self.unix_socket, timeout=timeout, proc=self.proc)
            else:
                wait_for_port(self.port, timeout=timeout, proc=self.proc)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def start_background(self) -> None:
        """Start the process without waiting for it."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        # The process leads its own session: signal the group, so its children stop too.
        if proc.poll() is None:
            _signal_group(proc, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        else:
            _signal_group(proc, signal.SIGKILL)  # orphans of a process that died
        return proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def redis_server(
    workdir: Path,
    port: int | None = None,
    *,
    unix_socket: Path | None = None,
    unix_socket_mode: int = 0o700,
    extra: Sequence[str] = (),
) -> Process:
    """Return a throw-away redis-server (no persistence) on *port*, and *unix_socket* if given
    (mode *unix_socket_mode*: by default only this user's processes may connect), with the
    *extra* arguments (a cluster node's, a replica's)."""
    port = port or free_port()
    argv = [
        find_binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]
    if unix_socket is not None:
        argv += ["--unixsocket", str(unix_socket), "--unixsocketperm", f"{unix_socket_mode:o}"]
    return Process([*argv, *extra], port=port, log=workdir / f"redis-{port}.log")


def sidecar(
    workdir: Path,
    *,
    redis_url: str,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    tree: Path | None = None,
    unix_socket: Path | None = None,
) -> Process:
    """Return the sidecar serving on *port* (or the Unix socket *unix_socket*, through
    WACRM_LISTEN) against *redis_url*: this checkout's, or *tree*'s."""
    env = {**os.environ, "WACRM_REDIS_URL": redis_url}
    if unix_socket is not None:
        port = 0
        env["WACRM_LISTEN"] = f"unix:{unix_socket}"
        log = workdir / f"sidecar-{unix_socket.stem}.log"
    else:
        port = port or free_port()
        env["WACRM_PORT"] = str(port)
        env.pop("WACRM_LISTEN", None)
        log = workdir / f"sidecar-{port}.log"
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "sidecar"]
    if tree is not None:  # -P: the tree on PYTHONPATH, not the working directory, comes first
        argv.insert(1, "-P")
        env["PYTHONPATH"] = str(tree.resolve())
    return Process(argv, port=port, log=log, env=env, unix_socket=unix_socket)


def upstream(workdir: Path, port: int | None = None) -> Process:
    """Return the echoing demo upstream on *port*."""
    port = port or free_port()
    return Process(
        [sys.executable, "-m", "demo.upstream", "--port", str(port)],
        port=port,
        log=workdir / f"upstream-{port}.log",
    )


def render_nginx(
    workdir: Path,
    *,
    listen: int,
    sidecar_port: int | None = None,
    upstream_port: int,
    sidecar_socket: Path | None = None,
) -> Path:
    """Write the shipped example config with these ports into *workdir*; return its path.

    The sidecar is on 127.0.0.1:*sidecar_port*, or on the Unix socket *sidecar_socket*.
    """
    text = (NGINX_DIR / "nginx.conf").read_text()
    for placeholder, value in {
        "@RUNDIR@": str(workdir),
        "@NGINX_DIR@": str(NGINX_DIR),
        "@LISTEN@": f"127.0.0.1:{listen}",
        "@SIDECAR@": _sidecar_address(sidecar_port, sidecar_socket),
        "@UPSTREAM@": f"127.0.0.1:{upstream_port}",
    }.items():
        text = text.replace(placeholder, value)
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx(
    workdir: Path,
    *,
    sidecar_port: int | None = None,
    upstream_port: int,
    port: int | None = None,
    sidecar_socket: Path | None = None,
) -> Process:
    """Return nginx running the shipped example config in the foreground.

    It asks the sidecar on 127.0.0.1:*sidecar_port*, or on the Unix socket *sidecar_socket*.
    """
    port = port or free_port()
    conf = render_nginx(
        workdir,
        listen=port,
        sidecar_port=sidecar_port,
        upstream_port=upstream_port,
        sidecar_socket=sidecar_socket,
    )
    argv = [find_binary("nginx"), "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
    return Process(argv, port=port, log=workdir / f"nginx-{port}.log")


def _sidecar_address(port: int | None, unix_socket: Path | None) -> str:
    if (port is None) == (unix_socket is None):
        raise ValueError("give the sidecar's port or its Unix socket, not both or neither")
    return f"unix:{unix_socket}" if unix_socket is not None else f"127.0.0.1:{port}"
