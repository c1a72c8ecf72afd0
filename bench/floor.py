"""The floor: an aiohttp ``/auth`` that answers 200 and does nothing, run like the sidecar."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aiohttp import web


async def ok(request: web.Request) -> web.Response:
    """Let every request through."""
    return web.Response()


def create_app() -> web.Application:
    """Build the floor app with the sidecar's parser limits."""
    app = web.Application(handler_args={"max_field_size": 32768, "max_line_size": 32768})
    app.router.add_route("*", "/auth", ok)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the floor until SIGINT or SIGTERM, on uvloop as ``python -m sidecar`` does."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true", help="share the port (workers)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the sidecar falls back the same way
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
