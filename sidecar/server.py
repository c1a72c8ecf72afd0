"""Serving the verifier: one process, or several sharing the port under a supervisor."""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp import web

from sidecar.app import HANDLER_ARGS, Gate
from sidecar.logs import log_config
from sidecar.metrics import COUNTS_GLOB, MULTIPROC_ENV
from sidecar.settings import Settings

log = logging.getLogger("sidecar")

#: Seconds a stopping worker gets to finish the checks in flight.
SHUTDOWN_TIMEOUT = 5.0
#: More restarts than this within RESTART_PERIOD seconds means the workers cannot run.
MAX_RESTARTS = 5
RESTART_PERIOD = 10.0


def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve *settings* in this process until SIGINT or SIGTERM."""
    use_uvloop()
    asyncio.run(_serve(settings, reuse_port=reuse_port))


async def _serve(settings: Settings, *, reuse_port: bool) -> None:
    gate = Gate(settings)
    try:
        await run_server(gate, settings.host, settings.port, reuse_port=reuse_port)
    finally:
        await gate.close()


async def run_server(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve *handler* on aiohttp's low-level server until SIGINT or SIGTERM.

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
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        log.info("listening on %s:%d (pid %d)", host, port, os.getpid())
        await stop.wait()
        log.info("stopping: finishing the requests in flight")
    finally:
        await runner.cleanup()  # stops listening, then waits for the handlers in flight


def _worker(settings: Settings) -> None:
    log_config(settings.log_level)
    serve(settings, reuse_port=True)


def supervise(settings: Settings) -> int:
    """Run *settings.workers* worker processes; restart one that dies, stop all on a signal."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    # Workers count into files here, so /metrics on any of them shows the sum of all.
    metrics_dir = None
    if MULTIPROC_ENV in os.environ:  # a folder of the operator's: start the counts anew
        for old in Path(os.environ[MULTIPROC_ENV]).glob(COUNTS_GLOB):
            old.unlink(missing_ok=True)
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
        w = ctx.Process(target=_worker, args=(settings,), daemon=False)
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
