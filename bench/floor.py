"""The floor: an aiohttp ``/auth`` that answers 200 and does nothing, run like the sidecar.

With ``--low-level`` it is served as the sidecar is: by aiohttp's low-level server, with no
`web.Application` around the handler.  With ``--redis-url`` it does one thing: it awaits one
Redis GET per request, through the sidecar's own client, before answering.  That measures
what a single Redis round trip costs on its own, next to which the gate's checks can be read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from sidecar.app import HANDLER_ARGS
from sidecar.resp import RespClient
from sidecar.server import SHUTDOWN_TIMEOUT, run_server, use_uvloop

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
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true", help="share the port (workers)")
    parser.add_argument("--redis-url", help="await one GET on this Redis per request")
    parser.add_argument(
        "--low-level", action="store_true", help="serve as the sidecar does, with no Application"
    )
    args = parser.parse_args(argv)
    use_uvloop()
    if args.low_level:
        if args.redis_url:
            parser.error("--low-level serves the plain floor only")
        asyncio.run(run_server(ok, args.host, args.port, reuse_port=args.reuse_port))
        return 0
    web.run_app(
        create_app(args.redis_url),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
