"""Serving the verifier: one process, or several sharing the port under a supervisor.

On TCP each worker listens on the port itself (``SO_REUSEPORT``); on a Unix socket
(``WACRM_LISTEN``) the supervisor makes the one socket and the workers all accept on it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp import web

from sidecar.app import HANDLER_ARGS, Gate
from sidecar.logs import log_config
from sidecar.metrics import MULTIPROC_ENV, clear_counts
from sidecar.routes import Policy
from sidecar.settings import Settings

log = logging.getLogger("sidecar")

#: Seconds a stopping worker gets to finish the checks in flight.
SHUTDOWN_TIMEOUT = 5.0
#: More restarts than this within RESTART_PERIOD seconds means the workers cannot run.
MAX_RESTARTS = 5
RESTART_PERIOD = 10.0


#: Who may connect to the Unix socket: anyone who can reach it, as on 127.0.0.1. The folder's
#: permissions decide who that is; nginx often runs as another user than the sidecar.
SOCKET_MODE = 0o666
#: Connections the kernel holds for the workers to accept (aiohttp's own default).
BACKLOG = 128


class ListenError(Exception):
    """The Unix socket to listen on cannot be made."""


def serve(
    settings: Settings,
    policy: Policy | None = None,
    *,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
) -> None:
    """Serve *settings* in this process until SIGINT or SIGTERM.

    *policy* is the route policy of *settings*, if loaded already (else it is loaded here).

    On *sock* if given (the supervisor's listening socket); else on the Unix socket of
    *settings.listen*, made here and removed at the end; else on TCP host and port.
    """
    use_uvloop()
    if sock is not None or settings.listen is None:
        asyncio.run(_serve(settings, policy, reuse_port=reuse_port, sock=sock))
        return
    try:
        listener = UnixListener(settings.listen)
    except ListenError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    try:
        asyncio.run(_serve(settings, policy, reuse_port=False, sock=listener.sock))
    finally:
        listener.close()


async def _serve(
    settings: Settings, policy: Policy | None, *, reuse_port: bool, sock: socket.socket | None
) -> None:
    gate = Gate(settings, policy)
    # What Redis is, logged once; the sidecar serves meanwhile (failing closed until it answers).
    checking = asyncio.create_task(gate.check_redis())
    try:
        await run_server(gate, settings.host, settings.port, reuse_port=reuse_port, sock=sock)
    finally:
        checking.cancel()
        await gate.close()


class UnixListener:
    """A listening Unix socket at *path*, mode `SOCKET_MODE`, replacing a stale one.

    Raise `ListenError` if *path* is another kind of file, a socket some process still
    listens on, or cannot be made. `close` removes the file, if it is still this socket.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        _remove_stale(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._inode = -1
        try:
            self.sock.bind(str(path))
            self._inode = path.stat().st_ino
            path.chmod(SOCKET_MODE)
            self.sock.listen(BACKLOG)
        except OSError as e:
            self.close()
            raise ListenError(f"cannot listen on unix:{path}: {e.strerror or e}") from None

    def close(self) -> None:
        self.sock.close()
        try:
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _remove_stale(path: Path) -> None:
    """Remove the socket file at *path* if no process listens on it any more."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ListenError(f"cannot listen on unix:{path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:  # left by a process that died: replace it
            path.unlink(missing_ok=True)
            return
        except TimeoutError:  # its queue is full: someone listens, but is slow to accept
            pass
        except OSError as e:
            raise ListenError(f"cannot listen on unix:{path}: {e.strerror or e}") from None
    raise ListenError(f"cannot listen on unix:{path}: another process listens on it")


async def run_server(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
) -> None:
    """Serve *handler* on aiohttp's low-level server until SIGINT or SIGTERM.

    On the listening socket *sock* if given (*host* and *port* are then unused), else on TCP.
    On a signal it stops listening and gives the requests in flight `SHUTDOWN_TIMEOUT`
    seconds to finish.
    """
    runner = web.ServerRunner(
        web.Server(handler, access_log=None, **HANDLER_ARGS), shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await runner.setup()
    try:
        if sock is None:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            where = f"{host}:{port}"
        else:
            await web.SockSite(runner, sock).start()
            where = _address(sock)
        log.info("listening on %s (pid %d)", where, os.getpid())
        await stop.wait()
        log.info("stopping: finishing the requests in flight")
    finally:
        await runner.cleanup()  # stops listening, then waits for the handlers in flight


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"{name[0]}:{name[1]}"


def _worker(settings: Settings, policy: Policy | None, sock: socket.socket | None) -> None:
    log_config(settings.log_level)
    serve(settings, policy, reuse_port=sock is None, sock=sock)


def supervise(settings: Settings, policy: Policy | None = None) -> int:
    """Run *settings.workers* worker processes; restart one that dies, stop all on a signal.

    On TCP each worker listens on the port itself. On a Unix socket, made here, each worker
    gets this process's listening socket (multiprocessing passes its descriptor).
    """
    ctx = multiprocessing.get_context("spawn")
    listener = None
    if settings.listen is not None:
        try:
            listener = UnixListener(settings.listen)
        except ListenError as e:
            log.error("%s", e)
            return 1
    sock = listener.sock if listener is not None else None
    stopping = False
    # Workers count into files here, so /metrics on any of them shows the sum of all.
    metrics_dir = None
    if MULTIPROC_ENV in os.environ:  # a folder of the operator's: start the counts anew
        clear_counts(Path(os.environ[MULTIPROC_ENV]))
    else:
        metrics_dir = tempfile.mkdtemp(prefix="wacrm-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.is_alive() and w.pid is not None:
                os.kill(w.pid, signal.SIGTERM)

    def start() -> BaseProcess:
        w = ctx.Process(target=_worker, args=(settings, policy, sock), daemon=False)
        w.start()
        return w

    workers = [start() for _ in range(settings.workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    restarts: collections.deque[float] = collections.deque(maxlen=MAX_RESTARTS)
    while not stopping:
        time.sleep(0.2)
        for i, w in enumerate(workers):
            if w.is_alive() or stopping:
                continue
            now = time.monotonic()
            if len(restarts) == MAX_RESTARTS and now - restarts[0] < RESTART_PERIOD:
                log.error("workers keep dying (last exit %s); stopping", w.exitcode)
                status = 1
                stop(signal.SIGTERM, None)
                break
            restarts.append(now)
            log.error("worker %d exited with %s; starting another", w.pid, w.exitcode)
            workers[i] = start()
    for w in workers:
        w.join(SHUTDOWN_TIMEOUT + 2)
        if w.is_alive():
            w.kill()
    if listener is not None:
        listener.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def use_uvloop() -> None:
    """Run asyncio on uvloop, where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
