"""The floor: an aiohttp ``/auth`` that answers 200 and does nothing, run like the sidecar.

With ``--low-level`` it is served as the sidecar is: by aiohttp's low-level server, with no
`web.Application` around the handler.  With ``--redis-url`` it does one thing: it awaits one
Redis GET per request, through the sidecar's own client, before answering.  That measures
what a single Redis round trip costs on its own, next to which the gate's checks can be read.

With ``--unix PATH`` it listens on that Unix socket, made as the sidecar makes its own (mode
0666, a stale one replaced); ``--workers N`` then forks N processes accepting on it, as the
sidecar's workers do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web

from sidecar.app import HANDLER_ARGS
from sidecar.resp import RespClient
from sidecar.server import SHUTDOWN_TIMEOUT, UnixListener, run_server, use_uvloop

client_key = web.AppKey("client", RespClient)


async def ok(request: web.BaseRequest) -> web.Response:
    """Let every request through."""
    return web.Response()


async def ok_after_get(request: web.Request) -> web.Response:
    """Let every request through, once Redis has answered one GET."""
    await request.app[client_key].execute(b"GET", b"wacrm-bench:floor")
    return web.Response()


def create_app(redis_url: str | None = None) -> web.Application:
    """Build the floor app with the sidecar's parser limits; with *redis_url*, one GET each."""
    app = web.Application(handler_args=HANDLER_ARGS)
    if redis_url is None:
        app.router.add_route("*", "/auth", ok)
        return app

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = RespClient(redis_url, timeout=1.0)
        yield
        await app[client_key].aclose()

    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/auth", ok_after_get)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the floor until SIGINT or SIGTERM, on uvloop as ``python -m sidecar`` does."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="TCP port (required without --unix)")
    parser.add_argument("--reuse-port", action="store_true", help="share the port (workers)")
    parser.add_argument("--unix", type=Path, metavar="PATH", help="listen on this Unix socket")
    parser.add_argument(
        "--workers", type=int, default=1, help="with --unix: processes accepting on it"
    )
    parser.add_argument("--redis-url", help="await one GET on this Redis per request")
    parser.add_argument(
        "--low-level", action="store_true", help="serve as the sidecar does, with no Application"
    )
    args = parser.parse_args(argv)
    if args.low_level and args.redis_url:
        parser.error("--low-level serves the plain floor only")
    if (args.port is None) == (args.unix is None):
        parser.error("give --port or --unix")
    if args.workers > 1 and args.unix is None:
        parser.error("--workers is for --unix; on TCP start one process a worker, --reuse-port")
    use_uvloop()
    if args.unix is None:
        _serve(args, None)
        return 0
    listener = UnixListener(args.unix)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:  # a worker: serve on the inherited socket, leave the file to the parent
            status = 1
            try:
                _serve(args, listener.sock)
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    try:
        _serve(args, listener.sock)
    finally:
        for pid in children:
            os.waitpid(pid, 0)
        listener.close()
    return 0


def _serve(args: argparse.Namespace, sock: socket.socket | None) -> None:
    """Serve the floor *args* ask for, on *sock* if given, else on TCP."""
    if args.low_level:
        asyncio.run(run_server(ok, args.host, args.port, reuse_port=args.reuse_port, sock=sock))
        return
    if sock is not None:
        web.run_app(
            create_app(args.redis_url),
            sock=sock,
            print=None,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        return
    web.run_app(
        create_app(args.redis_url),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )


if __name__ == "__main__":
    sys.exit(main())
